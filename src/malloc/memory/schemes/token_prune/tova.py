"""TOVA, Token Omission Via Attention (Oren et al., arXiv 2401.06104): keep what the latest event attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc.core.state import LayerState
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.policy import EvictionPolicy, LayerContext, contribution


@dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """Keeps the ``B`` events the latest event attends to most, averaged over heads (one selection per layer).

    Score of stored event ``j``: ``mean_h c^h_tj`` for the latest observed query ``t`` (the user's last event),
    with ``c = |a| ||v_j||`` (HSTU: the norm of the event's term in the output,
    :func:`~malloc.memory.policy.contribution`) or the softmax weight (SASRec). No sink, no recent window.

    - Write: ``t`` is the history's last event; the top ``B`` are kept in one step.
    - Append: ``t`` is the last new event; stored and new events are scored by it and the union is cut back to
      ``B`` at once. TOVA drops one event per decoded token, each by the query of that step; with several new
      events per append, only the latest one decides (earlier new events do not vote), the recommender
      counterpart of one decision per step.

    Knobs:
        memory_ratio: ``B = floor(memory_ratio * n * native_token_bytes / kept_token_bytes)`` events (shared by
            heads: one int32 position and one int64 timestamp per event, so ``B = floor(memory_ratio * n)``).
    Shapes: keys ``(H, B, d_k)``, values ``(H, B, d_v)``, positions/timestamps ``(1, B)``.
    Reference: ``schwartz-lab-NLP/TOVA`` ``src/tova_cache.py``; kvpress ``tova_press.py``.
    """

    name: ClassVar[str] = "tova"
    granularity: ClassVar[str] = "token-prune"
    summary: ClassVar[str] = "the events the latest event attends to most, mean over heads (TOVA)"
    complexity: ClassVar[Complexity] = Complexity("2 L B d b", kept_request("B") + " + L H t B (scores)", "B = mr n")
    needs_attention: ClassVar[bool] = True

    def score(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        assert stats is not None, "tova needs attention statistics"
        return contribution(stats.last, layer, ctx).mean(0, keepdim=True)
