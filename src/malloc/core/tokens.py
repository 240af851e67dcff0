"""The token batch every backbone consumes, and the mask rule shared by training and serving.

One event is one token: its embedding is the item embedding plus an action embedding (the event's label in CTR
data; "unknown" for candidates and for label-free data). Keeping one token per event, instead of HSTU's
interleaved item/action tokens, halves the stored state; the action still reaches later tokens, and a target
token never sees its own label.

Mask rule (the same in the full forward, prefill, append and score), for query token ``i`` and key token ``j``:

    visible(i, j) = (j is a history token and pos_j < pos_i) or (j is i)

History tokens are numbered ``0, 1, 2, ...`` from the first stored event, so positions never change when events
are appended. A candidate (target) token placed at position ``p`` sees exactly the first ``p`` history events and
itself, never another candidate, and is never stored. Padding tokens see only themselves (so no row of a softmax
is empty) and are seen by nobody.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ACTION_UNKNOWN, ACTION_NEGATIVE, ACTION_POSITIVE = 0, 1, 2
NUM_ACTIONS = 3


def label_to_action(labels: torch.Tensor) -> torch.Tensor:
    """Map event labels (1, 0, -1 unknown) to action ids (2, 1, 0)."""
    return torch.where(labels < 0, torch.zeros_like(labels), labels + 1).long()


@dataclass
class TokenBatch:
    """A padded batch of tokens: new history events and/or candidates.

    Attributes:
        items: ``(B, T)`` int64 item ids, 0 for padding.
        actions: ``(B, T)`` int64 action ids (``ACTION_*``).
        positions: ``(B, T)`` int64 position of the event (history) or of the event it predicts (candidate).
        timestamps: ``(B, T)`` int64 seconds.
        is_history: ``(B, T)`` bool, True for events that later tokens may see and that enter the state.
        valid: ``(B, T)`` bool, False for padding.
        beacon: ``(B, T)`` bool, True for tokens a scheme added (Activation Beacon's beacons), or None (none).
    """

    items: torch.Tensor
    actions: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor
    is_history: torch.Tensor
    valid: torch.Tensor
    beacon: torch.Tensor | None = None
    # what every layer derives alike from these tokens (the mask and the relative buckets, and against a cache
    # those of the last cache seen, reused by a layer whose cache holds the same events), computed by the first
    # layer that needs it; a new batch (slice, to) starts empty
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.is_history = self.is_history & self.valid

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.items.shape)  # type: ignore[return-value]

    def slice(self, start: int, stop: int) -> TokenBatch:
        """Tokens ``start:stop`` along the time axis."""
        return TokenBatch(*(t[:, start:stop] for t in (self.items, self.actions, self.positions,
                                                       self.timestamps, self.is_history, self.valid)),
                          beacon=None if self.beacon is None else self.beacon[:, start:stop])

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.items, self.actions, self.positions, self.timestamps,
                                                   self.is_history, self.valid)),
                          beacon=None if self.beacon is None else self.beacon.to(device))


@dataclass
class KVBlock:
    """One layer's keys and values of history tokens for a padded batch of users, as attention reads them.

    Key metadata has a head axis of size 1 when every head keeps the same tokens (then masks and biases are
    computed once and broadcast) or of size ``H`` when heads keep different tokens.

    Attributes:
        keys: ``(B, H, n, d_k)``.
        values: ``(B, H, n, d_v)``.
        positions: ``(B, 1 or H, n)`` int64.
        timestamps: ``(B, 1 or H, n)`` int64.
        valid: ``(B, 1 or H, n)`` bool.
        scale: ``(B, 1)`` multiplier of the stored events' HSTU attention weights (the "N = kept" switch of
            docs/DESIGN.md, "Eviction and HSTU's normaliser"), or None (the original normaliser: evicted events
            simply contribute 0).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor
    valid: torch.Tensor
    scale: torch.Tensor | None = None


@dataclass
class KVRows:
    """A batch's stored layers as HSTU's C kernel reads them: each user's keys and values where the user's state
    keeps them, not padded into one block (for a batch of users at long histories that copy was half a request),
    with the small metadata padded as :class:`KVBlock`'s. :meth:`block` pads them for any other reader.

    Attributes:
        row_keys: ``B`` tensors ``(H, n_b, d_k)``; row_values: ``B`` tensors ``(H, n_b, d_v)``.
        positions, timestamps: ``(B, 1, n)`` int64, ``n`` the most ``n_b``; valid: ``(B, 1, n)`` bool, False
            past each user's ``n_b``.
        scale: as :class:`KVBlock`'s.
    """

    row_keys: tuple[torch.Tensor, ...]
    row_values: tuple[torch.Tensor, ...]
    positions: torch.Tensor
    timestamps: torch.Tensor
    valid: torch.Tensor
    scale: torch.Tensor | None = None

    def block(self) -> KVBlock:
        """The same keys padded with zeros into one :class:`KVBlock`."""
        def padded(rows: tuple[torch.Tensor, ...]) -> torch.Tensor:  # B x (H, n_b, d) -> (B, H, n, d)
            out = rows[0].new_zeros(len(rows), rows[0].shape[0], self.positions.shape[-1], rows[0].shape[2])
            for b, row in enumerate(rows):
                out[b, :, :row.shape[1]] = row
            return out

        return KVBlock(padded(self.row_keys), padded(self.row_values), self.positions, self.timestamps, self.valid,
                       self.scale)


