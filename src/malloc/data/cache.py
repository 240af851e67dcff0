"""The parse cache: a data file's parsed sequences kept on disk as NumPy ``.npy`` arrays, memory-mapped on reuse.

Parsing a ratings file of tens of millions of lines costs far more than reading its arrays back, and a memory-mapped
array costs resident memory only for the pages a process touches (they are the page cache's, shared by every process
that maps them: the ranks of a torchrun job, the workers of a suite). :meth:`ParseCache.sequences` returns the
cached :class:`~malloc.data.sequences.Sequences` of a file, or builds them, writes them and returns them mapped.

Where: ``<data cache>/parsed/<reader>-<key hash>/`` (the data cache is ``$MALLOC_DATA_CACHE``, else
``$XDG_CACHE_HOME/malloc``, else ``~/.cache/malloc``), one folder per file and reading. The key holds the reader's
version, every setting that changes what it returns (the source, the label threshold) and the BLAKE2b digest of the
file's bytes (:func:`malloc.data.fingerprint.file_digest`), so an edited file, another threshold or a new reader
is parsed anew, never served stale. A folder is written under a temporary name and renamed into place once
complete, so a reader sees a whole folder or none; one whose ``meta.json`` or arrays do not match their key is
logged and rebuilt. A cache that cannot be written is logged and skipped: the parsed arrays are returned anyway.
Files below ``min_bytes`` are parsed every time (the cache would cost more than it saves);
``MALLOC_PARSE_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malloc.configio import config_hash
from malloc.data.sequences import Sequences

log = logging.getLogger("malloc.data")

CACHE_ENV = "MALLOC_DATA_CACHE"
SWITCH_ENV = "MALLOC_PARSE_CACHE"
DEFAULT_MIN_BYTES = 16 << 20
ARRAYS = ("offsets", "items", "timestamps", "labels", "user_ids", "item_ids")


def data_cache_root() -> Path:
    """``$MALLOC_DATA_CACHE``, else ``$XDG_CACHE_HOME/malloc``, else ``~/.cache/malloc``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "malloc"


@dataclass(frozen=True)
class ParseCache:
    """Parsed sequences on disk under ``root / "parsed"``, for files of at least ``min_bytes`` bytes."""

    root: Path
    min_bytes: int = DEFAULT_MIN_BYTES

    @classmethod
    def default(cls) -> ParseCache | None:
        """The cache under :func:`data_cache_root`; None where ``MALLOC_PARSE_CACHE`` is ``off`` (or 0, no)."""
        if os.environ.get(SWITCH_ENV, "").strip().lower() in ("off", "0", "no", "false"):
            return None
        return cls(data_cache_root())

    def folder(self, reader: str, key: Mapping[str, Any]) -> Path:
        return self.root / "parsed" / f"{reader}-{config_hash(dict(key))}"

    def sequences(self, file: Path, reader: str, key: Mapping[str, Any], build: Callable[[], Sequences]
                  ) -> Sequences:
        """The sequences ``build()`` parses from ``file``, read from the cache where ``key`` (which must hold the
        file's digest) is stored, else built, stored and returned memory-mapped."""
        if file.stat().st_size < self.min_bytes:
            return build()
        folder = self.folder(reader, key)
        expected = json.loads(json.dumps(dict(key), sort_keys=True))
        if folder.is_dir():
            found = _load(folder, expected)
            if found is not None:
                log.info("%s: parsed arrays read from the cache %s", file, folder)
                return found
        seqs = build()
        try:
            _store(folder, expected, seqs)
        except OSError as exc:
            log.warning("%s: the parse cache %s cannot be written (%s); parsing every time", file, folder,
                        exc.strerror or exc)
            return seqs
        log.info("%s: parsed arrays cached in %s", file, folder)
        return _load(folder, expected) or seqs


def _load(folder: Path, key: dict[str, Any]) -> Sequences | None:
    """The sequences stored in ``folder`` for ``key``, memory-mapped, or None (logged) where it does not match."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            raise ValueError("its key differs (a hash collision or an edited meta.json)")
        arrays = {}
        for name in ARRAYS:
            dtype, shape = meta["arrays"][name]
            array = np.load(folder / f"{name}.npy", mmap_mode="c" if int(np.prod(shape)) else None,
                            allow_pickle=False)
            if str(array.dtype) != dtype or list(array.shape) != shape:
                raise ValueError(f"{name}.npy holds {array.dtype} {list(array.shape)}, meta.json says {dtype} {shape}")
            arrays[name] = np.asarray(array)  # a plain ndarray over the mapping
        return Sequences(name=meta["name"], num_items=int(meta["num_items"]), **arrays)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        log.warning("%s: unusable parse cache (%s); parsing again", folder, str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
        return None


def _store(folder: Path, key: dict[str, Any], seqs: Sequences) -> None:
    """Write ``seqs`` to ``folder``: every array, then ``meta.json``, in a temporary folder renamed into place."""
    if any(getattr(seqs, name).dtype.hasobject for name in ARRAYS):
        raise OSError(0, "the arrays hold Python objects, which .npy stores only by pickle")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        arrays = {}
        for name in ARRAYS:
            array = np.ascontiguousarray(getattr(seqs, name))
            with open(temporary / f"{name}.npy", "wb") as handle:
                np.save(handle, array, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            arrays[name] = [str(array.dtype), list(array.shape)]
        meta = {"key": key, "name": seqs.name, "num_items": seqs.num_items, "arrays": arrays}
        with open(temporary / "meta.json", "w", encoding="utf-8") as handle:
            handle.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if folder.exists():  # an unusable folder (_load said why): replaced
            shutil.rmtree(folder)
        try:
            os.rename(temporary, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # another process stored the same key first: its folder is as good as ours
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(temporary)


__all__ = ["ParseCache", "data_cache_root"]
