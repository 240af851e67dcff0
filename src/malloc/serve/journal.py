"""Resuming a replay exactly: checkpoints of the cursor and meters, and an undo log that takes the store back to
the checkpoint.

The store and the checkpoint file cannot change in one transaction, so between two checkpoints the store runs
ahead: a process killed after request ``c + 5`` leaves states that already hold requests ``c + 1 .. c + 5`` while
the checkpoint says ``c``. Serving them again would append their events twice. The undo log prevents it:

- before the first change to a user's entry after a checkpoint (a put, a recompression, a drop), the entry's
  bytes as they were at the checkpoint (or "absent") are appended to ``undo-<epoch>.log`` and flushed to the
  operating system (so they survive the process being killed; like the stores, not a power cut);
- a checkpoint writes ``checkpoint.npz`` atomically (cursor, meters, predictions, the allocator's arrays, the epoch
  ``e + 1``), then removes ``undo-<e>.log``;
- resuming reads the checkpoint, puts back every pre-image of ``undo-<epoch>.log`` (deleting entries that were
  absent), truncates it, and serves from the cursor. The store is then what it was at the checkpoint, and every
  request after the cursor is served once, from the same states: the predictions equal an uninterrupted replay's.

A record is ``key length (uint32), key (UTF-8), value length (int64, -1: absent), value``; a record cut short by
the kill protects a change that never happened and is ignored.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import IO, Any

import numpy as np

from malloc.results import atomic_file
from malloc.serve.options import ServeError
from malloc.serving.store import Store

_HEAD = struct.Struct("<Iq")
CHECKPOINT = "checkpoint.npz"


class UndoLog:
    """Pre-images of the entries changed since the last checkpoint (module docstring).

    Args:
        folder: the worker's checkpoint folder.
        epoch: the checkpoint's epoch (the log's name).
    """

    def __init__(self, folder: Path, epoch: int) -> None:
        self.folder = folder
        self.epoch = epoch
        self.touched: set[str] = set()
        self._file: IO[bytes] | None = None

    @property
    def path(self) -> Path:
        return self.folder / f"undo-{self.epoch}.log"

    def record(self, key: str, before: bytes | None) -> int:
        """Keep ``before``, the entry at ``key`` as of the checkpoint, unless this epoch already did; returns the
        bytes written to the log."""
        if key in self.touched:
            return 0
        if self._file is None:
            self._file = open(self.path, "ab")
        raw = key.encode("utf-8")
        payload = _HEAD.pack(len(raw), -1 if before is None else len(before)) + raw + (before or b"")
        self._file.write(payload)
        self._file.flush()
        self.touched.add(key)
        return len(payload)

    def restore(self, store: Store) -> int:
        """Put every pre-image of this epoch's log back into ``store``; returns the entries restored. The log is
        then removed (a process killed while restoring restores again: putting a pre-image twice is harmless)."""
        records = read_records(self.path) if self.path.is_file() else []
        for key, before in records:
            if before is None:
                store.delete(key)
            else:
                store.put(key, before)
        self.close()
        self.path.unlink(missing_ok=True)
        self.touched.clear()
        return len(records)

    def advance(self, epoch: int) -> None:
        """Start the log of ``epoch`` (after its checkpoint was written) and remove the previous one."""
        old = self.path
        self.close()
        self.epoch = epoch
        self.touched.clear()
        old.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: Path) -> list[tuple[str, bytes | None]]:
    """The complete records of an undo log, in order (a last record cut short is left out)."""
    data = path.read_bytes()
    records, at = [], 0
    while at + _HEAD.size <= len(data):
        key_len, value_len = _HEAD.unpack_from(data, at)
        end = at + _HEAD.size + key_len + max(value_len, 0)
        if end > len(data):
            break
        key = data[at + _HEAD.size:at + _HEAD.size + key_len].decode("utf-8")
        records.append((key, None if value_len < 0 else data[at + _HEAD.size + key_len:end]))
        at = end
    return records


def save_checkpoint(folder: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``checkpoint.npz`` (a JSON header and arrays, no pickle) atomically."""
    with atomic_file(folder / CHECKPOINT, "wb") as handle:
        np.savez(handle, header=np.array(json.dumps(header, sort_keys=True)), **arrays)


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The header and arrays of ``folder``'s checkpoint, or None where there is none.

    Raises:
        ServeError: a checkpoint that cannot be read (naming the file).
    """
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {name: data[name] for name in data.files if name != "header"}
    except (OSError, ValueError, KeyError) as exc:
        raise ServeError(f"{path}: not a readable serve checkpoint ({exc}); rerun without --resume and with "
                         "--force to start afresh") from exc
    if not isinstance(header, dict):
        raise ServeError(f"{path}: not a serve checkpoint; rerun without --resume and with --force to start afresh")
    return header, arrays


__all__ = ["CHECKPOINT", "UndoLog", "load_checkpoint", "read_records", "save_checkpoint"]
