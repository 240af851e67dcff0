"""KIVI: tuning-free asymmetric 2/4-bit quantization, keys per channel, values per token, full-precision residual."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from malloc.memory.complexity import NATIVE_REQUEST, Complexity
from malloc.memory.knobs import knob
from malloc.memory.quant import QuantizationPolicy, QuantSpec, channel_group

BITS = (4, 2)  # the bit widths KIVI stores, the largest first (the ratio rule tries them in this order)


@dataclass(frozen=True)
class KIVI(QuantizationPolicy):
    """Keys quantized per channel, values per token, the most recent events in full precision (streaming).

    Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024, arXiv 2402.02750
    (reference code ``jy-yuan/KIVI``).

    What it keeps, for ``n`` stored events: the oldest ``q = group * floor(max(n - residual, 0) / group)`` events
    quantized, the last ``n - q`` in full precision (all events below ``residual + group``, then between
    ``residual`` and ``residual + group - 1``). Keys: asymmetric min/max per (head, channel) over groups of
    ``group`` consecutive events (key outliers sit in fixed channels). Values: asymmetric per (head, event) over
    groups of ``min(group, d_v)`` channels (a short last group is allowed). On append the new events join the
    residual and every complete group of ``group`` events beyond the last ``residual`` is flushed to the
    quantized part; quantized events are never re-quantized, so the stored format depends only on ``n``
    (write-then-append equals one write of the same events).

    Knobs:
        bits: 2 or 4, or None (default) to pick it from ``memory_ratio`` (below).
        group: 32, events per key group and channels per value group (clipped to ``d_v``).
        residual: 32, recent events kept in full precision (the paper's 128 would keep 128 of a 1,000-event
            history in full precision: recommender histories are far shorter than LLM contexts).

    Ratio rule: with ``bits=None`` the largest ``bits`` in {4, 2} whose asymptotic ratio (bytes per quantized
    event / Native's, residual amortised) is ``<= memory_ratio``; SchemeError (listing both) if neither is. The
    residual comes on top, so short histories store more than the target (the measured ratio is reported). Stored
    bytes (exact, equal to ``nbytes()``), with fp16 scales and zero points and ``g_v = min(group, d_v)``:
    ``q ceil(H d_k bits/8) + 4 H (q/group) d_k + q ceil(H d_v bits/8) + 4 H q ceil(d_v/g_v)
    + (n - q) H (d_k + d_v) b + 12 n``. Histories shorter than ``residual + group`` events keep everything in
    full precision (measured ratio 1). With explicit ``bits``,
    ``memory_ratio`` plays no part (results report the measured ratio).

    On append the bits picked at write stay (the stored layer carries them) and the ratio follows the formula at
    the new length, which is not monotone: between flushes the residual grows to ``residual + group - 1``
    events, so an appended user can sit above ``memory_ratio`` until the next flush (by the formula, for the
    default model written at n=96 with memory_ratio 0.47: 4 bits at 0.4606; 0.5922 at n=127; 0.3931 at n=128).
    IntactKV and INT8 only get cheaper per event as events arrive.

    By the formula (``predicted_ratio``), for the default model (H=4, d=16, fp32; 524 Native bytes per event,
    68 / 100 per quantized event at 2 / 4 bits): 2 bits -> 0.4431 at n=100, 0.1646 at n=1000; 4 bits -> 0.4821
    and 0.2232.

    Shapes: quantized keys/values ``(H, q, d)`` as ``(q, ceil(H d bits / 8))`` packed uint8; key scales/zeros
    ``(H, q/group, d_k)`` float16; value scales/zeros ``(H, q, ceil(d_v/g_v))`` float16; residual ``(H, n - q, d)``
    in the state dtype; positions ``(1, n)`` int32, timestamps ``(1, n)`` int64.
    """

    bits: int | None = knob(None, int, choices=BITS, optional=True)
    group: int = knob(32, int, low=1)
    residual: int = knob(32, int, low=0)

    name: ClassVar[str] = "kivi"
    summary: ClassVar[str] = "2/4-bit keys per channel, values per token, recent events in full precision"
    complexity: ClassVar[Complexity] = Complexity("L [(n - R) 2 d q / 8 + R 2 d b], q = bits + 2 s / G",
                                                  NATIVE_REQUEST + " (dequantized read)",
                                                  "bits in {2, 4}; residual R, group G fixed")
    bit_choices: ClassVar[tuple[int, ...]] = BITS

    def requested_bits(self) -> int | None:
        return self.bits

    def num_full(self, n: int) -> int:
        return n - self.group * (max(n - self.residual, 0) // self.group)

    def specs(self, key_dim: int, value_dim: int) -> tuple[QuantSpec, QuantSpec]:
        return QuantSpec(self.group, "token"), QuantSpec(channel_group(value_dim, self.group), "channel")
