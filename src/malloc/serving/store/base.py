"""The one interface of every state store: bytes by key, with their total size and an optional byte capacity.

A store maps keys (user ids as strings) to values (entries of :mod:`malloc.serving.store.codec`, or any bytes).
It counts the bytes of its values (keys and the backend's own overhead are not counted), per key and in total, and
a store opened with ``max_bytes`` refuses a ``put`` that would take that total past it
(:class:`~malloc.serving.store.errors.StoreFull`; replacing a value counts the difference). Which user to evict
is not the store's business: an allocator above it decides, by :meth:`Store.delete`.

The pattern a replay follows (with :class:`~malloc.serving.store.states.StateStore` doing the decoding and the
counting of unusable entries)::

    state = states.get(user)            # None: missing, corrupt or stale -> recompute from the event log
    ...                                 # write / append with the engine
    states.put(user, state)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from types import TracebackType

from malloc.serving.store.errors import StoreError, StoreFull

# bytes of a key's UTF-8 form; LMDB's default limit is 511
MAX_KEY_BYTES = 400

Value = bytes | bytearray | memoryview


class Store(ABC):
    """Bytes by key.

    Args:
        url: the URL the store was opened from (named in every error).
        max_bytes: capacity in value bytes, or None (unbounded).
    """

    def __init__(self, url: str, max_bytes: int | None = None) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 0):
            raise StoreError(f"store {url!r}: max_bytes must be a whole number >= 0 or None, got {max_bytes!r}")
        self.url = url
        self.max_bytes = max_bytes

    # -- the interface -----------------------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value stored at ``key``, or None."""

    @abstractmethod
    def put(self, key: str, value: Value) -> None:
        """Store ``value`` at ``key`` (replacing any value there), atomically.

        Raises:
            StoreFull: the total would exceed ``max_bytes``; nothing was written.
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of all values stored."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Bytes of the value at ``key``, or None where there is none."""

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """Every key, each once (in no promised order; keys put or deleted meanwhile may or may not appear)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection or file; the store is unusable afterwards. Closing twice is allowed."""

    # -- shared ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def __contains__(self, key: str) -> bool:
        return self.size(key) is not None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, max_bytes={self.max_bytes})"

    def key_bytes(self, key: str) -> bytes:
        """``key`` as UTF-8, checked: a non-empty string of at most :data:`MAX_KEY_BYTES` bytes.

        Raises:
            StoreError: naming the store and the key.
        """
        if not isinstance(key, str):
            raise StoreError(f"store {self.url!r}: keys are strings, got {type(key).__name__} {key!r}")
        raw = key.encode("utf-8", errors="surrogatepass")
        if not raw or len(raw) > MAX_KEY_BYTES:
            raise StoreError(f"store {self.url!r}: key {key[:60]!r} must be 1 to {MAX_KEY_BYTES} UTF-8 bytes, "
                             f"got {len(raw)}")
        return raw

    def check_capacity(self, key: str, old: int, new: int, total: int) -> int:
        """The total after replacing ``old`` bytes at ``key`` by ``new`` bytes, if it fits ``max_bytes`` (a value
        that shrinks always fits, so a store reopened with a smaller capacity can still be rewritten).

        Raises:
            StoreFull: naming the store, the key, the sizes and the capacity.
        """
        after = total - old + new
        if self.max_bytes is not None and after > self.max_bytes and new > old:
            raise StoreFull(f"store {self.url!r} is full: putting {key[:60]!r} ({new} B) would hold {after} B, "
                            f"over max_bytes {self.max_bytes} (delete entries first)")
        return after


__all__ = ["MAX_KEY_BYTES", "Store", "Value"]
