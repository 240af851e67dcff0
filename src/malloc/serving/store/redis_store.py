"""The Redis store (``redis://host:port/db``): entries on a Redis server, shared by every process that reaches it.

Needs the PyPI package ``redis`` (the ``serve`` extra) and a running ``redis-server``. Keys live under a prefix
(``prefix``, default ``malloc:``): an entry at ``<prefix>e:<key>``, the total of the values' sizes at
``<prefix>nbytes``. ``put`` and ``delete`` are Lua scripts, so the size check, the write and the total change
together even with several clients. Every socket operation has a timeout: a server that is down or unreachable
raises :class:`~malloc.serving.store.errors.StoreUnavailable` within ``connect_timeout`` seconds (opening pings
the server), one that stops answering within ``timeout`` seconds; nothing is retried. A server past its own
``maxmemory`` (with the ``noeviction`` policy) refuses writes: :class:`~malloc.serving.store.errors.StoreFull`.
A Redis Cluster node is refused when opened (``cluster_enabled:1``): a cluster is opened as ``redis+cluster://``
(:mod:`.redis_cluster_store`, a subclass keeping the same scripts with per-slot totals).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from malloc.serving.store.base import Store, Value
from malloc.serving.store.errors import StoreError, StoreFull, StoreUnavailable

DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_PREFIX = "malloc:"

# KEYS: entry, total; ARGV: value, capacity (-1: none). Returns {1, total after} or {0, old size, total}.
_PUT = """
local old = redis.call('STRLEN', KEYS[1])
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
local new = string.len(ARGV[1])
local cap = tonumber(ARGV[2])
if cap >= 0 and total - old + new > cap and new > old then
  return {0, old, total}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], total - old + new)
return {1, total - old + new}
"""
# KEYS: entry, total. Returns 1 if the entry was there.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('DECRBY', KEYS[2], redis.call('STRLEN', KEYS[1]))
redis.call('DEL', KEYS[1])
return 1
"""


def _redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise StoreError("redis:// stores need the PyPI package redis (pip install 'malloc-bench[serve]')") from exc
    return redis


