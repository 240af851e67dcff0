"""SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469): the last events vote on which earlier events each head keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from malloc.core.state import LayerState
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.knobs import knob
from malloc.memory.policy import EvictionPolicy, LayerContext, contribution


@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """Keeps, per head, the observation window (the last ``window`` events) plus the ``B - window`` earlier events
    with the most pooled votes from the window's queries.

    Votes of an earlier event ``j``: ``sum_{i in window} c_ij`` with ``c_ij = |a_ij| ||v_j||`` (HSTU: the norm of
    the event's term in the output, :func:`~malloc.memory.policy.contribution`) or ``a_ij`` (SASRec); every window
    query sees every earlier event, so the sum needs no count. Votes are smoothed by a 1-D max pool of width
    ``kernel`` over the earlier events in stored (chronological) order, the window's own events excluded (they are
    kept anyway), as SnapKV pools ``attn[..., :-window]``.

    - Write: the window is the history's last ``window`` events.
    - Append: the observed queries are the new events: the window is the last ``window`` positions, and those of
      them that are new vote (all of them once ``window`` or more events arrive at once); stored events were kept
      by earlier votes and are re-scored by these, then the union is evicted back to the budget. Pooling runs
      over each head's stored order (neighbours in what the head kept, as a compressing decode-time SnapKV does).
    - ``B < window``: the ``B`` most recent events.

    Knobs:
        memory_ratio: ``B = floor(memory_ratio * n * native_token_bytes / kept_token_bytes)`` events per head,
            window included (eviction budget rule; per-head int32 positions and int64 timestamps are counted). At
            ``memory_ratio = 1`` nothing is evicted and the layer stays Native.
        window: observation window in events (default 8; the paper uses 32 tokens of much longer prompts).
        kernel: max-pooling width, odd (default 5, as the paper's; pooling is max as in KVCache-Factory, the paper
            averages).
    Shapes: keys ``(H, B, d_k)``, values ``(H, B, d_v)``, positions/timestamps ``(H, B)``.
    Reference: ``FasterDecoding/SnapKV`` ``snapkv/monkeypatch/snapkv_utils.py``; kvpress ``snapkv_press.py``.
    """

    window: int = knob(8, int, low=1)
    kernel: int = knob(5, int, low=1, odd=True)

    name: ClassVar[str] = "snapkv"
    granularity: ClassVar[str] = "token-prune"
    summary: ClassVar[str] = "per head, the last events + earlier events their queries vote for (SnapKV)"
    complexity: ClassVar[Complexity] = Complexity("2 L B d b", kept_request("B") + " + L H t B (window votes)",
                                                  "B = mr n (window inside)")
    needs_attention: ClassVar[bool] = True
    per_head: ClassVar[bool] = True

    @property
    def observation_window(self) -> int:  # type: ignore[override]
        return self.window

    def score(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        assert stats is not None, "snapkv needs attention statistics"
        votes = contribution(stats.window_sum, layer, ctx)
        if layer.num_tokens == 0:
            return votes
        earlier = layer.positions < ctx.history_len - self.window
        votes = votes.masked_fill(~earlier, float("-inf"))  # pool over the earlier events only (-inf = padding)
        return F.max_pool1d(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]

    def protected(self, layer: LayerState, budget: int, ctx: LayerContext) -> torch.Tensor | None:
        return layer.positions >= ctx.history_len - self.window

