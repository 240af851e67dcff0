"""H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048): per head, recent events plus the
events with the largest accumulated attention, streamed across appends with carried scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc.core.state import LayerState, StoredLayer
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.knobs import knob
from malloc.memory.policy import EvictionPolicy, LayerContext, at_stored, contribution


@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """Keeps, per head, the ``B_r`` most recent events and the ``B - B_r`` heaviest hitters among the others.

    Score of stored event ``j`` in head ``h``: its mean contribution over every history query that saw it,
    ``S_j = sum_i c_ij / (history_len - p_j)`` with ``c_ij = |a_ij| ||v_j||`` (HSTU) or ``a_ij`` (SASRec) and
    ``p_j`` its original position (the mean, not the plain sum of the decode-time H2O: an event at position ``p_j``
    is seen by ``history_len - p_j`` queries, so a sum favours old events for their age alone).

    - Write: ``sum_i`` runs over the whole history (kvpress's prefill variant of H2O).
    - Append: the running sums are carried in ``LayerState.scores`` (``(H, B)`` float32, counted in the budget):
      each kept event's sum grows by the new queries' contributions, a new event starts from theirs, and the union
      is evicted back to the budget (the decode-time H2O loop, one batch of events at a time). The carried value
      is the **sum**; its count is implied by the position: every history query at or after ``p_j`` saw ``j``
      (stored events are never hidden from a head that keeps them), so the count is ``history_len - p_j``.
    - :meth:`evict` called on a layer without carried sums (e.g. by ``Compose``, which stores none) scores with
      what the stats observed alone: ``attention_sum / query_count`` (the same at write).

    Knobs:
        memory_ratio: ``B = floor(memory_ratio * n * native_token_bytes / kept_token_bytes)`` events per head
            (the eviction budget rule; a kept event also costs H int32 positions, H int64 timestamps and H float32
            scores). At ``memory_ratio = 1`` nothing is evicted and the layer stays Native (per-head metadata
            would not fit Native's bytes; nothing needs it).
        recent_fraction: ``B_r = floor(recent_fraction * B)`` most recent events are protected (default 0.5;
            the reference code's 10% + 10% split of a 20% budget); ``1`` is recency (stored per head), ``0`` pure heavy
            hitters.
    Shapes: keys ``(H, B, d_k)``, values ``(H, B, d_v)``, positions/timestamps/scores ``(H, B)``.
    Reference: ``FMInference/H2O`` ``h2o_hf/utils_hh/modify_llama.py``; kvpress ``observed_attention_press.py``.
    """

    recent_fraction: float = knob(0.5, float, low=0.0, high=1.0)

    name: ClassVar[str] = "h2o"
    granularity: ClassVar[str] = "token-prune"
    summary: ClassVar[str] = "per head, recent events + heavy hitters by accumulated attention (H2O)"
    complexity: ClassVar[Complexity] = Complexity("2 L B d b + 4 L H B (carried scores)",
                                                  kept_request("B") + " + L H t B (score update)", "B_h + B_r = mr n")
    needs_attention: ClassVar[bool] = True
    per_head: ClassVar[bool] = True
    carries_scores: ClassVar[bool] = True

    def score(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        if layer.scores is None:
            assert stats is not None, "h2o needs attention statistics"
            return contribution(stats.attention_sum, layer, ctx) / at_stored(stats.query_count, layer).clamp(min=1)
        return layer.scores / (ctx.history_len - layer.positions).float()

    def protected(self, layer: LayerState, budget: int, ctx: LayerContext) -> torch.Tensor | None:
        recent = int(self.recent_fraction * budget + 1e-9)
        return layer.positions >= ctx.history_len - recent

    def compress(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> StoredLayer:
        if self.memory_ratio >= 1.0:
            return layer
        assert stats is not None, "h2o needs attention statistics"
        return self.evict(layer.with_scores(contribution(stats.attention_sum, layer, ctx)), stats, ctx)

    def merge(self, stored: StoredLayer, new: LayerState, stats: LayerStats | None, ctx: LayerContext
              ) -> StoredLayer:
        assert isinstance(stored, LayerState)
        if self.memory_ratio >= 1.0:
            return stored.extend(new)
        assert stats is not None, "h2o needs attention statistics"
        assert stored.scores is not None, "h2o: the stored layer carries no scores (not written by h2o)"
        union = stored.extend(new)
        carried = torch.cat([stored.scores.expand(union.heads, -1),
                             stored.scores.new_zeros(union.heads, new.num_tokens)], dim=1)
        return self.evict(union.with_scores(carried + contribution(stats.attention_sum, union, ctx)), stats, ctx)

