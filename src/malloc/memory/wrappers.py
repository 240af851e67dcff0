"""Budget wrappers: policies that take another policy as a field (docs/DESIGN.md, "The budget").

- :class:`Pyramid` (PyramidKV): the same total bytes as its inner eviction policy, split unevenly over layers.
- :class:`Compose`: eviction then precision (e.g. SnapKV + KIVI): the kept events are stored quantized.
- *Uniform* is no class: it is the inner policy itself, which already gives every layer ``memory_ratio``.

Wrappers are registered apart from the schemes (``registry.WRAPPERS``) and built by name with the inner schemes
as names plus knob dicts: ``build_policy("pyramid", 0.25, inner="h2o")``,
``build_policy("compose", 0.125, evict="snapkv", quant="kivi", quant_knobs={"bits": 4})``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from malloc.core.state import LayerState, StoredLayer
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity
from malloc.memory.knobs import SchemeError, knob
from malloc.memory.policy import CachePolicy, EvictionPolicy, LayerContext, native_token_bytes
from malloc.memory.quant import QuantizationPolicy


def pyramid_ratios(memory_ratio: float, num_layers: int, beta: float = 20.0) -> list[float]:
    """Per-layer ratios falling linearly with depth, averaging ``memory_ratio``.

    kvpress form (``B_avg = w + n(1 - CR)``, ``min = (B_avg - w)/beta``, ``max = 2(B_avg - w) - min``, layer ``l``
    keeps ``max - l(max - min)/(L - 1)``) with no window (``w = 0``) and ratios instead of tokens:
    ``r_min = r/beta``, ``r_max = 2r - r_min``. Where ``r_max`` would exceed 1 (``r > beta/(2 beta - 1)``) the
    pyramid flattens to ``r_max = 1``, ``r_min = 2r - 1``: still linear, still averaging ``r``, every ratio in
    ``(0, 1]``. One layer gets ``r``.

    Returns:
        ``L`` ratios, layer 0 (the shallowest) first.
    """
    if num_layers == 1:
        return [memory_ratio]
    top = min(2.0 * memory_ratio - memory_ratio / beta, 1.0)
    bottom = 2.0 * memory_ratio - top
    return [top - layer * (top - bottom) / (num_layers - 1) for layer in range(num_layers)]


@dataclass(frozen=True)
class Pyramid(CachePolicy):
    """PyramidKV (Cai et al., arXiv 2406.02069): layer budgets fall linearly with depth, same total bytes.

    Layer ``l`` is stored by ``replace(inner, memory_ratio=r_l)`` with ``r_l`` from :func:`pyramid_ratios`, so the
    mean over layers of the per-layer targets is ``memory_ratio`` (each layer's own budget rule then floors it).
    The inner policy decides which events (its scores, per head or shared); the wrapper only moves bytes between
    layers. Shallow recommender stacks may prefer the inverse; measure per-layer dispersion first.

    Knobs:
        inner: the eviction policy (any :class:`EvictionPolicy`); its own ``memory_ratio`` is ignored.
        beta: ``r_max / r_min`` of the pyramid (20, kvpress); 1 = uniform (the inner policy itself).
    Shapes: those of the inner policy, with ``B_l ~= r_l n`` events in layer ``l``.
    """

    inner: EvictionPolicy | None = None
    beta: float = knob(20.0, float, low=1.0, why="r_max / r_min")

    name: ClassVar[str] = "pyramid"
    granularity: ClassVar[str] = "token-prune"
    summary: ClassVar[str] = "the inner eviction's events, with budgets falling linearly with depth (PyramidKV)"
    complexity: ClassVar[Complexity] = Complexity("2 sum_l B_l d b, mean_l B_l = mr n", "as the inner scheme",
                                                  "B_l falls with depth")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.inner, EvictionPolicy):  # a policy, not a plain value: no declaration checks it
            raise SchemeError(f"pyramid: inner must be an eviction (score-then-select) scheme, got "
                              f"{getattr(self.inner, 'name', self.inner)!r}")

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return self.inner.needs_attention

    @property
    def observation_window(self) -> int:  # type: ignore[override]
        return self.inner.observation_window

    def layer_ratios(self, num_layers: int) -> list[float]:
        return pyramid_ratios(self.memory_ratio, num_layers, self.beta)

    def layer_policy(self, ctx: LayerContext) -> EvictionPolicy:
        """The inner policy at this layer's ratio."""
        assert self.inner is not None
        return replace(self.inner, memory_ratio=self.layer_ratios(ctx.num_layers)[ctx.layer])

    def compress(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> StoredLayer:
        return self.layer_policy(ctx).compress(layer, stats, ctx)

    def merge(self, stored: StoredLayer, new: LayerState, stats: LayerStats | None, ctx: LayerContext
              ) -> StoredLayer:
        return self.layer_policy(ctx).merge(stored, new, stats, ctx)


def dense_layer(stored: StoredLayer, dtype: torch.dtype | None = None) -> LayerState:
    """A stored layer of any format as a dense :class:`LayerState` (dequantized if quantized, to ``dtype`` if
    given; carried scores dropped)."""
    if isinstance(stored, LayerState):
        return stored.with_scores(None) if stored.scores is not None else stored
    view = stored.read()
    dtype = view.keys.dtype if dtype is None else dtype
    return LayerState(keys=view.keys.to(dtype), values=view.values.to(dtype), positions=view.positions.int(),
                      timestamps=view.timestamps)


@dataclass(frozen=True)
class Compose(CachePolicy):
    """Eviction then precision: keep ``B`` events by the eviction's scores, store them with the quantizer.

    Budget rule (one byte budget for both): the quantizer is fixed by its own knobs; its bits are
    ``quant_knobs["bits"]`` if given, else its largest (the quantizer is built at ratio 1). It reaches
    ``q = q(n) / Native(n)`` alone, so the eviction keeps a fraction ``memory_ratio / q`` of the events. That
    fraction is solved exactly on the quantizer's byte count ``q(B)``: ``B`` is the largest count found by
    bisection with ``q(B) <= memory_ratio x Native bytes of the n events seen`` (``q(B)/B`` rises as ``B`` falls:
    full-precision residual windows and pivots, per-group scales, per-head metadata, so ``memory_ratio / q``
    events would overshoot). Where the quantizer alone already fits (``memory_ratio / q >= 1``: a ratio above
    the quantizer's) nothing is evicted and the measured ratio falls below the target (it is reported);
    ``memory_ratio = 1`` is rejected at build time (nothing to compose). Note ``q(B)`` need not grow with ``B``
    (KIVI flushes a group of residual events at once), so the bisection's ``B`` always fits but may, rarely, be
    a few events short of the largest that fits.

    Write: evict the dense layer, quantize the kept events (per-head selections are stored with ``(H, B)``
    positions, which the precision formats count). Append: dequantize the stored events, add the new ones, evict
    again, requantize the kept ones (as Hugging Face's ``QuantizedCache`` requantizes on flush; requantizing
    dequantized values on unchanged groups reproduces them). Scores carried by streaming evictions are not kept:
    the eviction re-scores from the observed statistics (``H2O.evict`` without carried sums).

    Knobs:
        evict: an :class:`EvictionPolicy` (its ``memory_ratio`` is set by the rule above).
        quant: a precision policy (``granularity == "precision"``) at its own knobs.
    Shapes: the quantizer's format over ``B`` events per head.
    """

    memory_ratio: float = knob(0.5, float, low=0.0, high=1.0, open_low=True, open_high=True,
                               why="at 1 there is nothing to evict")
    evict: EvictionPolicy | None = None
    quant: CachePolicy | None = None

    name: ClassVar[str] = "compose"
    granularity: ClassVar[str] = "token-prune+precision"
    summary: ClassVar[str] = "the eviction's events, stored quantized by the precision scheme (e.g. SnapKV + KIVI)"
    complexity: ClassVar[Complexity] = Complexity("L B 2 d q / 8, B = kept events",
                                                  "as the eviction scheme (dequantized read)",
                                                  "one byte budget: eviction then precision")

    def __post_init__(self) -> None:
        super().__post_init__()
        # policies, not plain values: no declaration checks them
        if not isinstance(self.evict, EvictionPolicy):
            raise SchemeError(f"compose: evict must be an eviction (score-then-select) scheme, got "
                              f"{getattr(self.evict, 'name', self.evict)!r}")
        if not isinstance(self.quant, CachePolicy) or self.quant.granularity != "precision":
            raise SchemeError(f"compose: quant must be a precision scheme, got "
                              f"{getattr(self.quant, 'name', self.quant)!r}")

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return self.evict.needs_attention or self.quant.needs_attention

    @property
    def observation_window(self) -> int:  # type: ignore[override]
        return max(self.evict.observation_window, self.quant.observation_window)

    def quant_bytes(self, layer: LayerState, count: int, ctx: LayerContext) -> int:
        """Bytes the quantizer stores for ``count`` events of this layer's shape, as the eviction selects them."""
        if count == 0:
            return 0
        rows = layer.heads if self.evict.per_head else 1
        if isinstance(self.quant, QuantizationPolicy):  # exact formula, no quantization needed
            shape = LayerState(keys=layer.keys[:, :0], values=layer.values[:, :0],
                               positions=layer.positions.new_zeros(rows, 0),
                               timestamps=layer.timestamps.new_zeros(rows, 0))
            return self.quant.predicted_nbytes(shape, count, self.quant.resolve_bits(shape, ctx))
        # another format: quantize ``count`` events (sizes depend on shapes only)
        sample = LayerState(keys=layer.keys[:, :count], values=layer.values[:, :count],
                            positions=layer.positions[:1, :count].expand(rows, -1).contiguous(),
                            timestamps=layer.timestamps[:1, :count].expand(rows, -1).contiguous())
        return self.quant.compress(sample, None, ctx).nbytes()

    def kept_events(self, layer: LayerState, ctx: LayerContext) -> int:
        """``B``: the count the bisection finds with quantized bytes within the budget of ``ctx.history_len``."""
        target = self.target_bytes(layer, ctx.history_len)
        low, high = 0, layer.num_tokens
        if self.quant_bytes(layer, high, ctx) <= target:
            return high
        while high - low > 1:  # invariant: low fits, high does not
            mid = (low + high) // 2
            if self.quant_bytes(layer, mid, ctx) <= target:
                low = mid
            else:
                high = mid
        return low

    def evicted(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> LayerState:
        """The dense layer cut to :meth:`kept_events` by the eviction's scores."""
        if layer.num_tokens == 0:  # a cold user (a 0-event write): nothing to evict, and no history to divide by
            return layer
        kept = self.kept_events(layer, ctx)
        # the eviction ratio whose own budget rule gives exactly `kept` events
        ratio = (kept + 0.5) * self.evict.kept_token_bytes(layer) / (ctx.history_len * native_token_bytes(layer))
        return replace(self.evict, memory_ratio=min(ratio, 1.0)).evict(layer.with_scores(None), stats, ctx)

    def compress(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> StoredLayer:
        return self.quant.compress(self.evicted(layer, stats, ctx).with_scores(None), stats, ctx)

    def merge(self, stored: StoredLayer, new: LayerState, stats: LayerStats | None, ctx: LayerContext
              ) -> StoredLayer:
        return self.compress(dense_layer(stored, new.keys.dtype).extend(new), stats, ctx)


__all__ = ["Compose", "Pyramid", "dense_layer", "pyramid_ratios"]
