"""The in-process store (``memory://``): a dict of bytes, the default of the tests and the command line.

Nothing persists past the process; two ``memory://`` stores never share entries.
"""

from __future__ import annotations

from collections.abc import Iterator

from malloc.serving.store.base import Store, Value
from malloc.serving.store.errors import StoreError


class MemoryStore(Store):
    """Values in a dict, their total kept as they change."""

    def __init__(self, url: str = "memory://", max_bytes: int | None = None) -> None:
        super().__init__(url, max_bytes)
        self._values: dict[str, bytes] | None = {}
        self._total = 0

    def _table(self) -> dict[str, bytes]:
        if self._values is None:
            raise StoreError(f"store {self.url!r} is closed")
        return self._values

    def get(self, key: str) -> bytes | None:
        self.key_bytes(key)
        return self._table().get(key)

    def put(self, key: str, value: Value) -> None:
        self.key_bytes(key)
        data = bytes(value)
        old = self._table().get(key)
        self._total = self.check_capacity(key, 0 if old is None else len(old), len(data), self._total)
        self._table()[key] = data

    def delete(self, key: str) -> bool:
        self.key_bytes(key)
        old = self._table().pop(key, None)
        if old is None:
            return False
        self._total -= len(old)
        return True

    def nbytes(self) -> int:
        self._table()  # raises on a closed store
        return self._total

    def size(self, key: str) -> int | None:
        self.key_bytes(key)
        value = self._table().get(key)
        return None if value is None else len(value)

    def keys(self) -> Iterator[str]:
        yield from list(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def close(self) -> None:
        self._values = None


__all__ = ["MemoryStore"]
