"""INT8: plain symmetric absmax 8-bit keys and values, one scale per event and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from malloc.core.state import LayerState
from malloc.memory.complexity import NATIVE_REQUEST, Complexity
from malloc.memory.knobs import SchemeError
from malloc.memory.policy import LayerContext
from malloc.memory.quant import QuantizationPolicy, QuantSpec, channel_group


@dataclass(frozen=True)
class Int8(QuantizationPolicy):
    """Every key and value quantized to 8 bits, symmetric absmax per (event, head); nothing in full precision.

    Reference: the standard INT8 KV cache (HF ``QuantizedCache``, vLLM
    ``--kv-cache-dtype``). ``s = max |x| / 127`` per (event, head) over the ``d`` channels, ``Q = round(x / s)`` in
    ``[-127, 127]``; one float16 scale per (event, head) for keys and one for values. Append quantizes the new
    events only.

    Knobs: none besides ``memory_ratio``, which is only checked: the ratio is fixed by the shapes,
    ``(H (d_k + d_v) + 4 H + 12) / (H (d_k + d_v) b + 12)`` for every ``n``; a ``memory_ratio``
    below it raises SchemeError naming the reachable ratio (it depends on the model's shapes, so it is checked at
    write, not by a declaration). By the formula, for the default model (H=4, d=16, fp32): 156/524 = 0.2977
    (about 1/4 of fp32 plus scales and metadata); against bf16 states: 156/268 = 0.5821.

    Shapes: keys/values ``(H, n, d)`` as ``(n, H d)`` uint8 codes (offset by 128), scales ``(H, n, 1)`` float16;
    positions ``(1, n)`` int32, timestamps ``(1, n)`` int64.
    """

    name: ClassVar[str] = "int8"
    summary: ClassVar[str] = "8-bit symmetric keys and values, one scale per event and head"
    complexity: ClassVar[Complexity] = Complexity("L n (2 d + 4 H) (int8 + scales)",
                                                  NATIVE_REQUEST + " (dequantized read)", "fixed (8 bits)")

    def num_full(self, n: int) -> int:
        return 0

    def specs(self, key_dim: int, value_dim: int) -> tuple[QuantSpec, QuantSpec]:
        return (QuantSpec(channel_group(key_dim), "channel", symmetric=True),
                QuantSpec(channel_group(value_dim), "channel", symmetric=True))

    def resolve_bits(self, layer: LayerState, ctx: LayerContext) -> int:
        reachable = self.predicted_ratio(layer, layer.num_tokens, ctx.history_len, 8)
        if self.memory_ratio < reachable - 1e-12:
            raise SchemeError(f"int8: memory_ratio {self.memory_ratio} is below the reachable ratio {reachable:.4f} "
                              f"(fixed by the shapes and state dtype)")
        return 8
