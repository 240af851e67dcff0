"""The stored per-user state: what a serving fleet keeps for every user between requests.

A :class:`UserState` holds one stored layer per attention layer, plus the final hidden state of the last event
(the retrieval read) and two counters. A stored layer is anything with ``read()`` (what attention sees),
``nbytes()`` (every byte kept) and ``num_tokens``: the dense :class:`LayerState` (Native, and token selections),
or the formats of other schemes (quantized payloads, ...). ``UserState.nbytes()`` counts everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from malloc.core.tokens import KVBlock, KVRows

# Bytes of the scalar bookkeeping kept per user: next position (int64) and last timestamp (int64).
SCALAR_BYTES = 16
# Spare rows a dense layer keeps past its events when it grows by appending: this fraction of its events (so that
# appends copy the layer once per SPARE_FRACTION * n events instead of on every append)
SPARE_FRACTION = 1 / 8


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``: itself when it already is (skips ``Tensor.to``'s dispatch, which per-user loops
    pay thousands of times a step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def tensor_nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class LayerView:
    """One user's stored layer as attention reads it.

    Attributes:
        keys: ``(H, n, d_k)`` float; values: ``(H, n, d_v)`` float.
        positions: ``(1 or H, n)`` int64 original positions; timestamps: ``(1 or H, n)`` int64.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor


class StoredLayer(Protocol):
    """What every stored-layer format offers."""

    @property
    def num_tokens(self) -> int: ...

    def nbytes(self) -> int: ...

    def read(self) -> LayerView: ...


class Spare:
    """Tensors with room past a dense layer's events, which the layer's tensors are the first ``filled`` rows of.

    A layer whose event count equals ``filled`` is the newest one written into them, so it may append in place:
    its new events go to rows no other layer reads, and the layer it returns reads ``filled`` more rows. Any other
    layer over the same tensors (an older one, appended to again: two requests from one stored state) copies
    instead. Mutable, and not thread-safe: one user's state is appended to by one thread at a time.

    Attributes:
        keys: ``(H, capacity, d_k)``; values: ``(H, capacity, d_v)``; positions: ``(1, capacity)`` int32;
            timestamps: ``(1, capacity)`` int64.
        filled: rows written so far.
    """

    def __init__(self, layer: LayerState, capacity: int) -> None:
        n = layer.num_tokens
        self.keys = layer.keys.new_empty(layer.heads, capacity, layer.keys.shape[2])
        self.values = layer.values.new_empty(layer.heads, capacity, layer.values.shape[2])
        self.positions = layer.positions.new_empty(1, capacity)
        self.timestamps = layer.timestamps.new_empty(1, capacity)
        for mine, theirs in ((self.keys, layer.keys), (self.values, layer.values), (self.positions, layer.positions),
                             (self.timestamps, layer.timestamps)):
            mine[:, :n] = theirs
        self.filled = n

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def append(self, new: LayerState) -> LayerState:
        """Write ``new``'s events after the ``filled`` rows; the layer of all the rows written."""
        start, end = self.filled, self.filled + new.num_tokens
        self.keys[:, start:end] = new.keys
        self.values[:, start:end] = new.values
        self.positions[:, start:end] = new.positions
        self.timestamps[:, start:end] = new.timestamps
        self.filled = end
        return LayerState(self.keys[:, :end], self.values[:, :end], self.positions[:, :end],
                          self.timestamps[:, :end], spare=self)


