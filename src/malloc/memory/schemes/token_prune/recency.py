"""Recency window (history truncation): the industry default, and the floor every scheme must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc.core.state import LayerState
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.policy import EvictionPolicy, LayerContext


@dataclass(frozen=True)
class Recency(EvictionPolicy):
    """Keeps the ``B`` most recent events of every layer (one selection shared by heads), FIFO on append.

    Knob: ``B`` from ``memory_ratio`` by the eviction budget rule (``B ~= memory_ratio * n``). Reference: kvpress
    ``StreamingLLMPress(n_sink=0)``; the floor any other scheme has to beat at the same ratio.
    Shapes: stored keys ``(H, B, d_k)``, values ``(H, B, d_v)``, positions/timestamps ``(1, B)``.
    """

    name: ClassVar[str] = "recency"
    granularity: ClassVar[str] = "token-prune"
    summary: ClassVar[str] = "the most recent events (history truncation)"
    complexity: ClassVar[Complexity] = Complexity("2 L B d b", kept_request("B"), "B = mr n")

    def score(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return layer.positions[:1].float()
