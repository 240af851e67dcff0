"""The Redis Cluster store (``redis+cluster://host:port[,host:port...]``): entries spread over a cluster's masters.

Needs the PyPI package ``redis`` (the ``serve`` extra; its cluster client, ``redis.cluster.RedisCluster``) and a
Redis Cluster (``redis-server --cluster-enabled yes``, every slot served). The startup nodes only bootstrap: the
client reads the slot map from the first that answers and then talks to each master directly.

Keys live on the node of their user. The entry of key ``k`` is ``<prefix>e:{k}``: the store key is the hash tag,
so the entry's slot (CRC16 of the tag mod 16384) is chosen by the user alone. The byte total is kept per hash slot,
next to the entries it counts: slot ``s``'s total is at ``<prefix>n:{t_s}``, where ``t_s`` is the first
lowercase hexadecimal number whose CRC16 falls in slot ``s`` (:func:`slot_tags`), so a user's entry and the total
that counts it share one slot, and ``put`` and ``delete`` stay single-slot Lua scripts, atomic on one master as on
a single server. The prefix must not contain ``{`` or ``}`` (it would become the hash tag of every key).

Across the cluster:

- ``get``, ``put``, ``delete``, ``size``: one command on the master of the key's slot.
- ``keys``: ``SCAN`` on every master (each key once).
- ``nbytes``: the sum of the per-slot totals, one read-only script per master over the slots it serves (from
  ``CLUSTER SLOTS``); a sum over several masters, so not one snapshot while others write, and a slot moving
  between masters meanwhile is read again (up to 3 tries).
- ``max_bytes``: a ``put`` that grows its value is checked against ``nbytes()`` read just before it. Exact with one
  writer; writers running at once each see the total before the others' writes, so together they can pass the
  capacity by what they write concurrently (a single server's check is atomic). It costs ``nbytes()`` per growing
  ``put``; the replay (``malloc serve``) keeps its budget itself and opens stores without a capacity.

Every socket operation has a timeout and nothing is retried (MOVED and ASK redirections are followed): a master
that is down or unreachable raises :class:`~malloc.serving.store.errors.StoreUnavailable` within
``connect_timeout`` seconds (opening reads the slot map and pings every master), one that stops answering within
``timeout`` seconds, and a cluster that has marked a master failed (``CLUSTERDOWN``) at once. Keys of the masters
still up stay readable until then. Resharding while the store is written is not supported (a ``TRYAGAIN`` is
raised as a :class:`~malloc.serving.store.errors.StoreError`).
"""

from __future__ import annotations

import binascii
import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from malloc.serving.store.base import Store, Value
from malloc.serving.store.errors import StoreError, StoreUnavailable
from malloc.serving.store.redis_store import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    RedisStore,
    no_retry,
    one_line,
)

SLOTS = 16384

# KEYS: entry. Returns its size in bytes, or -1 where there is none.
_SIZE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
return redis.call('STRLEN', KEYS[1])
"""
# ARGV: the per-slot totals of slots this master serves. Returns their sum. The keys are not declared (they span
# many slots), so the script runs on the master that holds them; a key it does not hold is refused by the server.
_SUM = """
local total = 0
for i = 1, #ARGV do
  total = total + tonumber(redis.call('GET', ARGV[i]) or '0')
