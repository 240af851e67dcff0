"""The results store (DESIGN.md 3.8): one directory per run, every file written atomically.

A run lives in ``results/<name>-<config hash>/``::

    config.yaml    the resolved config
    metrics.json   accuracy metrics
    meters.json    bytes, MACs, latency, memory
    best.pt        best checkpoint          last.pt   latest checkpoint (for resuming)
    error.json     type, message and traceback of the last failure
    done.json      written last: its presence marks the run complete, so a sweep skips it

Atomic writes go to a hidden temporary file in the same directory, are fsynced, then ``os.replace``d over the
target: a reader sees the old file or the new one, never a partial one, and an interrupted sweep resumes from
what is on disk.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from malloc.configio import ConfigError, config_hash, to_dict

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_RUN_DIR = re.compile(r"^.+-[0-9a-f]{8}$")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str) -> Iterator[IO[Any]]:
    """Yield a temporary file next to ``path``; on a clean exit fsync it and move it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; results are meant to be read by others
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); best effort where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating parent directories."""
    with atomic_file(path, "w") as handle:
        handle.write(text)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON form of results: non-finite floats (NaN, inf) become ``None`` (strict JSON has no NaN),
    NumPy/torch scalars and arrays become Python numbers and lists, tuples lists, paths strings."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (np.ndarray, np.generic)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys) atomically; NaN and inf are written as ``null``.

    The object is serialised before the file is touched, so a serialisation error leaves any old file intact.
    """
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` atomically."""
    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`atomic_write_json` (``null`` stands for a non-finite float)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunDir:
    """The directory of one run and the names of its files. Nothing is created until something is written."""

    root: Path

    @classmethod
    def for_config(cls, results_root: str | Path, name: str, config_obj: Any) -> RunDir:
        """``results_root/<name>-<config_hash(config_obj)>``; ``name`` is a plain file name (letters, digits,
        ``_ . + = -``, starting with a letter or digit), else :class:`ConfigError`."""
        if not _RUN_NAME.match(name):
            raise ConfigError(
                f"run name {name!r} must be letters, digits and _ . + = - (no slashes or spaces)"
            )
        return cls(Path(results_root) / f"{name}-{config_hash(config_obj)}")

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def meters_path(self) -> Path:
        return self.root / "meters.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "best.pt"

    @property
    def last_checkpoint_path(self) -> Path:
        return self.root / "last.pt"

    @property
    def lock_path(self) -> Path:
        return self.root / "run.lock"

    @property
    def done_path(self) -> Path:
        return self.root / "done.json"

    @property
    def error_path(self) -> Path:
        return self.root / "error.json"

    def is_done(self) -> bool:
        """Whether the run completed (its done marker exists)."""
        return self.done_path.is_file()

    def write_config(self, config_obj: Any) -> None:
        """Write the resolved config as YAML (keys in field order)."""
        text = yaml.safe_dump(to_dict(config_obj), sort_keys=False, default_flow_style=False)
        atomic_write_text(self.config_path, text)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        atomic_write_json(self.metrics_path, metrics)

    def write_meters(self, meters: Mapping[str, Any]) -> None:
        atomic_write_json(self.meters_path, meters)

    def mark_done(self, summary: Mapping[str, Any]) -> None:
        """Write the done marker (``summary`` plus ``finished_at``), last of all the run's files.

        A stale ``error.json`` from an earlier failed attempt is removed first, so a done run has no error.
        """
        with contextlib.suppress(FileNotFoundError):
            self.error_path.unlink()
        atomic_write_json(self.done_path, {**summary, "finished_at": _now()})

    def record_error(self, exc: BaseException) -> None:
        """Record a failure: exception type, message, formatted traceback and time."""
        record = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "failed_at": _now(),
        }
        atomic_write_json(self.error_path, record)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's exclusive lock (``<root>/run.lock``, an advisory ``flock``) for the block.

        Several processes on one file system (suite shards, workers of a cluster sharing a results folder) may
        ask for the same run: the first trains it, the others wait here and then find it done. ``clear()``
        keeps the lock file, so a forced rerun stays under the same lock; the lock dies with its process.
        """
        import fcntl

        path = self.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read_error(self) -> dict[str, Any] | None:
        """The recorded failure, or None."""
        return read_json(self.error_path) if self.error_path.is_file() else None

    def clear(self) -> None:
        """Delete the run directory, or everything in it but its lock file if it has one (for ``--force``).

        Refuses a directory whose name is not ``<name>-<8 hex>``, so a mistyped root cannot wipe other data.
        """
        if not _RUN_DIR.match(self.root.name):
            raise ValueError(f"refusing to clear {self.root}: not a run directory named <name>-<8 hex hash>")
        if self.root.is_symlink() or self.root.is_file():
            raise ValueError(f"refusing to clear {self.root}: not a directory")
        if not self.root.exists():
            return
        for child in self.root.iterdir():
            if child == self.lock_path:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        if not self.lock_path.exists():
            self.root.rmdir()


__all__ = [
    "RunDir",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "read_json",
    "to_jsonable",
]
