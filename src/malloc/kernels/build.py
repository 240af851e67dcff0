"""Build a C kernel of this package into a shared library on first use, cache it, and load it with ctypes.

The library lands in ``$MALLOC_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/malloc/kernels``, else
``~/.cache/malloc/kernels``) under a name that hashes the source, the flags, the compiler's version and this CPU's
model and flags, since ``-march=native`` code runs only where it was built. The build writes a temporary file and
renames it, so concurrent first uses (test workers, torchrun ranks) never load a half-written library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

# -ffinite-math-only and -fno-signed-zeros let min, max and floor vectorise; the kernels rely on no infinity or NaN
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros",
         "-shared", "-fPIC")
# tried first: OpenMP, whose runtime (libgomp.so.1) is then the one PyTorch has already loaded, so the kernels'
# threads are PyTorch's; where the compiler has no OpenMP, the build without it runs on one thread
OPENMP = ("-fopenmp",)
BUILD_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where built libraries are kept."""
    explicit = os.environ.get("MALLOC_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "malloc" / "kernels"


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else the platform's processor string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return done.stdout


@functools.cache
def load(source: str) -> ctypes.CDLL | None:
    """The library built from ``malloc/kernels/<source>`` (with OpenMP where the compiler has it), or None
    (logged once) where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler (cc, gcc or $CC) found: %s is not built; the PyTorch path runs instead", source)
        return None
    code = resources.files("malloc.kernels").joinpath(source).read_bytes()
    errors = []
    for flags in ((*FLAGS, *OPENMP), FLAGS):
        try:
            key = hashlib.sha256(b"\0".join([code, " ".join(flags).encode(), _version(compiler).encode(),
                                             _cpu_identity().encode(), platform.machine().encode()])).hexdigest()
            target = cache_dir() / f"{Path(source).stem}-{key[:16]}.so"
            if not target.exists():
                _build(compiler, flags, code, source, target)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(str(error))
    log.warning("could not build or load the C kernel %s (%s); the PyTorch path runs instead", source,
                "; without OpenMP: ".join(errors))
    return None


def _build(compiler: str, flags: tuple[str, ...], code: bytes, source: str, target: Path) -> None:
    """Compile ``code`` into ``target`` through a temporary file in the same folder, renamed when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as work:
        src = Path(work) / source
        src.write_bytes(code)
        built = Path(work) / target.name
        done = subprocess.run([compiler, *flags, str(src), "-o", str(built)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise OSError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)
    log.info("built the C kernel %s into %s", source, target)
