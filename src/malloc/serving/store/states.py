"""User states in a store: decode on the way out, encode on the way in, and count what could not be used.

:class:`StateStore` is what a replay or a server holds: ``get`` returns the user's state, or None where there is
none to use (missing, corrupt or stale entries alike: the caller recomputes from the event log and ``put``s the
result, which replaces the unusable entry). Unusable entries are counted by reason, never served; the first of each
reason is logged as a warning, the others at debug level.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import torch

from malloc.core.state import UserState
from malloc.serving.store.base import Store
from malloc.serving.store.codec import EntryIdentity, decode, encode
from malloc.serving.store.errors import EntryError

log = logging.getLogger("malloc.serving.store")


class StateStore:
    """A :class:`~malloc.serving.store.base.Store` of user states written for one model and scheme.

    Args:
        store: where the entries live (:func:`~malloc.serving.store.url.open_store`).
        identity: the model and scheme served (:func:`~malloc.serving.store.identity.entry_identity`); an entry of
            another is stale.
        device: where decoded states go (None: the CPU).

    Attributes:
        hits: states returned; misses: ``Counter`` of ``"missing"``, ``"corrupt"``, ``"stale"`` lookups.
    """

    def __init__(self, store: Store, identity: EntryIdentity, device: torch.device | str | None = None) -> None:
        self.store = store
        self.identity = identity
        self.device = device
        self.hits = 0
        self.misses: Counter[str] = Counter()

    def get(self, user: str) -> UserState | None:
        """The state stored for ``user``, or None (missing or unusable: counted in :attr:`misses`)."""
        data = self.store.get(user)
        if data is None:
            self.misses["missing"] += 1
            return None
        try:
            state = decode(data, self.identity, self.device)
        except EntryError as exc:
            self.misses[exc.reason] += 1
            # the first of each kind as a warning; after a model or scheme change every entry is stale
            level = logging.WARNING if self.misses[exc.reason] == 1 else logging.DEBUG
            log.log(level, "store %s: entry of user %r not used (%s: %s); recomputing it", self.store.url, user,
                    exc.reason, exc)
            return None
        self.hits += 1
        return state

    def put(self, user: str, state: UserState) -> int:
        """Store ``state`` for ``user`` (replacing any entry); returns the entry's bytes.

        Raises:
            StoreFull: the store's ``max_bytes`` would be exceeded; nothing was written.
        """
        data = encode(state, self.identity)
        self.store.put(user, data)
        return len(data)

    def delete(self, user: str) -> bool:
        return self.store.delete(user)

    def users(self) -> Iterator[str]:
        return self.store.keys()

    def nbytes(self) -> int:
        return self.store.nbytes()


__all__ = ["StateStore"]
