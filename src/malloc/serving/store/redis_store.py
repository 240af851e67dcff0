"""The Redis store (``redis://host:port/db``): entries on a Redis server, shared by every process that reaches it.

Needs the PyPI package ``redis`` (the ``serve`` extra) and a running ``redis-server``. Keys live under a prefix
(``prefix``, default ``malloc:``): an entry at ``<prefix>e:<key>``, the total of the values' sizes at
``<prefix>nbytes``. ``put`` and ``delete`` are Lua scripts, so the size check, the write and the total change
together even with several clients. Every socket operation has a timeout: a server that is down or unreachable
raises :class:`~malloc.serving.store.errors.StoreUnavailable` within ``connect_timeout`` seconds (opening pings
the server), one that stops answering within ``timeout`` seconds; nothing is retried. A server past its own
``maxmemory`` (with the ``noeviction`` policy) refuses writes: :class:`~malloc.serving.store.errors.StoreFull`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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

    def __init__(self, url: str, host: str, port: int, db: int = 0, *, max_bytes: int | None = None,
                 prefix: str = DEFAULT_PREFIX, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 timeout: float = DEFAULT_TIMEOUT, username: str | None = None, password: str | None = None) -> None:
        super().__init__(url, max_bytes)
        self._lib = _redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.prefix = prefix
        self._total_key = f"{prefix}nbytes"
        self._client: Any = self._lib.Redis(host=host, port=port, db=db, username=username, password=password,
                                            socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                                            retry=Retry(NoBackoff(), 0),
                                            health_check_interval=0)
        self._timeouts = (connect_timeout, timeout)
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
        self.key_bytes(key)
        return f"{self.prefix}e:{key}"

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
            raise StoreUnavailable(f"store {self.url!r}: no answer from the Redis server (connect timeout "
                                   f"{connect:g} s, timeout {timeout:g} s: {exc}); expected a running redis-server "
                                   "at that address") from exc
        except errors.ResponseError as exc:
            if isinstance(exc, getattr(errors, "OutOfMemoryError", ())) or "maxmemory" in str(exc):
                raise StoreFull(f"store {self.url!r} is full: the Redis server is at its maxmemory ({exc})") from exc
            raise StoreError(f"store {self.url!r}: the Redis server refused the command ({exc})") from exc
        except errors.RedisError as exc:
            raise StoreError(f"store {self.url!r}: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        entry = self._entry(key)
        with self._errors():
            return self._client.get(entry)

    def put(self, key: str, value: Value) -> None:
        entry = self._entry(key)
        capacity = -1 if self.max_bytes is None else self.max_bytes
        with self._errors():
            result = self._put(keys=[entry, self._total_key], args=[bytes(value), capacity])
        if result[0] == 0:  # refused by the script: raise the same error the other stores raise
            self.check_capacity(key, int(result[1]), memoryview(value).nbytes, int(result[2]))

    def delete(self, key: str) -> bool:
        entry = self._entry(key)
        with self._errors():
            return bool(self._delete(keys=[entry, self._total_key]))

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
        start = len(self.prefix) + 2
        with self._errors():
            found = [raw.decode("utf-8", errors="surrogatepass")[start:]
                     for raw in self._client.scan_iter(match=_glob_escape(self.prefix) + "e:*", count=1000)]
        yield from dict.fromkeys(found)  # SCAN may return a key twice

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._client.close()
            self._closed = True


__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisStore"]