def no_retry() -> Any:
    """The client's retry setting of every Redis store: none (an error is raised at once, within the timeouts)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (the cluster client's messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(Store):
    """Entries on a Redis server.

    Args:
        url: the store's URL as shown in errors (a password removed).
        host, port, db: the server and database number; username, password: credentials or None.
        max_bytes: capacity in value bytes, or None.
        prefix: namespace of this store's keys on the server.
        connect_timeout: seconds to wait for a connection; timeout: seconds to wait for an answer.
    Raises:
        StoreUnavailable: no server answered the opening ping within the timeouts.
        StoreError: the redis package is missing, or the server refused the connection's settings.
    """

    # the words of an unreachable-server error (a cluster names its nodes instead)
    unreachable = "no answer from the Redis server"
    expected = "a running redis-server at that address"

    def __init__(self, url: str, host: str, port: int, db: int = 0, *, max_bytes: int | None = None,
                 prefix: str = DEFAULT_PREFIX, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 timeout: float = DEFAULT_TIMEOUT, username: str | None = None, password: str | None = None) -> None:
        super().__init__(url, max_bytes)
        self._setup(prefix, connect_timeout, timeout)
        self._total_key = f"{prefix}nbytes"
        self._open(lambda: self._lib.Redis(host=host, port=port, db=db, username=username, password=password,
                                           socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                                           retry=no_retry(), health_check_interval=0))
        with self._errors(), contextlib.suppress(self._lib.exceptions.ResponseError):  # INFO may be denied
            if self._client.info("cluster").get("cluster_enabled"):
                self.close()
                raise StoreError(f"store {url!r}: {host}:{port} is a Redis Cluster node (cluster_enabled:1); "
                                 "expected redis+cluster://host:port[,host:port...] for a cluster")

    def _setup(self, prefix: str, connect_timeout: float, timeout: float) -> None:
        """The settings every Redis store keeps (before its client exists)."""
        self._lib = _redis()
        self.prefix = prefix
        self._timeouts = (connect_timeout, timeout)

    def _open(self, connect: Callable[[], Any]) -> None:
        """Build the client with ``connect()``, ping, and register the scripts.

        Raises:
            StoreUnavailable: no answer within the timeouts; StoreError: the server refused the settings.
        """
        with self._errors():
            self._client: Any = connect()
        try:
            with self._errors():
                self._client.ping()
        except StoreError:
            self._client.close()
            raise
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._closed = False

    def _entry(self, key: str) -> str:
        """The server's key of the entry at ``key``."""
        self.key_bytes(key)
        return f"{self.prefix}e:{key}"

    def _total_for(self, entry: str) -> str:
        """The server's key of the byte total that counts ``entry`` (one for the whole store here)."""
        return self._total_key

    def _key_of(self, entry: str) -> str:
        """The store's key of the server's key ``entry`` (the inverse of :meth:`_entry`)."""
        return entry[len(self.prefix) + 2:]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The client's errors as one line naming the store: unreachable or slow (StoreUnavailable), out of
        memory (StoreFull), anything else the server refused (StoreError)."""
        if getattr(self, "_closed", False):
            raise StoreError(f"store {self.url!r} is closed")
        errors = self._lib.exceptions
        try:
            yield
        except (errors.ConnectionError, errors.TimeoutError) as exc:
            connect, timeout = self._timeouts
            raise StoreUnavailable(f"store {self.url!r}: {self.unreachable} (connect timeout {connect:g} s, "
                                   f"timeout {timeout:g} s: {one_line(exc)}); expected {self.expected}") from exc
        except errors.ClusterDownError as exc:
            raise StoreUnavailable(f"store {self.url!r}: the Redis Cluster is down ({one_line(exc)}); expected "
                                   "every slot served (cluster_state:ok)") from exc
        except errors.ResponseError as exc:
            if isinstance(exc, getattr(errors, "OutOfMemoryError", ())) or "maxmemory" in str(exc):
                raise StoreFull(f"store {self.url!r} is full: the Redis server is at its maxmemory "
                                f"({one_line(exc)})") from exc
            cluster = (errors.AskError, errors.ClusterCrossSlotError)  # MOVED is an AskError
            hint = "; it is a Redis Cluster node: open it as redis+cluster://" if isinstance(exc, cluster) else ""
            raise StoreError(f"store {self.url!r}: the Redis server refused the command ({one_line(exc)}){hint}"
                             ) from exc
        except errors.RedisError as exc:
            raise StoreError(f"store {self.url!r}: {one_line(exc)}") from exc

    def get(self, key: str) -> bytes | None:
        entry = self._entry(key)
        with self._errors():
            return self._client.get(entry)

    def put(self, key: str, value: Value) -> None:
        entry = self._entry(key)
        capacity = -1 if self.max_bytes is None else self.max_bytes
        with self._errors():
            result = self._put(keys=[entry, self._total_for(entry)], args=[bytes(value), capacity])
        if result[0] == 0:  # refused by the script: raise the same error the other stores raise
            self.check_capacity(key, int(result[1]), memoryview(value).nbytes, int(result[2]))

    def delete(self, key: str) -> bool:
        entry = self._entry(key)
        with self._errors():
            return bool(self._delete(keys=[entry, self._total_for(entry)]))

    def nbytes(self) -> int:
        with self._errors():
            return int(self._client.get(self._total_key) or 0)

    def size(self, key: str) -> int | None:
        entry = self._entry(key)
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            exists, size = pipe.exists(entry).strlen(entry).execute()
        return int(size) if exists else None

    def keys(self) -> Iterator[str]:
        with self._errors():
            found = [self._key_of(raw.decode("utf-8", errors="surrogatepass"))
                     for raw in self._client.scan_iter(match=_glob_escape(self.prefix) + "e:*", count=1000)]
        yield from dict.fromkeys(found)  # SCAN may return a key twice

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._client.close()
            self._closed = True


__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisStore", "no_retry", "one_line"]
