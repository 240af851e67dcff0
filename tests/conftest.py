"""Fixtures shared by test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def run_dirs(results: Path) -> list[Path]:
    """The run folders under a results root, sorted (not the shared ``anchors/`` cache)."""
    return sorted(p for p in results.iterdir() if p.is_dir() and p.name != "anchors")


def _script_loader(folder: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(folder))

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture()
def benchmark_script(monkeypatch):
    """``load(name)``: the script ``benchmarks/<name>.py`` imported as a module (its sibling ``_common.py``
    importable for the test's duration), so a test calls its ``main(argv)``."""
    return _script_loader(BENCHMARKS, monkeypatch)


@pytest.fixture()
def experiment_script(monkeypatch):
    """``load(name)``: the script ``experiments/<name>.py`` imported as a module, as ``benchmark_script`` does."""
    return _script_loader(EXPERIMENTS, monkeypatch)