end
return total
"""
_SUM_TRIES = 3


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """``(16384,)`` the hash tag of each slot's byte total: the first lowercase hexadecimal number (``0``, ``1``,
    ...) whose CRC16 (XMODEM, Redis Cluster's key hash) is that slot mod 16384. The same in every process."""
    tags: list[str | None] = [None] * SLOTS
    missing, number = SLOTS, 0
    while missing:
        tag = format(number, "x")
        slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        number += 1
    return tuple(tag for tag in tags if tag is not None)


def key_slot(key: str) -> int:
    """The hash slot of a server key, as Redis Cluster computes it: CRC16 of the hash tag (the text between the
    first ``{`` and the next ``}``, where not empty), else of the whole key, mod 16384."""
    raw = key.encode("utf-8", errors="surrogatepass")
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return binascii.crc_hqx(raw, 0) % SLOTS


class RedisClusterStore(RedisStore):
    """Entries on a Redis Cluster (module docstring).

    Args:
        url: the store's URL as shown in errors (a password removed).
        nodes: ``[(host, port), ...]`` startup nodes (any master or replica of the cluster; one answering is enough).
        max_bytes: capacity in value bytes, or None (checked as the module docstring says).
        prefix: namespace of this store's keys (without ``{`` or ``}``).
        connect_timeout: seconds to wait for a connection; timeout: seconds to wait for an answer.
        username, password: credentials or None (the same on every node).
    Raises:
        StoreUnavailable: no node answered, a master did not answer, or not every slot is served.
        StoreError: the redis package is missing, a prefix with braces, or the nodes are not a cluster.
    """

    unreachable = "no answer from a node of the Redis Cluster"
    expected = "every master of the cluster running and reachable"

    def __init__(self, url: str, nodes: list[tuple[str, int]], *, max_bytes: int | None = None,
                 prefix: str = DEFAULT_PREFIX, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 timeout: float = DEFAULT_TIMEOUT, username: str | None = None, password: str | None = None) -> None:
        Store.__init__(self, url, max_bytes)  # RedisStore.__init__ builds a single server's client
        if "{" in prefix or "}" in prefix:
            raise StoreError(f"store {url!r}: prefix {prefix!r} must not contain {{ or }} on a Redis Cluster (the "
                             "store key is each entry's hash tag)")
        if not nodes:
            raise StoreError(f"store {url!r}: no node; expected redis+cluster://host:port[,host:port...]")
        self._setup(prefix, connect_timeout, timeout)
        from redis.cluster import ClusterNode, RedisCluster

        self._open(lambda: RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                                        retry=no_retry(), require_full_coverage=True,
                                        socket_connect_timeout=connect_timeout, socket_timeout=timeout,
                                        username=username, password=password, health_check_interval=0))
        try:
            with self._errors():
                self._client.ping(target_nodes=RedisCluster.PRIMARIES)
        except StoreError:
            self._client.close()
            raise
        self._size = self._client.register_script(_SIZE)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """As a single server's, and the cluster client's own errors (not Redis errors): no node reachable or a
        slot not served (StoreUnavailable), servers that are not a cluster (StoreError)."""
        exceptions = self._lib.exceptions
        try:
            with super()._errors():
                yield
        except exceptions.RedisClusterException as exc:  # SlotNotCoveredError, RedisClusterUnreachableError
            text = one_line(exc)
            if "cluster mode is not enabled" in text.lower() or "cluster_enabled" in text.lower():
                raise StoreError(f"store {self.url!r}: not a Redis Cluster ({text}); expected nodes started with "
                                 "--cluster-enabled yes, or a redis:// URL for a single server") from exc
            connect, timeout = self._timeouts
            raise StoreUnavailable(f"store {self.url!r}: {self.unreachable} (connect timeout {connect:g} s, "
                                   f"timeout {timeout:g} s: {text}); expected {self.expected}, every slot served"
                                   ) from exc

    def _entry(self, key: str) -> str:
        self.key_bytes(key)
        return f"{self.prefix}e:{{{key}}}"

    def _total_for(self, entry: str) -> str:
        return f"{self.prefix}n:{{{slot_tags()[key_slot(entry)]}}}"

    def _key_of(self, entry: str) -> str:
        return entry[len(self.prefix) + 3:-1]

    def put(self, key: str, value: Value) -> None:
        entry = self._entry(key)
        if self.max_bytes is not None:  # checked before, not atomically (module docstring)
            new, old = memoryview(value).nbytes, self.size(key) or 0
            if new > old:
                self.check_capacity(key, old, new, self.nbytes())
        with self._errors():
            self._put(keys=[entry, self._total_for(entry)], args=[bytes(value), -1])

    def size(self, key: str) -> int | None:
        entry = self._entry(key)
        with self._errors():
            size = int(self._size(keys=[entry]))
        return None if size < 0 else size

    def nbytes(self) -> int:
        tags, attempt = slot_tags(), 1
        while True:
            with self._errors():
                try:
                    return sum(self._sum(node, [f"{self.prefix}n:{{{tags[s]}}}" for s in range(start, end + 1)])
                               for (start, end), node in self._masters())
                except self._lib.exceptions.ResponseError as exc:
                    if "non local key" not in str(exc) or attempt == _SUM_TRIES:
                        raise
            attempt += 1  # a slot moved between reading the map and summing: read both again

    def _masters(self) -> list[tuple[tuple[int, int], Any]]:
        """``[((first slot, last slot), master node), ...]`` from ``CLUSTER SLOTS``, read now."""
        ranges = []
        for (start, end), serving in self._client.cluster_slots().items():
            host, port = serving["primary"][:2]
            node = self._client.get_node(host=host, port=int(port))
            if node is None:
                raise StoreError(f"store {self.url!r}: master {host}:{port} serves slots {start}-{end} but is new to "
                                 "this client (the cluster changed since the store was opened); reopen the store")
            ranges.append(((int(start), int(end)), node))
        return ranges

    def _sum(self, node: Any, totals: list[str]) -> int:
        return int(self._client.execute_command("EVAL", _SUM, 0, *totals, target_nodes=node))


__all__ = ["SLOTS", "RedisClusterStore", "key_slot", "slot_tags"]
