"""Uncompressed writes shared by the engines of one model: a training-free sweep prefills each history once.

A training-free policy acts on a write only after the history was encoded uncompressed
(:meth:`malloc.serving.engine.Engine.write`): the prefill's states, and the attention statistics a query-aware
policy reads, do not depend on the policy or its ratio. So every training-free item of a suite that serves one
checkpoint can share one prefill per batch of users, and each item pays only its compression, its appends and its
reads. On long histories this is most of the cost: a long write costs seconds to minutes, and its appends are
milliseconds.

An entry is keyed by the events' content (a digest of items, actions, timestamps and lengths), the prefill chunk
and what the policy observes: nothing, or the attention statistics with its observation window (the window
changes ``window_sum``, and a prefill that records attention is kept apart from one that does not). A hit returns
the very states and observer a fresh prefill would have produced (the prefill is deterministic; tested bit for
bit). Consumers never modify them: stored layers are frozen and every policy builds new tensors.

Entries are evicted least recently used beyond ``max_bytes``; an entry larger than the whole budget is computed
and returned but not kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

from malloc.core.state import UserState
from malloc.core.stats import AttentionObserver
from malloc.core.tokens import Events
from malloc.models.base import SequentialRecommender

Prefill = tuple[list[UserState], AttentionObserver | None]

DEFAULT_MAX_BYTES = 2 * 1024**3


def events_digest(events: Events) -> str:
    """A digest of the events' content: equal digests mean the same users' histories, in the same batch order."""
    digest = hashlib.blake2b(digest_size=20)
    for tensor in (events.lengths, events.items, events.actions, events.timestamps):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def prefill_nbytes(prefill: Prefill) -> int:
    """Bytes an entry holds: every stored layer and last hidden state, and the observer's statistics."""
    states, observer = prefill
    total = sum(state.nbytes() for state in states)
    return total + (0 if observer is None else observer.nbytes())


class PrefillCache:
    """Least-recently-used uncompressed writes of one model.

    Args:
        model: the model whose prefills are cached; an engine of another model refuses the cache.
        max_bytes: budget of the entries kept (default 2 GiB).

    Attributes:
        hits, misses: lookups answered from the cache, and computed.
    """

    def __init__(self, model: SequentialRecommender, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model = model
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, tuple[Prefill, int]] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, events: Events, chunk_size: int, window: int | None, compute: Callable[[], Prefill]) -> Prefill:
        """The prefill of ``events`` (on the model's device), from the cache or from ``compute()``.

        Args:
            chunk_size: the prefill chunk (part of the key: chunking changes the floating-point sums).
            window: None when the policy observes nothing, else its observation window.
            compute: produces the prefill on a miss.
        """
        key = (events_digest(events), chunk_size, window)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key][0]
        self.misses += 1
        prefill = compute()
        size = prefill_nbytes(prefill)
        if size <= self.max_bytes:
            self._entries[key] = (prefill, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return prefill
