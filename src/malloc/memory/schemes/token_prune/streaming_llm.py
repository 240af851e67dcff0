"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks (the first events) plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc.core.state import LayerState
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.knobs import knob
from malloc.memory.policy import EvictionPolicy, LayerContext


@dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """Keeps the first ``s`` events of the history (the "attention sinks") and the ``B - s`` most recent ones, the
    same for every head; FIFO on append behind the sinks.

    Softmax models park excess attention on the first tokens, so StreamingLLM keeps them. HSTU's SiLU attention
    has no such sinks (its weights are not normalised over the keys, so no attention has to be parked anywhere)
    and this model has no contextual prefix to protect instead: for HSTU this
    scheme is an ablation of recency (what do the first events add?).

    Knobs:
        memory_ratio: ``B = floor(memory_ratio * n * native_token_bytes / kept_token_bytes)`` events (shared
            selection, so ``B = floor(memory_ratio * n)``), sinks included: ``s + w = B``.
        sink: sink events (default 4, the paper's). Clipped to ``s = min(sink, B - 1)``, so the window always holds
            at least the newest event (a budget of 1 is pure recency). Sinks are the first events *still stored*:
            if a smaller budget earlier evicted some of the first ``sink`` events, the window grows instead.
    Shapes: keys ``(H, B, d_k)``, values ``(H, B, d_v)``, positions/timestamps ``(1, B)``.
    Reference: ``mit-han-lab/streaming-llm`` ``streaming_llm/kv_cache.py`` (``StartRecentKVCache``); kvpress
    ``streaming_llm_press.py``.
    """

    sink: int = knob(4, int, low=0)

    name: ClassVar[str] = "streaming_llm"
    granularity: ClassVar[str] = "token-prune"
    summary: ClassVar[str] = "the first events (attention sinks) + the most recent ones (StreamingLLM)"
    complexity: ClassVar[Complexity] = Complexity("2 L (s + w) d b", kept_request("(s + w)"), "s + w = mr n")

    def score(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return layer.positions[:1].float()

    def protected(self, layer: LayerState, budget: int, ctx: LayerContext) -> torch.Tensor | None:
        return layer.positions[:1] < min(self.sink, budget - 1)
