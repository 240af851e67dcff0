"""The results store: one directory per run, every file written atomically.

A run lives in ``results/<name>-<config hash>/``::

    config.yaml    the resolved config
    metrics.json   accuracy metrics
    meters.json    bytes, MACs, latency, memory
    identity.json  what the hash covers (task, data and its content digest, model, training), checked on reuse
    best.pt        best checkpoint          last.pt   latest checkpoint (for resuming)
    error.json     type, message and traceback of the last failure
    done.json      written last: its presence marks the run complete, so a sweep skips it

Atomic writes go to a hidden temporary file in the same directory, are fsynced, then ``os.replace``d over the
target: a reader sees the old file or the new one, never a partial one, and an interrupted sweep resumes from
what is on disk.

Reading back trusts nothing: checkpoints are loaded with PyTorch's restricted unpickler (tensors and plain values
only; a file that would build any other object, and so could run code, is refused with a
:class:`~malloc.errors.CheckpointError`), and JSON results are parsed and checked before they are reused (a corrupt
``done.json`` or ``metrics.json`` is reported and the run recomputed, never taken as done).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from malloc.configio import ConfigError, config_hash, to_dict
from malloc.errors import CheckpointError, ResultsError

log = logging.getLogger("malloc.results")

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
    """``torch.save(obj, path)`` atomically. ``obj`` must hold only tensors and plain values (dicts, lists, numbers,
    strings), the only things :func:`load_checkpoint` reads back."""
    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read a file written by :func:`atomic_torch_save`, refusing anything but tensors and plain values.

    PyTorch's restricted unpickler (``weights_only=True``) builds no object outside an allow-list, so a file whose
    pickle would call a function (and so run code) is refused before anything in it runs.

    Raises:
        CheckpointError: one line naming the file: refused (holds other objects), or unreadable (empty, truncated,
            not a checkpoint).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # a forbidden object (a global, a class) or bytes that are no pickle
        raise CheckpointError(f"{path}: refused to load: not a checkpoint of tensors and plain values only (corrupt, "
                              "or holding objects that run code when read); delete it, or rerun with --force") from exc
    except FileNotFoundError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint (empty, truncated or not a checkpoint: {reason}); "
                              "delete it, or rerun with --force") from exc


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`atomic_write_json` (``null`` stands for a non-finite float).

    Raises:
        ResultsError: the file is unreadable or not valid UTF-8 JSON (one line naming it).
        FileNotFoundError: it does not exist.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ResultsError(f"{path}: not a readable JSON file ({str(exc).splitlines()[0]})") from exc


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None where it is missing, unreadable, not JSON or not an object (the last
    three are logged as a warning naming the file: the caller recomputes what it held)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = read_json(path)
    except (ResultsError, FileNotFoundError) as exc:
        log.warning("%s; recomputing it", exc)
        return None
    if not isinstance(value, dict):
        log.warning("%s: expected a JSON object, found %s; recomputing it", path, type(value).__name__)
        return None
    return value


def cached(path: str | Path, compute: Callable[[], dict[str, Any]], reusable: Callable[[dict[str, Any]], bool],
           force: bool = False) -> dict[str, Any]:
    """The JSON object stored at ``path`` if ``reusable(stored)`` says it is, else ``compute()`` written there
    (atomically) and returned. The one way MALLOC reuses a computed JSON result (anchors, a scheme's evaluation,
    a sensitivity curve): ``reusable`` checks that the stored object is of the same identity and well formed, so a
    stale, corrupt or malformed file is recomputed (a corrupt one is logged), never used. ``force`` recomputes.
    """
    stored = None if force else read_json_object(path)
    if stored is not None and reusable(stored):
        log.info("%s exists; reusing it (--force recomputes)", path)
        return stored
    value = compute()
    atomic_write_json(path, value)
    return json.loads(json.dumps(to_jsonable(value)))


def same_identity(identity: Mapping[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """A ``reusable`` test for :func:`cached`: the stored object's ``identity`` equals ``identity`` (as JSON)."""
    expected = json.loads(json.dumps(to_jsonable(identity), sort_keys=True))
    return lambda stored: stored.get("identity") == expected


CTR_METRICS = ("auc", "gauc", "logloss")


def metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    """What makes a stored metrics object unusable, or None: it must hold one task's metrics (CTR: auc, gauc,
    logloss; retrieval: mrr and every hr@K, ndcg@K), every one a number in its range ([0, 1], logloss >= 0)."""
    if "auc" in metrics or "gauc" in metrics:
        keys: tuple[str, ...] = CTR_METRICS
    else:
        keys = ("mrr", *(k for k in metrics if k.startswith(("hr@", "ndcg@"))))
    for key in keys:
        value = metrics.get(key)
        limit = math.inf if key == "logloss" else 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= limit:
            return f"{key} is {value!r}, expected a number in [0, {limit:g}]"
    return None


def check_writable(folder: str | Path) -> None:
    """Fail early, before any compute, where results cannot be written under ``folder`` (created if missing).

    Writes and removes a probe file (permission bits alone say nothing for root or on read-only mounts).

    Raises:
        ResultsError: naming the folder and the reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ResultsError(f"{folder}: cannot write results there ({exc.strerror or exc}); choose another folder "
                           "(results_dir, --results) or fix its permissions") from exc


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
    def identity_path(self) -> Path:
        return self.root / "identity.json"

    @property
    def error_path(self) -> Path:
        return self.root / "error.json"

    def is_done(self) -> bool:
        """Whether the run completed: its done marker, metrics and meters are all readable JSON objects.

        A corrupt one is logged (naming the file) and the run counts as not done, so it is recomputed (training
        resumes from ``last.pt``); a missing marker is a run that has not finished.
        """
        if not self.done_path.is_file():
            return False
        done, metrics, meters = (read_json_object(path) for path in (self.done_path, self.metrics_path,
                                                                     self.meters_path))
        problem = metrics_problem(metrics) if metrics is not None else None
        if problem is not None:
            log.warning("%s: %s; recomputing it", self.metrics_path, problem)
        return done is not None and metrics is not None and meters is not None and problem is None

    def read_result(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(metrics, meters)`` of a done run (:meth:`is_done` checked they are JSON objects)."""
        metrics, meters = read_json(self.metrics_path), read_json(self.meters_path)
        assert isinstance(metrics, dict) and isinstance(meters, dict)
        return metrics, meters

    def claim(self, identity: Mapping[str, Any]) -> None:
        """Record the run's identity (what its hash covers), or check it against the one recorded.

        Raises:
            ResultsError: the folder holds a run of another identity (a hand-edited file or a hash collision), or
                an unreadable identity file; naming the folder and the first key that differs.
        """
        expected = json.loads(json.dumps(to_jsonable(identity), sort_keys=True))
        if not self.identity_path.is_file():
            atomic_write_json(self.identity_path, expected)
            return
        stored = read_json(self.identity_path)
        if stored != expected:
            raise ResultsError(f"{self.root} holds a run of another config ({_first_difference(stored, expected)}); "
                               "it was edited by hand or its hash collides: delete the folder or rerun with --force")

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
        if self.root.exists() and not self.root.is_dir():
            raise ResultsError(f"{self.root}: not a run folder (a file is in its place); delete it or choose "
                               "another results_dir")
        if path.exists() and not path.is_file():
            raise ResultsError(f"{path}: not a lock file; delete it")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read_error(self) -> dict[str, Any] | None:
        """The recorded failure, or None (also where the record is unreadable)."""
        return read_json_object(self.error_path)

    def clear(self) -> None:
        """Delete the run directory, or everything in it but its lock file if it has one (for ``--force``).

        Refuses a directory whose name is not ``<name>-<8 hex>``, so a mistyped root cannot wipe other data.
        """
        if not _RUN_DIR.match(self.root.name):
            raise ResultsError(f"refusing to clear {self.root}: not a run directory named <name>-<8 hex hash>")
        if self.root.is_symlink() or self.root.is_file():
            raise ResultsError(f"refusing to clear {self.root}: not a directory; delete it by hand")
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


def _first_difference(stored: Any, expected: Any, where: str = "") -> str:
    """``key: stored X, resolved Y`` for the first dotted key at which two JSON values differ."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        for key in sorted(set(stored) | set(expected)):
            if stored.get(key, "<missing>") != expected.get(key, "<missing>"):
                return _first_difference(stored.get(key, "<missing>"), expected.get(key, "<missing>"),
                                         f"{where}.{key}" if where else key)
    return f"{where or 'identity'}: stored {json.dumps(stored)[:80]}, resolved {json.dumps(expected)[:80]}"


__all__ = [
    "RunDir",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "cached",
    "check_writable",
    "load_checkpoint",
    "metrics_problem",
    "read_json",
    "read_json_object",
    "same_identity",
    "to_jsonable",
]