def as_block(cache: KVBlock | KVRows | None) -> KVBlock | None:
    """``cache`` as a :class:`KVBlock` (padding :class:`KVRows`)."""
    return cache.block() if isinstance(cache, KVRows) else cache


def visibility(query: TokenBatch, keys: KVBlock | None) -> torch.Tensor:
    """Boolean mask of which keys each query sees, for keys ``[cached; new tokens]``.

    Args:
        query: the ``T`` new tokens (they are also the new keys).
        keys: the cached history block (``n`` keys), or None.
    Returns:
        ``(B, 1 or H, T, n + T)`` bool (head axis as the cache's metadata).
    """
    if keys is None and "visible" in query.memo:
        return query.memo["visible"]
    if keys is not None and "visible-cached" in query.memo:
        (valid, positions), visible = query.memo["visible-cached"]
        if _same(valid, keys.valid) and _same(positions, keys.positions):
            return visible
    length = query.shape[1]
    q_pos = query.positions[:, None, :, None]  # (B, 1, T, 1)
    new_part = (query.is_history[:, None, None, :]
                & (query.positions[:, None, None, :] < q_pos))  # (B, 1, T, T)
    new_part = new_part | torch.eye(length, dtype=torch.bool, device=query.items.device)
    if keys is None:
        query.memo["visible"] = new_part
        return new_part
    cached_part = keys.valid[:, :, None, :] & (keys.positions[:, :, None, :] < q_pos)  # (B, 1|H, T, n)
    visible = torch.cat([cached_part, new_part.expand(-1, cached_part.shape[1], -1, -1)], dim=-1)
    # the next layer's cache usually holds the same events (Native, and every policy that keeps the same events
    # in every layer): its mask is this one
    query.memo["visible-cached"] = (keys.valid, keys.positions), visible
    return visible


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values (the same object, or equal shape and values)."""
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _cat_heads(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Concatenate along tokens (dim 2), broadcasting a size-1 head axis to the other's."""
    heads = max(cached.shape[1], new.shape[1])
    return torch.cat([cached.expand(-1, heads, *cached.shape[2:]), new.expand(-1, heads, *new.shape[2:])], dim=2)


def concat_keys(cache: KVBlock | KVRows | None, new: KVBlock) -> KVBlock:
    """Keys ``[cached; new]`` along the token axis."""
    cache = as_block(cache)
    if cache is None:
        return new
    return KVBlock(*(_cat_heads(c, x) for c, x in zip(
        (cache.keys, cache.values, cache.positions, cache.timestamps, cache.valid),
        (new.keys, new.values, new.positions, new.timestamps, new.valid), strict=True)))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, T, heads * d)`` -> ``(B, heads, T, d)``."""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


def to_query_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat a head axis (dim 1) of size ``G`` to ``heads`` (each stored head serves ``heads / G`` query heads,
    in order); size 1 and ``heads`` are returned as they are (size 1 broadcasts)."""
    groups = x.shape[1]
    return x if groups in (1, heads) else x.repeat_interleave(heads // groups, dim=1)


def group_mean(weights: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H, T, S)`` weights of query heads -> ``(B, groups, T, S)``, averaged over each group's heads."""
    batch, heads, length, keys = weights.shape
    if groups == heads:
        return weights
    return weights.view(batch, groups, heads // groups, length, keys).mean(dim=2)


@dataclass
class Events:
    """New events for a batch of users, padded.

    Attributes:
        items: ``(B, t)`` int64, 0 for padding.
        actions: ``(B, t)`` int64 action ids.
        timestamps: ``(B, t)`` int64.
        lengths: ``(B,)`` int64 number of real events per user (events are left-aligned).
    """

    items: torch.Tensor
    actions: torch.Tensor
    timestamps: torch.Tensor
    lengths: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return torch.arange(self.items.shape[1], device=self.items.device)[None, :] < self.lengths[:, None]

    def to(self, device: torch.device) -> Events:
        return Events(self.items.to(device), self.actions.to(device), self.timestamps.to(device),
                      self.lengths.to(device))

    def slice(self, start: int, stop: int) -> Events:
        return Events(self.items[:, start:stop], self.actions[:, start:stop], self.timestamps[:, start:stop],
                      (self.lengths - start).clamp(0, stop - start))

    def take(self, rows: torch.Tensor) -> Events:
        """The events of users ``rows`` ``(b,)`` only."""
        return Events(self.items[rows], self.actions[rows], self.timestamps[rows], self.lengths[rows])

    def without_labels(self) -> Events:
        """The same events carrying the "unknown" action (the label not yet observed)."""
        return Events(self.items, torch.full_like(self.actions, ACTION_UNKNOWN), self.timestamps, self.lengths)
