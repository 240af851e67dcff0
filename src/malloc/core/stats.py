"""Attention statistics that query-aware cache policies score stored events with.

While the serving path computes new events (a write's prefill chunks, or an append), an
:class:`AttentionObserver` folds every layer's attention weights into per-event totals, indexed by the event's
**original position**, so they stay attached to the right event whatever a policy kept or reordered. Only the
user's own events are ever observed as queries (never candidates, which are scored
against the state and never enter it).

Weights are ``|a_ij|``: HSTU's ``|SiLU(.)/N|`` (SiLU dips below zero, and signed sums would cancel) or SASRec's
softmax probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malloc.core.tokens import KVBlock, TokenBatch


@dataclass(frozen=True)
class LayerStats:
    """What one user's observed queries put on each stored event of one layer (index = original position).

    Attributes:
        attention_sum: ``(H, P)`` sum over observed queries of ``|a_qj|``.
        query_count: ``(H, P)`` how many observed queries could see event ``j`` (itself included).
        attention_max: ``(H, P)`` max over observed queries of ``|a_qj|``.
        window_sum: ``(H, P)`` sum over the observation window's queries only.
        window_count: ``(H, P)`` how many window queries could see event ``j``.
        last: ``(H, P)`` ``|a_qj|`` of the latest observed query.
    """

    attention_sum: torch.Tensor
    query_count: torch.Tensor
    attention_max: torch.Tensor
    window_sum: torch.Tensor
    window_count: torch.Tensor
    last: torch.Tensor

    def mean_attention(self) -> torch.Tensor:
        """``(H, P)`` sum over the queries that could see each event, divided by their number (a plain sum favours
        old events, which more queries could see)."""
        return self.attention_sum / self.query_count.clamp(min=1)


class AttentionObserver:
    """Accumulates :class:`LayerStats` for a batch of users over the chunks of one write or one append.

    Args:
        layers, heads: model shape.
        end_positions: ``(B,)`` position after each user's last event of this operation.
        window: the observation window: queries at positions ``>= end - window`` also count in ``window_*``.
    """

    def __init__(self, layers: int, heads: int, end_positions: torch.Tensor, window: int) -> None:
        batch = len(end_positions)
        size = int(end_positions.max()) if batch else 0
        device = end_positions.device
        self.end_positions = end_positions
        self.window_start = end_positions - window
        zeros = {"dtype": torch.float32, "device": device}
        self._sum = torch.zeros(layers, batch, heads, size, **zeros)
        self._max = torch.zeros(layers, batch, heads, size, **zeros)
        self._window = torch.zeros(layers, batch, heads, size, **zeros)
        self._last = torch.zeros(layers, batch, heads, size, **zeros)
        self._count = torch.zeros(layers, batch, heads, size, **zeros)
        self._window_count = torch.zeros(layers, batch, heads, size, **zeros)

    def observe(self, layer: int, weights: torch.Tensor, keys: KVBlock, queries: TokenBatch,
                rows: torch.Tensor | None = None) -> None:
        """Fold one layer's weights of one chunk.

        Args:
            weights: ``(b, H, T, S)`` attention of the chunk's queries over ``[stored; chunk]`` keys (0 if unseen).
            keys: the ``S`` keys' metadata (positions and validity, head axis 1 or H).
            queries: the chunk's tokens (only history tokens count as queries).
            rows: ``(b,)`` the batch rows of the chunk's users, when the chunk computes only some of the users
                (:meth:`restrict`); None: all ``B``, in order.
        """
        batch, heads, _, num_keys = weights.shape
        size = self._sum.shape[-1]
        select = slice(None) if rows is None else rows
        is_query = queries.is_history
        w = weights.detach().abs().float() * is_query[:, None, :, None]
        index = keys.positions.expand(batch, heads, num_keys).clamp(0, max(size - 1, 0))
        in_window = (is_query & (queries.positions >= self.window_start[select, None]))[:, None, :, None]
        is_last = (is_query & (queries.positions == self.end_positions[select, None] - 1))[:, None, :, None]
        sees = ((queries.positions[:, None, :, None] >= keys.positions[:, :, None, :])
                & keys.valid[:, :, None, :] & is_query[:, None, :, None]).float()  # (b, 1|H, T, S)
        folds = ((self._sum, w.sum(2), "sum"), (self._max, w.amax(2), "amax"),
                 (self._window, (w * in_window).sum(2), "sum"), (self._last, (w * is_last).sum(2), "sum"),
                 (self._count, sees.sum(2).expand(batch, heads, num_keys).contiguous(), "sum"),
                 (self._window_count, (sees * in_window).sum(2).expand(batch, heads, num_keys).contiguous(), "sum"))
        for total, value, reduce in folds:
            target = total[layer] if rows is None else total[layer, rows]  # the rows' copy, written back below
            if reduce == "sum":
                target.scatter_add_(2, index, value)
            else:
                target.scatter_reduce_(2, index, value, reduce=reduce)
            if rows is not None:
                total[layer, rows] = target

    def restrict(self, rows: torch.Tensor) -> ObservedRows:
        """This observer as a chunk that computes only batch rows ``rows`` ``(b,)`` sees it."""
        return ObservedRows(self, rows)

    @property
    def layers(self) -> int:
        return self._sum.shape[0]

    def nbytes(self) -> int:
        """Bytes of the accumulated statistics."""
        tensors = (self._sum, self._max, self._window, self._last, self._count, self._window_count)
        return sum(t.numel() * t.element_size() for t in tensors)

    def stats(self, layer: int, user: int) -> LayerStats:
        """The statistics of one user and layer, over positions ``0 .. end_position - 1``."""
        n = int(self.end_positions[user])
        return LayerStats(
            attention_sum=self._sum[layer, user, :, :n], query_count=self._count[layer, user, :, :n],
            attention_max=self._max[layer, user, :, :n], window_sum=self._window[layer, user, :, :n],
            window_count=self._window_count[layer, user, :, :n], last=self._last[layer, user, :, :n])


@dataclass(frozen=True)
class ObservedRows:
    """An :class:`AttentionObserver` seen through some rows of its batch: a write's chunk that computes only the
    users whose events reach it folds their weights into their own rows."""

    observer: AttentionObserver
    rows: torch.Tensor

    def observe(self, layer: int, weights: torch.Tensor, keys: KVBlock, queries: TokenBatch) -> None:
        self.observer.observe(layer, weights, keys, queries, rows=self.rows)
