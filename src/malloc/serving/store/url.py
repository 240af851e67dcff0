"""Open a store from a URL: ``memory://``, ``sqlite:///path/to/file.db``, ``lmdb:///path/to/file.lmdb``,
``redis://host:port/db``, ``redis+cluster://host:port[,host:port...]``.

- ``memory://``: nothing may follow.
- ``sqlite://PATH``, ``lmdb://PATH``: everything after ``://`` is the file's path, so ``sqlite:///var/s.db`` is
  the absolute ``/var/s.db`` and ``sqlite://s.db`` is ``s.db`` in the working folder. The folder must exist and
  be writable; the file is created if missing.
- ``redis://[[user]:password@]host[:port][/db][?prefix=P&connect_timeout=S&timeout=S]``: port 6379 and database 0
  by default; ``prefix`` namespaces this store's keys (default ``malloc:``); timeouts in seconds (defaults 2 to
  connect, 10 to answer).
- ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][?prefix=P&connect_timeout=S&timeout=S]``: a
  Redis Cluster (:mod:`.redis_cluster_store`) reached from any of the startup nodes listed (port 6379 by
  default); no database number (a cluster has only database 0); the options of ``redis://``, and the prefix
  without ``{`` or ``}``.

Every mistake is one :class:`~malloc.serving.store.errors.StoreError` line naming the URL (a password shown as
``***``) and what was expected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from malloc.serving.store.base import Store
from malloc.serving.store.errors import StoreError
from malloc.serving.store.memory_store import MemoryStore

SCHEMES = ("memory", "sqlite", "lmdb", "redis", "redis+cluster")
# The embedded persistent backend to use unless there is a reason for another: LMDB's puts and gets are faster than
# SQLite's at every value size measured, with much shorter put tails (docs/SERVING.md, "State store").
DEFAULT_PERSISTENT = "lmdb"
EXPECTED = ("memory://, sqlite:///path/to/file.db, lmdb:///path/to/file.lmdb, redis://host:port/db or "
            "redis+cluster://host:port[,host:port...]")
CLUSTER = "redis+cluster://host:port[,host:port...]"


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


def _options(shown: str, query: str, expected: str) -> dict[str, Any]:
    """The keyword arguments of a Redis store from a URL's query (prefix, timeouts), checked."""
    from malloc.serving.store.redis_store import DEFAULT_CONNECT_TIMEOUT, DEFAULT_PREFIX, DEFAULT_TIMEOUT

    parsed = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(parsed) - {"prefix", "connect_timeout", "timeout"})
    if unknown or any(len(values) > 1 for values in parsed.values()):
        raise StoreError(f"store {shown!r}: unknown or repeated option(s) {', '.join(unknown) or ''}; expected "
                         f"prefix, connect_timeout, timeout (each once) in {expected}?...")
    options = {key: values[0] for key, values in parsed.items()}
    prefix = options.get("prefix", DEFAULT_PREFIX)
    if not prefix:
        raise StoreError(f"store {shown!r}: prefix must not be empty")
    return {"prefix": prefix,
            "connect_timeout": _seconds(shown, "connect_timeout",
                                        options.get("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))),
            "timeout": _seconds(shown, "timeout", options.get("timeout", str(DEFAULT_TIMEOUT)))}


def _credentials(parts: SplitResult) -> dict[str, str | None]:
    return {"username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None}


def _redis(url: str, shown: str, max_bytes: int | None) -> Store:
    from malloc.serving.store.redis_store import RedisStore

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
    options = _options(shown, parts.query, "redis://host:port/db")
    return RedisStore(shown, parts.hostname, port, int(path or 0), max_bytes=max_bytes, **options,
                      **_credentials(parts))


def _redis_cluster(url: str, shown: str, max_bytes: int | None) -> Store:
    from malloc.serving.store.redis_cluster_store import RedisClusterStore

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise StoreError(f"store {shown!r}: {exc}; expected {CLUSTER}") from exc
    hosts = parts.netloc.rpartition("@")[2]
    nodes = []
    for item in hosts.split(","):
        try:
            node = urlsplit(f"//{item}")
            port = node.port or 6379
        except ValueError as exc:
            raise StoreError(f"store {shown!r}: node {item!r}: {exc}; expected {CLUSTER}") from exc
        if not node.hostname:
            raise StoreError(f"store {shown!r}: node {item!r} has no host; expected {CLUSTER}")
        nodes.append((node.hostname, port))
    if parts.path.strip("/") not in ("", "0"):
        raise StoreError(f"store {shown!r}: a Redis Cluster has only database 0, got {parts.path!r}; expected "
                         f"{CLUSTER}")
    return RedisClusterStore(shown, nodes, max_bytes=max_bytes, **_options(shown, parts.query, CLUSTER),
                             **_credentials(parts))


def persistent_url(path: str | Path) -> str:
    """The URL of a store file at ``path`` with the default persistent backend (:data:`DEFAULT_PERSISTENT`)."""
    return f"{DEFAULT_PERSISTENT}://{path}"


def open_store(url: str, max_bytes: int | None = None) -> Store:
    """The store ``url`` names (module doc), with a capacity of ``max_bytes`` value bytes (None: unbounded).

    Raises:
        StoreError: an unknown scheme, a malformed URL, a missing or read-only folder, a file that is not a store,
            or a missing client package; StoreUnavailable (a StoreError): a Redis server or cluster that does not
            answer.
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
    if scheme == "redis+cluster":
        return _redis_cluster(url, shown, max_bytes)
    if not rest:
        raise StoreError(f"store {shown!r}: no path; expected {scheme}:///path/to/file")
    path = Path(rest).expanduser()
    if scheme == "sqlite":
        from malloc.serving.store.sqlite_store import SQLiteStore

        return SQLiteStore(url, path, max_bytes)
    from malloc.serving.store.lmdb_store import LMDBStore

    return LMDBStore(url, path, max_bytes)


__all__ = ["DEFAULT_PERSISTENT", "EXPECTED", "SCHEMES", "open_store", "persistent_url", "shown_url"]
