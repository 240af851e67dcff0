"""The embedded LMDB store (``lmdb:///path/to/file.lmdb``): one memory-mapped B+tree file, no server.

Needs the PyPI package ``lmdb`` (the ``serve`` extra). Two named databases in one file (``path``, plus LMDB's lock
file ``path-lock``): ``entries`` (key -> value) and ``meta`` (``nbytes``: the total of the values' sizes, updated
in the same transaction as every ``put`` and ``delete``). Opened without a sync at each commit (``sync=False``):
an interrupted process never leaves a half-written entry, a power cut may lose the last commits (entries are
recomputable from the event log), the durability SQLite has with ``synchronous=NORMAL``. The map (the most the
file may grow to) is ``map_size`` bytes of address space, reserved, not written; a put that would grow the file
past it raises :class:`~malloc.serving.store.errors.StoreFull`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from malloc.serving.store.base import Store, Value
from malloc.serving.store.errors import StoreError, StoreFull
from malloc.serving.store.paths import check_store_file

DEFAULT_MAP_SIZE = 1 << 40  # 1 TiB of address space; the file grows with what is stored
_TOTAL = b"nbytes"
_KEY_BATCH = 1000


def _lmdb() -> Any:
    try:
        import lmdb
    except ImportError as exc:
        raise StoreError("lmdb:// stores need the PyPI package lmdb (pip install 'malloc-bench[serve]')") from exc
    return lmdb


class LMDBStore(Store):
    """Entries in one LMDB file.

    Args:
        url: the store's URL; path: the database file (created if missing; its folder must exist).
        max_bytes: capacity in value bytes, or None.
        map_size: the largest the file may grow to (address space reserved).
    Raises:
        StoreError: the folder is missing or read-only, the file is not an LMDB file, or lmdb is not installed.
    """

    def __init__(self, url: str, path: str | Path, max_bytes: int | None = None,
                 map_size: int = DEFAULT_MAP_SIZE) -> None:
        super().__init__(url, max_bytes)
        self._lib = _lmdb()
        self.path = Path(path)
        check_store_file(url, self.path)
        try:
            self._env = self._lib.open(str(self.path), subdir=False, map_size=map_size, max_dbs=2, sync=False,
                                       readahead=False, meminit=False)
            self._entries = self._env.open_db(b"entries")
            self._meta = self._env.open_db(b"meta")
        except self._lib.Error as exc:
            raise StoreError(f"store {url!r}: {self.path} is not a usable LMDB store ({exc})") from exc
        self._closed = False

    @contextlib.contextmanager
    def _txn(self, write: bool = False, buffers: bool = False) -> Iterator[Any]:
        """A transaction (committed on a clean exit, aborted otherwise), LMDB's errors as one StoreError line.
        ``buffers``: values are read as memoryviews into the map (valid until the transaction ends or writes),
        to take a size without copying the value."""
        if self._closed:
            raise StoreError(f"store {self.url!r} is closed")
        try:
            with self._env.begin(write=write, buffers=buffers) as txn:
                yield txn
        except self._lib.MapFullError as exc:
            raise StoreFull(f"store {self.url!r} is full: its file reached map_size ({exc})") from exc
        except self._lib.Error as exc:
            raise StoreError(f"store {self.url!r}: {exc}") from exc

    def _total(self, txn: Any) -> int:
        raw = txn.get(_TOTAL, db=self._meta)
        return 0 if raw is None else int.from_bytes(bytes(raw), "little")

    def get(self, key: str) -> bytes | None:
        raw = self.key_bytes(key)
        with self._txn() as txn:
            return txn.get(raw, db=self._entries)

    def put(self, key: str, value: Value) -> None:
        raw = self.key_bytes(key)
        with self._txn(write=True, buffers=True) as txn:
            old = txn.get(raw, db=self._entries)  # a view: its size without copying it
            after = self.check_capacity(key, 0 if old is None else len(old), memoryview(value).nbytes,
                                        self._total(txn))
            txn.put(raw, value, db=self._entries)
            txn.put(_TOTAL, after.to_bytes(8, "little"), db=self._meta)

    def delete(self, key: str) -> bool:
        raw = self.key_bytes(key)
        with self._txn(write=True, buffers=True) as txn:
            old = txn.get(raw, db=self._entries)
            if old is None:
                return False
            size = len(old)  # taken before the write below invalidates the view
            txn.delete(raw, db=self._entries)
            txn.put(_TOTAL, (self._total(txn) - size).to_bytes(8, "little"), db=self._meta)
        return True

    def nbytes(self) -> int:
        with self._txn() as txn:
            return self._total(txn)

    def size(self, key: str) -> int | None:
        raw = self.key_bytes(key)
        with self._txn(buffers=True) as txn:
            value = txn.get(raw, db=self._entries)
            return None if value is None else len(value)

    def keys(self) -> Iterator[str]:
        """Keys in byte order, read in batches (no transaction is held between batches)."""
        start: bytes | None = None
        while True:
            with self._txn() as txn, txn.cursor(db=self._entries) as cursor:
                found = cursor.set_range(start) if start is not None else cursor.first()
                batch = []
                while found and len(batch) < _KEY_BATCH:
                    key = bytes(cursor.key())
                    if key != start:
                        batch.append(key)
                    found = cursor.next()
            yield from (raw.decode("utf-8", errors="surrogatepass") for raw in batch)
            if not found:
                return
            start = batch[-1]

    def __len__(self) -> int:
        with self._txn() as txn:
            return int(txn.stat(self._entries)["entries"])

    def close(self) -> None:
        if not self._closed:
            self._env.close()
            self._closed = True


__all__ = ["DEFAULT_MAP_SIZE", "LMDBStore"]
