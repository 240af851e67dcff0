"""malloc.heap: the allocator setting the ``malloc`` command runs with, checked in child processes (it is a
per-process setting, so the test process's own heap is left as it is)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting applies to glibc's malloc only")

# Mallocs, writes and frees a 64 MiB block five times (through the C library, as torch's CPU allocator does);
# prints the minor page faults of the last four.
FAULTS = """
import ctypes, ctypes.util, resource, sys
from malloc.heap import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retained" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
def touch():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setting: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, setting], check=True, capture_output=True, text=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@glibc
def test_retained_heap_reuses_freed_memory():
    """With glibc's defaults each 64 MiB block is a fresh mapping, faulted in page by page (16,384 pages of
    4 KiB); with the retained heap the freed block is reused and barely faults."""
    applied, retained = page_faults("retained")
    _, system = page_faults("system")
    assert applied == "True"
    assert system >= 4 * 16_000
    assert retained < system / 20


def test_python_m_malloc_runs_through_the_console_entry_point():
    """``python -m malloc`` calls :func:`malloc.cli.console` (the heap setting, then the command); the setting's
    effect is the test above."""
    out = subprocess.run([sys.executable, "-m", "malloc", "methods", "--json"], check=True, capture_output=True,
                         text=True)
    assert "native" in [method["name"] for method in json.loads(out.stdout)]


def test_heap_benchmark_runs(capsys, benchmark_script):
    """benchmarks/heap.py end to end on a tiny window (its timings are in docs/BENCHMARKS.md)."""
    module = benchmark_script("heap")
    assert module.main(["--window", "16", "--batch", "2", "--steps", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["setting"] for row in result["rows"]] == ["system", "retained"]
    assert all(row["step_seconds"] > 0 and row["peak_rss_mib"] > 0 for row in result["rows"])
    with pytest.raises(SystemExit):
        module.main(["--window", "0"])
