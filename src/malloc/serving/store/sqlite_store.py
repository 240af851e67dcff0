"""The embedded SQLite store (``sqlite:///path/to/file.db``): one file, no server, the Python standard library.

Table ``entries(key TEXT PRIMARY KEY, size INTEGER, value BLOB)`` and ``meta(name, value)`` holding the total of
the sizes (``nbytes``), updated in the same transaction as every ``put`` and ``delete``, so the capacity check
reads one row instead of summing the table. A new file gets 64 KiB pages (SQLite's default of 4 KiB chains a
large value over many overflow pages; docs/SERVING.md has both measured). Write-ahead logging
(``journal_mode=WAL``) with ``synchronous=NORMAL``: readers never block the writer, a commit does not wait for
the disk, and an interrupted process never leaves a half-written entry; a power cut may lose the last commits
(entries are recomputable from the event log). Several processes may open one file: writes are serialised by
SQLite's lock (waiting up to ``timeout`` seconds).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from malloc.serving.store.base import Store, Value
from malloc.serving.store.errors import StoreError
from malloc.serving.store.paths import check_store_file

STORE_FORMAT = 1
PAGE_SIZE = 65536  # SQLite's largest page: a 1 MB value spans 16 overflow pages instead of 256
_KEY_BATCH = 1000

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, size INTEGER NOT NULL, value BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('nbytes', 0)",
    f"INSERT OR IGNORE INTO meta (name, value) VALUES ('format', {STORE_FORMAT})",
)


class SQLiteStore(Store):
    """Entries in one SQLite file.

    Args:
        url: the store's URL; path: the database file (created if missing; its folder must exist).
        max_bytes: capacity in value bytes, or None.
        timeout: seconds to wait for another process's write lock.
        page_size: bytes per page of a new file (a power of two from 512 to 65536; an existing file keeps its own).
    Raises:
        StoreError: the folder is missing or read-only, or the file is not a SQLite database of this format.
    """

    def __init__(self, url: str, path: str | Path, max_bytes: int | None = None, timeout: float = 30.0,
                 page_size: int = PAGE_SIZE) -> None:
        super().__init__(url, max_bytes)
        if page_size not in {1 << k for k in range(9, 17)}:
            raise StoreError(f"store {url!r}: page_size must be a power of two from 512 to 65536, got {page_size}")
        self.path = Path(path)
        check_store_file(url, self.path)
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"store {url!r}: cannot open {self.path} ({exc})") from exc
        try:
            self._db.execute(f"PRAGMA page_size={page_size}")  # takes effect in a new file only
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"store {url!r}: {self.path} cannot use write-ahead logging (journal mode {mode})")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._write():
                for statement in _SCHEMA:
                    self._db.execute(statement)
            found = self._db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()[0]
            if found != STORE_FORMAT:
                raise StoreError(f"store {url!r}: {self.path} is a store of format {found}, expected {STORE_FORMAT}")
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"store {url!r}: {self.path} is not a usable SQLite store ({exc})") from exc
        except StoreError:
            self.close()
            raise

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"store {self.url!r} is closed")
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taken at once: ``BEGIN IMMEDIATE``), committed on a clean exit."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors (a full disk, a lock held past the timeout) as one StoreError line."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.url!r}: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        self.key_bytes(key)
        with self._errors():
            row = self._conn().execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: Value) -> None:
        self.key_bytes(key)
        size = memoryview(value).nbytes
        with self._errors(), self._write() as db:
            row = db.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
            total = db.execute("SELECT value FROM meta WHERE name = 'nbytes'").fetchone()[0]
            after = self.check_capacity(key, 0 if row is None else row[0], size, total)
            db.execute("INSERT INTO entries (key, size, value) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                       "size = excluded.size, value = excluded.value", (key, size, value))
            db.execute("UPDATE meta SET value = ? WHERE name = 'nbytes'", (after,))

    def delete(self, key: str) -> bool:
        self.key_bytes(key)
        with self._errors(), self._write() as db:
            row = db.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM entries WHERE key = ?", (key,))
            db.execute("UPDATE meta SET value = value - ? WHERE name = 'nbytes'", (row[0],))
        return True

    def nbytes(self) -> int:
        with self._errors():
            return int(self._conn().execute("SELECT value FROM meta WHERE name = 'nbytes'").fetchone()[0])

    def size(self, key: str) -> int | None:
        self.key_bytes(key)
        with self._errors():
            row = self._conn().execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def keys(self) -> Iterator[str]:
        """Keys in order, read in batches (no transaction is held between batches)."""
        last = ""
        while True:
            with self._errors():
                rows = self._conn().execute("SELECT key FROM entries WHERE key > ? ORDER BY key LIMIT ?",
                                            (last, _KEY_BATCH)).fetchall()
            yield from (row[0] for row in rows)
            if len(rows) < _KEY_BATCH:
                return
            last = rows[-1][0]

    def __len__(self) -> int:
        with self._errors():
            return int(self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


__all__ = ["SQLiteStore"]