@dataclass(frozen=True)
class LayerState:
    """Keys and values of stored events, with their original positions and timestamps.

    ``S = 1`` when all heads keep the same events (Native, shared selections); ``S = H`` when each head keeps
    its own (per-head eviction), in which case every head keeps the same number ``n`` of events.

    Attributes:
        keys: ``(H, n, d_k)``; values: ``(H, n, d_v)``, in the state dtype.
        positions: ``(S, n)`` int32; timestamps: ``(S, n)`` int64.
        scores: ``(S, n)`` float32 scores carried across appends (streaming H2O), or None.
        spare: the tensors with room that these are the first rows of (:meth:`extend`), or None. Not part of
            the state: ``nbytes()`` counts the events' bytes, which is what a store keeps; in memory a layer that
            grew by appends holds up to :data:`SPARE_FRACTION` more rows.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor
    scores: torch.Tensor | None = None
    spare: Spare | None = field(default=None, compare=False, repr=False, metadata={"stored": False})

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def heads(self) -> int:
        return self.keys.shape[0]

    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in (self.keys, self.values, self.positions, self.timestamps, self.scores))

    def resident_bytes(self) -> int:
        """The bytes this layer keeps alive in memory: ``nbytes()`` plus its spare rows (at most
        :data:`SPARE_FRACTION` of its events)."""
        if self.spare is None:
            return self.nbytes()
        rows = sum(tensor_nbytes(t) for t in (self.spare.keys, self.spare.values, self.spare.positions,
                                              self.spare.timestamps))
        return rows + tensor_nbytes(self.scores)

    def read(self) -> LayerView:
        return LayerView(self.keys, self.values, self.positions.long(), self.timestamps)

    def extend(self, new: LayerState) -> LayerState:
        """This state followed by ``new`` (a shared-selection state of new events; scores are not carried).

        A layer whose heads share their events appends in place into its spare rows (:class:`Spare`), or into
        new tensors with room for :data:`SPARE_FRACTION` more events when it has none left; outside autograd only
        (a gradient would need the old tensors). A layer whose spare rows a newer layer has taken (a second append
        to one stored state), and a per-head layer, are joined with the new events into tensors without room."""
        sel = self.positions.shape[0]
        in_place = sel == 1 and not (torch.is_grad_enabled() and (self.keys.requires_grad or new.keys.requires_grad))
        spare, end = self.spare, self.num_tokens + new.num_tokens
        taken = spare is not None and spare.filled != self.num_tokens  # a newer layer writes there: join instead
        if in_place and not taken:
            if spare is None or spare.capacity < end:
                spare = Spare(self, end + int(end * SPARE_FRACTION))
            return spare.append(new)
        return LayerState(
            keys=torch.cat([self.keys, as_dtype(new.keys, self.keys.dtype)], dim=1),
            values=torch.cat([self.values, as_dtype(new.values, self.values.dtype)], dim=1),
            positions=torch.cat([self.positions, new.positions.expand(sel, -1)], dim=1),
            timestamps=torch.cat([self.timestamps, new.timestamps.expand(sel, -1)], dim=1),
        )

    def select(self, index: torch.Tensor) -> LayerState:
        """Keep the events at ``index``: ``(1, B)`` the same for all heads, or ``(H, B)`` per head.

        Metadata (positions, timestamps, carried scores) becomes per head as soon as either the selection or
        this state is per head.
        """
        heads = self.heads
        per_head = index.shape[0] > 1 or self.positions.shape[0] > 1
        rows = index.expand(heads, -1)
        meta_index = rows if per_head else index

        def take(meta: torch.Tensor) -> torch.Tensor:
            return (meta.expand(heads, -1) if per_head else meta).gather(1, meta_index)

        return LayerState(
            keys=self.keys.gather(1, rows[:, :, None].expand(-1, -1, self.keys.shape[2])),
            values=self.values.gather(1, rows[:, :, None].expand(-1, -1, self.values.shape[2])),
            positions=take(self.positions),
            timestamps=take(self.timestamps),
            scores=None if self.scores is None else take(self.scores),
        )

    def with_scores(self, scores: torch.Tensor | None) -> LayerState:
        return replace(self, scores=scores)

    @staticmethod
    def empty(heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"
              ) -> LayerState:
        return LayerState(
            keys=torch.zeros(heads, 0, key_dim, dtype=dtype, device=device),
            values=torch.zeros(heads, 0, value_dim, dtype=dtype, device=device),
            positions=torch.zeros(1, 0, dtype=torch.int32, device=device),
            timestamps=torch.zeros(1, 0, dtype=torch.int64, device=device),
        )


@dataclass(frozen=True)
class UserState:
    """Everything stored for one user.

    Attributes:
        layers: one stored layer per attention layer.
        last_hidden: ``(D,)`` final-layer output of the last stored event (the retrieval query); empty
            ``(0,)`` before any event.
        next_position: position the next event will take (= number of events seen).
        last_timestamp: time of the last event seen (0 before any event).
    """

    layers: tuple[StoredLayer, ...]
    last_hidden: torch.Tensor
    next_position: int
    last_timestamp: int

    def nbytes(self) -> int:
        """Exact stored bytes: every stored layer, the last hidden state and the scalar bookkeeping."""
        return sum(layer.nbytes() for layer in self.layers) + tensor_nbytes(self.last_hidden) + SCALAR_BYTES

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens if self.layers else 0


def collate_layers(stored: list[StoredLayer], compute_dtype: torch.dtype) -> KVBlock:
    """Pad one layer of several users' states into the block attention reads.

    Returns:
        KVBlock with ``(B, H, n_max, d)`` keys/values in ``compute_dtype`` and ``(B, 1 or H, n_max)`` metadata
        (H as soon as one user's layer keeps different events per head).
    """
    views = [layer.read() for layer in stored]
    n_max = max(v.keys.shape[1] for v in views)
    sel = max(v.positions.shape[0] for v in views)
    batch, device = len(views), views[0].keys.device
    if all(v.keys.shape[1] == n_max and v.positions.shape[0] == sel for v in views):  # nothing to pad
        return KVBlock(as_dtype(_stack([v.keys for v in views]), compute_dtype),
                       as_dtype(_stack([v.values for v in views]), compute_dtype),
                       _stack([v.positions for v in views]), _stack([v.timestamps for v in views]),
                       torch.ones(batch, sel, n_max, dtype=torch.bool, device=device))
    keys = as_dtype(_padded([v.keys for v in views]), compute_dtype)
    values = as_dtype(_padded([v.values for v in views]), compute_dtype)
    positions = _padded([v.positions.expand(sel, -1) for v in views])
    timestamps = _padded([v.timestamps.expand(sel, -1) for v in views])
    return KVBlock(keys, values, positions, timestamps, _valid(views, n_max).expand(-1, sel, -1))


def collate_rows(stored: list[StoredLayer], compute_dtype: torch.dtype) -> KVRows | None:
    """One layer of several users' states as :class:`KVRows`: each user's keys and values where its state keeps
    them (in ``compute_dtype``: a copy only where the state's dtype differs), the metadata padded as
    :func:`collate_layers` pads it; None when some user's heads keep different events (per-head metadata)."""
    views = [layer.read() for layer in stored]
    if any(v.positions.shape[0] != 1 for v in views):
        return None
    return KVRows(tuple(as_dtype(v.keys, compute_dtype) for v in views),
                  tuple(as_dtype(v.values, compute_dtype) for v in views),
                  _padded([v.positions for v in views]), _padded([v.timestamps for v in views]),
                  _valid(views, max(v.keys.shape[1] for v in views)))


def _valid(views: list[LayerView], n_max: int) -> torch.Tensor:
    """``(B, 1, n_max)`` bool: which of ``n_max`` padded positions hold one of each view's events."""
    device = views[0].keys.device
    lengths = torch.tensor([v.keys.shape[1] for v in views], device=device)
    return (torch.arange(n_max, device=device)[None, :] < lengths[:, None])[:, None, :]


def _padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """B x ``(S, n_b, ...)`` -> ``(B, S, n_max, ...)``, zeros past each ``n_b``."""
    return pad_sequence([t.transpose(0, 1) for t in tensors], batch_first=True).transpose(1, 2)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``; one user's tensor is read in place (a view, not a copy: attention only reads
    the block)."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)
