"""IntactKV: the first events kept lossless, the rest quantized per token and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from malloc.memory.complexity import NATIVE_REQUEST, Complexity
from malloc.memory.knobs import knob
from malloc.memory.quant import QuantizationPolicy, QuantSpec, channel_group

BITS = (8, 4, 2)  # the bit widths IntactKV stores, the largest first (the ratio rule tries them in this order)


@dataclass(frozen=True)
class IntactKV(QuantizationPolicy):
    """The ``pivots`` earliest events in full precision; every later event quantized per (event, head).

    Paper: Liu et al., "IntactKV: Improving Large Language Model Quantization by Keeping Pivot Tokens Intact",
    arXiv 2403.01241 (code ``ruikangliu/IntactKV``, which pairs it with an asymmetric per-head dynamic KV
    quantizer).

    What it keeps: the paper keeps the K/V of pivot tokens ([BOS], the system prompt) lossless because softmax
    parks excess attention on them. HSTU's pointwise SiLU attention has no such sinks (its weights are not
    normalised over the keys, so no attention has to be parked anywhere), so here the
    pivots are simply the earliest events, by construction: the analogue of [BOS]/prompt, the events every later
    query can see (an ablation-grade choice for HSTU; for SASRec the literal one). The rest is quantized
    asymmetric min/max per (event, head), one group of ``d`` channels (group = head dim), keys and values alike,
    with float16 scales and zero points. On append, new events fill the pivots while fewer than ``pivots`` are
    stored, and are then quantized; stored codes are never re-quantized.

    Knobs:
        pivots: 4, earliest events kept in full precision.
        bits: 2, 4 or 8 for the quantized events, or None (default) to pick it from ``memory_ratio`` (below).

    Ratio rule: with ``bits=None`` the largest ``bits`` in {8, 4, 2} whose asymptotic ratio (bytes per quantized
    event / Native's, pivots amortised) is ``<= memory_ratio`` (SchemeError listing the reachable ratios if none).
    Stored bytes (exact, equal to ``nbytes()``), with ``p = min(pivots, n)``:
    ``(n - p) (ceil(H d_k bits/8) + ceil(H d_v bits/8) + 8 H) + p H (d_k + d_v) b + 12 n``. The ratio falls toward
    the asymptotic one as events are appended. With explicit ``bits``,
    ``memory_ratio`` plays no part (results report the measured ratio). By the formula (``predicted_ratio``), for
    the default model (H=4, d=16, fp32): 8 bits -> 0.3551 at n=100, 0.3309 at n=1000; 4 bits -> 0.2379, 0.2093;
    2 bits -> 0.1792, 0.1485.

    Shapes: pivots ``(H, p, d)`` in the state dtype; quantized keys/values ``(H, n - p, d)`` as
    ``(n - p, ceil(H d bits / 8))`` packed uint8, scales/zeros ``(H, n - p, 1)`` float16; positions ``(1, n)``
    int32, timestamps ``(1, n)`` int64.
    """

    pivots: int = knob(4, int, low=0)
    bits: int | None = knob(None, int, choices=BITS, optional=True)

    name: ClassVar[str] = "intactkv"
    summary: ClassVar[str] = "the earliest events lossless, the rest quantized per event and head"
    complexity: ClassVar[Complexity] = Complexity("L [P 2 d b + (n - P) 2 d q / 8]",
                                                  NATIVE_REQUEST + " (dequantized read)",
                                                  "bits in {2, 4, 8}; pivots P")
    full_first: ClassVar[bool] = True
    bit_choices: ClassVar[tuple[int, ...]] = BITS

    def requested_bits(self) -> int | None:
        return self.bits

    def num_full(self, n: int) -> int:
        return min(self.pivots, n)

    def specs(self, key_dim: int, value_dim: int) -> tuple[QuantSpec, QuantSpec]:
        return QuantSpec(channel_group(key_dim), "channel"), QuantSpec(channel_group(value_dim), "channel")
