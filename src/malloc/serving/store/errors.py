"""The errors of the state store: stores that cannot be opened or written, and entries that cannot be used.

Two families, both :class:`~malloc.errors.MallocError` (one line naming the URL, key or entry; the command line
prints it and exits with status 2):

- :class:`StoreError`: the store itself. :class:`StoreFull` (a ``put`` past ``max_bytes``) and
  :class:`StoreUnavailable` (a server that does not answer within the timeout) are its subclasses.
- :class:`EntryError`: one stored entry that must not be used. :class:`CorruptEntry` (its bytes are damaged:
  truncated, a flipped byte, not an entry) and :class:`StaleEntry` (intact, but written by another format version,
  another scheme or knobs, or another model). A caller counts these and treats them as a miss: it recomputes the
  state from the event log and never serves the entry.
"""

from __future__ import annotations

from malloc.errors import MallocError


class StoreError(MallocError):
    """A store that cannot be opened or used: unknown URL scheme, missing or read-only folder, not a store."""


class StoreFull(StoreError):
    """A ``put`` that would take the store past its ``max_bytes``; nothing was written."""


class StoreUnavailable(StoreError):
    """A store server that did not answer within its timeout (down, wrong address, or a network problem)."""


class EntryError(MallocError):
    """A stored entry that must not be used; the caller recomputes the state (a miss).

    Attributes:
        reason: a short tag for counting (``"corrupt"`` or ``"stale"``).
    """

    reason = "unusable"


class CorruptEntry(EntryError):
    """An entry whose bytes are damaged: truncated, a changed byte (checksum mismatch), or not an entry at all."""

    reason = "corrupt"


class StaleEntry(EntryError):
    """An intact entry of another format version, scheme or knobs, or model: valid once, not for this server."""

    reason = "stale"


__all__ = ["CorruptEntry", "EntryError", "StaleEntry", "StoreError", "StoreFull", "StoreUnavailable"]
