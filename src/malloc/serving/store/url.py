"""Open a store from a URL: ``memory://``, ``sqlite:///path/to/file.db``, ``lmdb:///path/to/file.lmdb``,
``redis://host:port/db``.

- ``memory://``: nothing may follow.
- ``sqlite://PATH``, ``lmdb://PATH``: everything after ``://`` is the file's path, so ``sqlite:///var/s.db`` is
  the absolute ``/var/s.db`` and ``sqlite://s.db`` is ``s.db`` in the working folder. The folder must exist and
  be writable; the file is created if missing.
- ``redis://[[user]:password@]host[:port][/db][?prefix=P&connect_timeout=S&timeout=S]``: port 6379 and database 0
  by default; ``prefix`` namespaces this store's keys (default ``malloc:``); timeouts in seconds (defaults 2 to
  connect, 10 to answer).

Every mistake is one :class:`~malloc.serving.store.errors.StoreError` line naming the URL (a password shown as
``***``) and what was expected.
"""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from malloc.serving.store.base import Store
from malloc.serving.store.errors import StoreError
from malloc.serving.store.memory_store import MemoryStore

SCHEMES = ("memory", "sqlite", "lmdb", "redis")
# The embedded persistent backend to use unless there is a reason for another: LMDB's puts and gets are faster than
# SQLite's at every value size measured, with much shorter put tails (docs/SERVING.md, "State store").
DEFAULT_PERSISTENT = "lmdb"
EXPECTED = "memory://, sqlite:///path/to/file.db, lmdb:///path/to/file.lmdb or redis://host:port/db"


def shown_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _seconds(url: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise StoreError(f"store {url!r}: {name} must be a number of seconds > 0, got {text!r}")
    return value


def _redis(url: str, shown: str, max_bytes: int | None) -> Store:
    from malloc.serving.store.redis_store import DEFAULT_CONNECT_TIMEOUT, DEFAULT_PREFIX, DEFAULT_TIMEOUT, RedisStore

    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise StoreError(f"store {shown!r}: {exc}; expected redis://host:port/db") from exc
    if not parts.hostname:
        raise StoreError(f"store {shown!r}: no host; expected redis://host:port/db")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise StoreError(f"store {shown!r}: database {path!r} must be a number; expected redis://host:port/db")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"prefix", "connect_timeout", "timeout"})
    if unknown or any(len(values) > 1 for values in query.values()):
        raise StoreError(f"store {shown!r}: unknown or repeated option(s) {', '.join(unknown) or ''}; expected "
                         "prefix, connect_timeout, timeout (each once)")
    options = {key: values[0] for key, values in query.items()}
    prefix = options.get("prefix", DEFAULT_PREFIX)
    if not prefix:
        raise StoreError(f"store {shown!r}: prefix must not be empty")
    return RedisStore(shown, parts.hostname, port, int(path or 0), max_bytes=max_bytes, prefix=prefix,
                      connect_timeout=_seconds(shown, "connect_timeout",
                                               options.get("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))),
                      timeout=_seconds(shown, "timeout", options.get("timeout", str(DEFAULT_TIMEOUT))),
                      username=unquote(parts.username) if parts.username else None,
                      password=unquote(parts.password) if parts.password is not None else None)


def persistent_url(path: str | Path) -> str:
    """The URL of a store file at ``path`` with the default persistent backend (:data:`DEFAULT_PERSISTENT`)."""
    return f"{DEFAULT_PERSISTENT}://{path}"


def open_store(url: str, max_bytes: int | None = None) -> Store:
    """The store ``url`` names (module doc), with a capacity of ``max_bytes`` value bytes (None: unbounded).

    Raises:
        StoreError: an unknown scheme, a malformed URL, a missing or read-only folder, a file that is not a store,
            or a missing client package; StoreUnavailable (a StoreError): a Redis server that does not answer.
    """
    if not isinstance(url, str):
        raise StoreError(f"store URL must be a string, got {type(url).__name__}; expected {EXPECTED}")
    shown = shown_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        what = f"unknown scheme {scheme!r}" if sep else "not a URL"
        raise StoreError(f"store {shown!r}: {what}; expected {EXPECTED}")
    if scheme == "memory":
        if rest:
            raise StoreError(f"store {shown!r}: nothing may follow memory://; expected memory://")
        return MemoryStore(url, max_bytes)
    if scheme == "redis":
        return _redis(url, shown, max_bytes)
    if not rest:
        raise StoreError(f"store {shown!r}: no path; expected {scheme}:///path/to/file")
    path = Path(rest).expanduser()
    if scheme == "sqlite":
        from malloc.serving.store.sqlite_store import SQLiteStore

        return SQLiteStore(url, path, max_bytes)
    from malloc.serving.store.lmdb_store import LMDBStore

    return LMDBStore(url, path, max_bytes)


__all__ = ["DEFAULT_PERSISTENT", "EXPECTED", "SCHEMES", "open_store", "persistent_url", "shown_url"]
