"""Training-free cache policies: what a layer stores for a user, decided at write and kept on every append.

A :class:`CachePolicy` acts on the keys and values of a model trained without compression:

- ``compress(layer, stats, ctx)`` at **write**, after the history was encoded uncompressed;
- ``merge(stored, new, stats, ctx)`` on **append**, after the new events were computed against the stored,
  compressed layer: returns the layer to keep (evict, re-score, requantize) within the budget.

One budget vocabulary, shared with the trained-in schemes: ``memory_ratio`` = target stored bytes / Native stored
bytes of the same layer for the same history. Every policy maps it to its own knob by a rule its docstring states,
and results always carry the ratio measured with ``nbytes()``.

Knobs are declared on the dataclass fields (:mod:`malloc.memory.knobs`) and checked once, in
:meth:`CachePolicy.__post_init__`; each scheme states its complexity formulas on its own class
(``complexity``, :mod:`malloc.memory.complexity`).

:class:`EvictionPolicy` is the score-then-select base: a subclass only returns an importance per stored event
(per head, or shared by heads); the base owns the budget arithmetic, protected events, top-k and gathering, and
stores per-head selections for real (``(H, B)`` keys per head, per-head positions and timestamps counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc.core.state import LayerState, StoredLayer
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity
from malloc.memory.knobs import SchemeError as SchemeError
from malloc.memory.knobs import check_knobs, knob


@dataclass(frozen=True)
class LayerContext:
    """Where a policy acts.

    Attributes:
        layer: layer index; num_layers: ``L``.
        backbone: "hstu" (weights are ``|SiLU(.)|/N``) or "sasrec" (softmax probabilities).
        history_len: events seen by the user after this write or append (= Native's stored events).
        user: index of the user in the served batch (seeds per-user randomness together with positions).
    """

    layer: int
    num_layers: int
    backbone: str
    history_len: int
    user: int = 0


def native_token_bytes(layer: LayerState) -> int:
    """Bytes Native stores per event in one layer: keys and values of all heads, a position and a timestamp."""
    heads, _, key_dim = layer.keys.shape
    return heads * (key_dim + layer.values.shape[2]) * layer.keys.element_size() + 4 + 8


@dataclass(frozen=True)
class CachePolicy:
    """Base of the training-free schemes: what a layer stores at write (``compress``) and on append (``merge``).
    The base keeps everything; :class:`~malloc.memory.schemes.reference.native.Native` is that policy by name.

    A subclass declares its knobs as fields with :func:`~malloc.memory.knobs.knob` (checked here, once) and its
    formulas as ``complexity``.

    Attributes:
        memory_ratio: target stored bytes / Native stored bytes, in (0, 1].
    """

    memory_ratio: float = knob(1.0, float, low=0.0, high=1.0, open_low=True)

    name: ClassVar[str] = ""
    granularity: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    complexity: ClassVar[Complexity | None] = None  # each registered scheme states its own
    needs_attention: ClassVar[bool] = False
    observation_window: ClassVar[int] = 0
    # True only for the policy that keeps everything: the engine then lets every layer keep its own rule (a
    # trained-in scheme's state), and a model whose layers store something else than keys and values accepts it
    keeps_everything: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_knobs(self)

    def compress(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> StoredLayer:
        return layer

    def merge(self, stored: StoredLayer, new: LayerState, stats: LayerStats | None, ctx: LayerContext
              ) -> StoredLayer:
        assert isinstance(stored, LayerState)
        return stored.extend(new)

    def target_bytes(self, layer: LayerState, history_len: int) -> float:
        """The layer's byte budget: ``memory_ratio`` x Native's bytes for ``history_len`` events."""
        return self.memory_ratio * history_len * native_token_bytes(layer)


@dataclass(frozen=True)
class EvictionPolicy(CachePolicy):
    """Score, then select: keep the ``B`` most important events (per head or shared), plus protected ones.

    Budget rule: ``B = floor(memory_ratio * n * native_token_bytes / kept_token_bytes)`` where a kept event costs
    its keys and values plus, per selection row (1 shared, or H per head), an int32 position, an int64 timestamp
    and (if scores are carried) a float32 score. So a per-head selection keeps slightly fewer events than a
    shared one for the same bytes.

    Subclasses set ``per_head`` / ``carries_scores`` and implement :meth:`score`; :meth:`protected` may force
    events in (they count against the budget).
    """

    per_head: ClassVar[bool] = False
    carries_scores: ClassVar[bool] = False

    def score(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        """Importance of each stored event: ``(S, n)`` with ``S = H`` for per-head policies, else 1."""
        raise NotImplementedError

    def protected(self, layer: LayerState, budget: int, ctx: LayerContext) -> torch.Tensor | None:
        """``(S or 1, n)`` bool: events kept whatever their score (within the budget), or None."""
        return None

    def kept_token_bytes(self, layer: LayerState) -> int:
        heads, _, key_dim = layer.keys.shape
        rows = heads if self.per_head else 1
        per_row = 4 + 8 + (4 if self.carries_scores else 0)
        return heads * (key_dim + layer.values.shape[2]) * layer.keys.element_size() + rows * per_row

    def budget(self, layer: LayerState, history_len: int) -> int:
        """Events to keep per head for a user who has seen ``history_len`` events."""
        return math.floor(self.target_bytes(layer, history_len) / self.kept_token_bytes(layer) + 1e-9)

    def compress(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> StoredLayer:
        # ratio 1 is Native: per-head metadata would otherwise make a kept event dearer than Native's
        return layer if self.memory_ratio >= 1.0 else self.evict(layer, stats, ctx)

    def merge(self, stored: StoredLayer, new: LayerState, stats: LayerStats | None, ctx: LayerContext
              ) -> StoredLayer:
        assert isinstance(stored, LayerState)
        union = stored.extend(new)
        return union if self.memory_ratio >= 1.0 else self.evict(union, stats, ctx)

    def evict(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> LayerState:
        """Keep the top-``budget`` events by score (protected first), in chronological order."""
        budget = self.budget(layer, ctx.history_len)
        scores = self.score(layer, stats, ctx).float()
        if not self.per_head and scores.shape[0] != 1:
            scores = scores.mean(0, keepdim=True)
        if budget >= layer.num_tokens and layer.positions.shape[0] == scores.shape[0]:
            return layer
        keep = select_top(scores, self.protected(layer, budget, ctx), min(budget, layer.num_tokens))
        return layer.select(keep)


def at_stored(stat: torch.Tensor, layer: LayerState) -> torch.Tensor:
    """``(H, P)`` statistic indexed by original position -> ``(H, n)`` float32 at each stored event of each head."""
    return stat.float().gather(1, layer.positions.long().expand(layer.heads, -1))


def contribution(stat: torch.Tensor, layer: LayerState, ctx: LayerContext) -> torch.Tensor:
    """An observed attention statistic at each stored event: the size of the event's term in a query's output.

    Args:
        stat: ``(H, P)`` a :class:`LayerStats` field of ``|a|`` (summed, maxed, ...) indexed by original position.
        layer: the stored events (``positions (1 or H, n)``, ``values (H, n, d_v)``).
    Returns:
        ``(H, n)`` float32: ``stat`` at each event; for HSTU times ``||v_j||`` (the contribution ``|a_ij| ||v_j||``,
        the exact norm of the event's term ``a_ij v_j`` in the output), for SASRec the softmax weight itself.
    """
    picked = at_stored(stat, layer)
    if ctx.backbone == "hstu":
        picked = picked * layer.values.float().norm(dim=-1)
    return picked


def select_top(scores: torch.Tensor, protected: torch.Tensor | None, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` highest scores per row, protected entries first, sorted ascending.

    Args:
        scores: ``(S, n)``; protected: ``(S or 1, n)`` bool or None. Ties go to the more recent event.
    Returns:
        ``(S, budget)`` int64.
    """
    n = scores.shape[1]
    # rank key: protected first, then score, then recency (tie-break)
    recency = torch.arange(n, device=scores.device, dtype=torch.float64) / max(n, 1)
    key = scores.double() + 1e-12 * recency
    if protected is not None:  # protected events first (the newest first if they alone exceed the budget)
        key = torch.where(protected, 1e300 * (1.0 + recency), key)
    top = torch.topk(key, budget, dim=1).indices
    return top.sort(dim=1).values
