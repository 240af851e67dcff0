"""A hot tier in front of a store: the most recently used entries kept in process, written through.

Serving has three tiers for a user's state: **hot** (its entry in this process's memory), **warm** (in the
shared store: LMDB, SQLite, Redis) and **cold** (no entry anywhere: the state is recomputed from the user's event
log, which the replay counts as a recompute). :class:`HotTier` is the first: a :class:`~malloc.serving.store.
base.Store` that wraps the warm store and keeps up to ``capacity`` bytes of entries, least recently used out.

- ``get`` answers from memory when it can (no round trip, no copy out of the store), else reads the warm store and
  keeps what it read;
- ``put`` and ``delete`` go to the warm store first, then to memory: every entry in memory equals the one in the
  store (write-through), so a crash loses nothing the store would not, and a resumed replay starts with an empty
  hot tier and the same results;
- sizes, keys and capacity are the warm store's: the hot tier holds copies, not extra state.

It is coherent only where one process writes a user's entries, which is how ``malloc serve`` partitions users
among its workers. Entries are kept encoded, so the hot tier's memory is exactly ``capacity`` bytes of values at
most, and a hit still pays ``decode``; an entry larger than the whole capacity is not kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from malloc.serving.store.base import Store, Value
from malloc.serving.store.errors import StoreError


class HotTier(Store):
    """Up to ``capacity`` bytes of ``warm``'s entries in process, least recently used out (module docstring).

    Args:
        warm: the store every write goes to and every miss reads from (closed with the tier).
        capacity: bytes of values kept in memory (> 0).
    Attributes:
        hits, misses: ``get`` calls answered from memory / from the warm store.
    """

    def __init__(self, warm: Store, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise StoreError(f"hot tier of {warm.url!r}: capacity must be a whole number of bytes > 0, "
                             f"got {capacity!r}")
        super().__init__(warm.url, warm.max_bytes)
        self.warm, self.capacity = warm, capacity
        self._kept: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    @property
    def hot_bytes(self) -> int:
        """Bytes of the entries held in memory now."""
        return self._bytes

    def _forget(self, key: str) -> None:
        old = self._kept.pop(key, None)
        if old is not None:
            self._bytes -= len(old)

    def _keep(self, key: str, data: bytes) -> None:
        self._forget(key)
        if len(data) > self.capacity:
            return
        self._kept[key] = data
        self._bytes += len(data)
        while self._bytes > self.capacity:
            _, out = self._kept.popitem(last=False)
            self._bytes -= len(out)

    def get(self, key: str) -> bytes | None:
        data = self._kept.get(key)
        if data is not None:
            self._kept.move_to_end(key)
            self.hits += 1
            return data
        self.misses += 1
        data = self.warm.get(key)
        if data is not None:
            self._keep(key, data)
        return data

    def put(self, key: str, value: Value) -> None:
        data = bytes(value)
        self.warm.put(key, data)  # raises before memory changes if the warm store refuses it
        self._keep(key, data)

    def delete(self, key: str) -> bool:
        self._forget(key)
        return self.warm.delete(key)

    def nbytes(self) -> int:
        return self.warm.nbytes()

    def size(self, key: str) -> int | None:
        return self.warm.size(key)

    def keys(self) -> Iterator[str]:
        return self.warm.keys()

    def close(self) -> None:
        self._kept.clear()
        self._bytes = 0
        self.warm.close()


__all__ = ["HotTier"]
