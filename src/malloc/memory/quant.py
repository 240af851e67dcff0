"""The shared quantizer of the precision schemes, and their stored-layer format.

Quantizer (pure PyTorch, the reference path), over groups of ``group`` consecutive elements along one axis:

- asymmetric min/max: ``z = min X_g``, ``s = (max X_g - min X_g) / (2^bits - 1)``, ``Q = round((x - z) / s)``
  clamped to ``[0, 2^bits - 1]``, ``x_hat = s Q + z``. Zero points are kept because HSTU keys/values are post-SiLU
  (skewed positive: SiLU is never below -0.28, so a grid symmetric about 0 would leave most negative codes unused);
- symmetric absmax: ``s = max |X_g| / (2^(bits-1) - 1)``, ``Q = round(x / s)`` clamped to
  ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` and stored offset by ``2^(bits-1)`` as an unsigned code.

Scales and zero points are **stored as float16** (2 bytes each, counted by ``nbytes()``) and the codes are
computed *from the float16-rounded* scale and zero point, so dequantization is exactly what was stored. Inputs
must stay inside the float16 range (``|x| < 65504``); a non-finite scale raises ValueError. A group that is cut
short by the end of its axis is padded with its last element (min/max unchanged) and the padding is dropped.

Error bound (asymmetric, per element, ``M = 2^bits - 1``, ``s16``/``z16`` the stored float16 values):
``|x - x_hat| <= s16 / 2 + |z - z16| + M |s - s16|`` (the first term inside the grid; the other two when the
rounded grid ends short of ``min`` or ``max`` and the code clips), plus float32 rounding of ``s16 Q + z16``.

Codes are bit-packed token-major: a ``(H, n, d)`` tensor is stored as ``(n, ceil(H d bits / 8))`` uint8, so
appending events is a concatenation along the first axis whatever the group axis.

Stored format: :class:`QuantizedLayer` (a quantized part, a full-precision part before or after it, positions and
timestamps; ``nbytes()`` counts every tensor). Shared policy: :class:`QuantizationPolicy` (write, append, exact
predicted bytes, bits from ``memory_ratio``), subclassed by ``schemes/precision/{kivi,intactkv,int8}.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from malloc.core.state import LayerState, LayerView, StoredLayer, tensor_nbytes
from malloc.core.stats import LayerStats
from malloc.memory.policy import CachePolicy, LayerContext, SchemeError, native_token_bytes

SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
PACK_BITS = (2, 4, 8)
GroupAxis = Literal["token", "channel"]
# group axis of a (H, n, d) tensor -> tensor dimension
_AXIS_DIM = {"token": 1, "channel": 2}


# -- bit packing -----------------------------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into bytes, ``8 // bits`` codes per byte (code ``i`` of a byte in bits ``[i b, (i+1) b)``).

    Args:
        codes: ``(..., m)`` uint8, each ``< 2^bits``; bits: 2, 4 or 8.
    Returns:
        ``(..., ceil(m bits / 8))`` uint8 (the last byte is zero-padded).
    """
    _check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8).clone()
    per_byte = 8 // bits
    m = codes.shape[-1]
    pad = -m % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], (m + pad) // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bit fields: the sum is a bitwise or


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(..., ceil(count bits / 8))`` uint8 -> ``(..., count)`` uint8 codes."""
    _check_bits(bits)
    if bits == 8:
        return packed[..., :count].clone()
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed[..., None] >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))[..., :count]


# -- grouped quantizer -----------------------------------------------------------------------------------------
def _grouped(x: torch.Tensor, group: int, dim: int) -> tuple[torch.Tensor, int]:
    """``x`` with ``dim`` moved last and cut into ``(..., groups, group)`` (last group padded with its last element)."""
    moved = x.movedim(dim, -1)
    size = moved.shape[-1]
    pad = -size % group
    if pad and size:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group), size


def _ungrouped(codes: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    return codes.flatten(-2)[..., :size].movedim(-1, dim)


def _to_scale(t: torch.Tensor) -> torch.Tensor:
    stored = t.to(SCALE_DTYPE)
    if not torch.isfinite(stored).all():
        raise ValueError("quantizer: a scale or zero point overflows float16 (inputs must satisfy |x| < 65504)")
    return stored


def expand_groups(param: torch.Tensor, group: int, dim: int, size: int) -> torch.Tensor:
    """Per-group parameters ``(..., ceil(size / group), ...)`` repeated to ``size`` elements along ``dim`` (float32)."""
    return param.float().repeat_interleave(group, dim=dim).narrow(dim, 0, size)


def quantize_asymmetric(x: torch.Tensor, bits: int, group: int, dim: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization over groups of ``group`` elements along ``dim``.

    Returns:
        codes (``x``'s shape, uint8 in ``[0, 2^bits - 1]``), scale and zero point (float16, ``x``'s shape with
        ``dim`` of size ``ceil(x.shape[dim] / group)``).
    """
    levels = 2 ** bits - 1
    grouped, size = _grouped(x.float(), group, dim)
    low, high = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
    scale, zero = _to_scale((high - low) / levels), _to_scale(low)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((grouped - zero.float()) / safe).clamp(0, levels).to(torch.uint8)
    return _ungrouped(codes, size, dim), scale.squeeze(-1).movedim(-1, dim), zero.squeeze(-1).movedim(-1, dim)


def quantize_symmetric(x: torch.Tensor, bits: int, group: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization over groups of ``group`` elements along ``dim``.

    Returns:
        codes (``x``'s shape, uint8: ``Q + 2^(bits-1)`` with ``|Q| <= 2^(bits-1) - 1``) and scale (float16, as in
        :func:`quantize_asymmetric`).
    """
    top = 2 ** (bits - 1) - 1
    grouped, size = _grouped(x.float(), group, dim)
    scale = _to_scale(grouped.abs().amax(dim=-1, keepdim=True) / top)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = (torch.round(grouped / safe).clamp(-top, top) + 2 ** (bits - 1)).to(torch.uint8)
    return _ungrouped(codes, size, dim), scale.squeeze(-1).movedim(-1, dim)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
               dim: int) -> torch.Tensor:
    """float32 ``s Q + z`` (asymmetric, ``zero`` given) or ``s (code - 2^(bits-1))`` (symmetric, ``zero`` None)."""
    size = codes.shape[dim]
    values = codes.float() if zero is not None else codes.float() - 2 ** (bits - 1)
    out = values * expand_groups(scale, group, dim, size)
    return out if zero is None else out + expand_groups(zero, group, dim, size)


# -- stored formats --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedTensor:
    """Grouped integer codes of a ``(H, n, d)`` key or value tensor.

    Attributes:
        packed: ``(n, ceil(H d bits / 8))`` uint8, token-major bit-packed codes.
        scale: float16, ``(H, n / group, d)`` for ``axis="token"`` (per channel, groups of tokens; ``n`` a multiple of
            ``group``) or ``(H, n, ceil(d / group))`` for ``axis="channel"`` (per token, groups of channels).
        zero: float16 like ``scale`` (asymmetric), or None (symmetric).
        bits, group, axis: the quantizer; heads, dim: ``H``, ``d``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int
    axis: GroupAxis
    heads: int
    dim: int

    @property
    def num_tokens(self) -> int:
        return self.packed.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def nbytes(self) -> int:
        return tensor_nbytes(self.packed) + tensor_nbytes(self.scale) + tensor_nbytes(self.zero)

    @staticmethod
    def quantize(x: torch.Tensor, bits: int, group: int, axis: GroupAxis, symmetric: bool = False
                 ) -> QuantizedTensor:
        """Quantize ``x (H, n, d)`` in groups of ``group`` along ``axis``."""
        heads, n, dim = x.shape
        assert axis == "channel" or n % group == 0, "token groups must be complete"
        axis_dim = _AXIS_DIM[axis]
        if symmetric:
            (codes, scale), zero = quantize_symmetric(x, bits, group, axis_dim), None
        else:
            codes, scale, zero = quantize_asymmetric(x, bits, group, axis_dim)
        packed = pack_bits(codes.permute(1, 0, 2).reshape(n, heads * dim), bits)
        return QuantizedTensor(packed, scale, zero, bits, group, axis, heads, dim)

    @staticmethod
    def empty(heads: int, dim: int, bits: int, group: int, axis: GroupAxis, symmetric: bool = False,
              device: torch.device | str = "cpu") -> QuantizedTensor:
        return QuantizedTensor.quantize(torch.zeros(heads, 0, dim, device=device), bits, group, axis, symmetric)

    def codes(self) -> torch.Tensor:
        """``(H, n, d)`` uint8 unpacked codes."""
        n = self.num_tokens
        return unpack_bits(self.packed, self.bits, self.heads * self.dim).reshape(n, self.heads, self.dim
                                                                                  ).permute(1, 0, 2)

    def dequantize(self) -> torch.Tensor:
        """``(H, n, d)`` float32."""
        return dequantize(self.codes(), self.scale, self.zero, self.bits, self.group, _AXIS_DIM[self.axis])

    def cat(self, later: QuantizedTensor) -> QuantizedTensor:
        """This tensor followed by ``later`` (same quantizer); already quantized data is not touched."""
        assert (later.bits, later.group, later.axis, later.heads, later.dim, later.symmetric) == (
            self.bits, self.group, self.axis, self.heads, self.dim, self.symmetric)
        assert self.axis == "channel" or self.num_tokens % self.group == 0
        # scales are (H, groups or events, ...) for both axes: events follow each other along dim 1
        zero = None if self.zero is None or later.zero is None else torch.cat([self.zero, later.zero], dim=1)
        return QuantizedTensor(torch.cat([self.packed, later.packed]), torch.cat([self.scale, later.scale], dim=1),
                               zero, self.bits, self.group, self.axis, self.heads, self.dim)

    @staticmethod
    def predicted_nbytes(n: int, heads: int, dim: int, bits: int, group: int, axis: GroupAxis,
                         symmetric: bool = False) -> int:
        """Bytes of :meth:`quantize` on ``(heads, n, dim)``: packed codes + float16 scales (+ zero points)."""
        codes = n * math.ceil(heads * dim * bits / 8)
        groups = heads * (math.ceil(n / group) * dim if axis == "token" else n * math.ceil(dim / group))
        return codes + (1 if symmetric else 2) * SCALE_BYTES * groups


@dataclass(frozen=True)
class QuantizedLayer:
    """A stored layer with a quantized part and a full-precision part, in chronological order.

    ``full_first=False``: the ``q`` oldest events are quantized and the most recent ``r`` stay full precision
    (KIVI residual); ``full_first=True``: the ``r`` oldest events stay full precision (IntactKV pivots) and the
    rest is quantized.

    Attributes:
        keys: quantized keys ``(H, q, d_k)``; values: quantized values ``(H, q, d_v)`` (may use another group axis).
        full_keys: ``(H, r, d_k)``; full_values: ``(H, r, d_v)``, in the state dtype.
        positions: ``(S, q + r)`` int32; timestamps: ``(S, q + r)`` int64, chronological.
        full_first: where the full-precision part sits.
    """

    keys: QuantizedTensor
    values: QuantizedTensor
    full_keys: torch.Tensor
    full_values: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor
    full_first: bool = False

    def __post_init__(self) -> None:
        assert self.keys.num_tokens == self.values.num_tokens
        assert self.keys.num_tokens + self.full_keys.shape[1] == self.positions.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def num_quantized(self) -> int:
        return self.keys.num_tokens

    @property
    def num_full(self) -> int:
        return self.full_keys.shape[1]

    @property
    def bits(self) -> int:
        return self.keys.bits

    def nbytes(self) -> int:
        """Packed codes + float16 scales and zero points + full-precision tensors + positions + timestamps."""
        return (self.keys.nbytes() + self.values.nbytes() + tensor_nbytes(self.full_keys)
                + tensor_nbytes(self.full_values) + tensor_nbytes(self.positions) + tensor_nbytes(self.timestamps))

    def read(self) -> LayerView:
        """float32 keys ``(H, n, d_k)`` and values ``(H, n, d_v)`` (dequantized), chronological metadata."""
        parts_k = [self.keys.dequantize(), self.full_keys.float()]
        parts_v = [self.values.dequantize(), self.full_values.float()]
        if self.full_first:
            parts_k.reverse()
            parts_v.reverse()
        return LayerView(torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1), self.positions.long(),
                         self.timestamps)


def choose_bits(scheme: str, candidates: Sequence[int], predicted_ratio: Callable[[int], float],
                memory_ratio: float) -> int:
    """The largest bit width whose predicted ratio is ``<= memory_ratio``.

    Raises:
        SchemeError: naming ``scheme`` and ``bits``, with the ratio each bit width reaches, if none fits.
    """
    ratios = {bits: predicted_ratio(bits) for bits in sorted(candidates, reverse=True)}
    for bits, ratio in ratios.items():
        if ratio <= memory_ratio + 1e-12:
            return bits
    reachable = ", ".join(f"{bits} bits -> {ratio:.4f}" for bits, ratio in ratios.items())
    raise SchemeError(f"{scheme}: memory_ratio {memory_ratio} is not reachable by any bits "
                      f"(reachable: {reachable}); raise memory_ratio or set bits explicitly")


def owned(t: torch.Tensor) -> torch.Tensor:
    """A compact copy: a stored slice must not keep its parent's storage alive (``nbytes()`` counts the slice)."""
    return t.clone(memory_format=torch.contiguous_format)


def slice_state(layer: LayerState, start: int, stop: int) -> LayerState:
    """Events ``[start, stop)`` of a dense state."""
    return LayerState(layer.keys[:, start:stop], layer.values[:, start:stop], layer.positions[:, start:stop],
                      layer.timestamps[:, start:stop])


# -- the shared policy -----------------------------------------------------------------------------------------
def channel_group(dim: int, group: int | None = None) -> int:
    """Channels per group of a per-token quantizer over a ``dim``-wide axis: ``group`` clipped to ``dim`` (the
    whole axis if None), and at least 1.

    A zero-width tensor (MLA stores its latent as the keys and values of width 0) has no channel groups whatever
    the group size: at 1 it gets ``ceil(0 / 1) = 0`` groups, no codes and no scales, where 0 would divide by zero.
    """
    return max(1, dim if group is None else min(group, dim))


@dataclass(frozen=True)
class QuantSpec:
    """How one of keys/values is quantized: groups of ``group`` along ``axis``, asymmetric or symmetric."""

    group: int
    axis: GroupAxis
    symmetric: bool = False

    def quantize(self, x: torch.Tensor, bits: int) -> QuantizedTensor:
        return QuantizedTensor.quantize(x, bits, self.group, self.axis, self.symmetric)

    def predicted_nbytes(self, n: int, heads: int, dim: int, bits: int) -> int:
        return QuantizedTensor.predicted_nbytes(n, heads, dim, bits, self.group, self.axis, self.symmetric)


@dataclass(frozen=True)
class QuantizationPolicy(CachePolicy):
    """Shared work of the precision schemes: split events into quantized and full-precision parts, quantize, merge.

    A subclass states which events stay full precision (:meth:`num_full`, a function of the stored event count,
    non-decreasing in quantized events, so appends never re-quantize), where they sit (``full_first``), how keys
    and values are quantized (:meth:`specs`) and which bit widths ``memory_ratio`` may pick (``bit_choices``).

    Bits rule: an explicit bit width (:meth:`requested_bits`) is used as given; otherwise the largest of
    ``bit_choices`` whose :meth:`asymptotic_ratio` is ``<= memory_ratio`` (SchemeError listing the reachable
    ratios if none). The full-precision events come on top, so short histories store more than the target: the
    measured ratio is always reported. The bits chosen at write stay for the user's later appends.
    """

    granularity: ClassVar[str] = "precision"
    # positions/timestamps are stored as given, (1, n) or (H, n): per-head selections (Compose) are counted too
    per_head_positions: ClassVar[bool] = True
    full_first: ClassVar[bool] = False
    bit_choices: ClassVar[tuple[int, ...]] = (8,)

    # -- hooks -------------------------------------------------------------------------------------------------
    def num_full(self, n: int) -> int:
        """Events kept in full precision among ``n`` stored events."""
        raise NotImplementedError

    def specs(self, key_dim: int, value_dim: int) -> tuple[QuantSpec, QuantSpec]:
        """Quantizers of keys and values."""
        raise NotImplementedError

    def requested_bits(self) -> int | None:
        """An explicit bit width (then ``memory_ratio`` does not choose it), or None."""
        return None

    # -- bytes and bits ----------------------------------------------------------------------------------------
    def predicted_nbytes(self, layer: LayerState, n: int, bits: int) -> int:
        """Exact ``nbytes()`` of ``n`` stored events shaped like ``layer`` at ``bits``."""
        heads, _, key_dim = layer.keys.shape
        value_dim = layer.values.shape[2]
        full, rows = self.num_full(n), layer.positions.shape[0]
        key_spec, value_spec = self.specs(key_dim, value_dim)
        return (key_spec.predicted_nbytes(n - full, heads, key_dim, bits)
                + value_spec.predicted_nbytes(n - full, heads, value_dim, bits)
                + full * heads * (key_dim + value_dim) * layer.keys.element_size() + rows * n * (4 + 8))

    def predicted_ratio(self, layer: LayerState, n: int, history_len: int, bits: int) -> float:
        """Predicted stored bytes / Native's bytes for ``history_len`` events (0 for an empty history)."""
        native = history_len * native_token_bytes(layer)
        return self.predicted_nbytes(layer, n, bits) / native if native else 0.0

    def asymptotic_ratio(self, layer: LayerState, bits: int) -> float:
        """Stored bytes per quantized event / Native's bytes per event: the ratio a long history tends to, once
        the full-precision events (residual, pivots) are amortised."""
        heads, _, key_dim = layer.keys.shape
        value_dim, rows, n = layer.values.shape[2], layer.positions.shape[0], 1 << 16
        key_spec, value_spec = self.specs(key_dim, value_dim)
        per_event = (key_spec.predicted_nbytes(n, heads, key_dim, bits)
                     + value_spec.predicted_nbytes(n, heads, value_dim, bits)) / n + rows * (4 + 8)
        return per_event / native_token_bytes(layer)

    def resolve_bits(self, layer: LayerState, ctx: LayerContext) -> int:
        """Explicit bits, else the largest allowed bits whose asymptotic ratio is ``<= memory_ratio``.

        The rule does not depend on the user's history length: a short history, mostly kept in full precision,
        stores more than ``memory_ratio`` (its measured ratio says so), and a long one tends to the target.
        """
        requested = self.requested_bits()
        if requested is not None:
            return requested
        return choose_bits(self.name, self.bit_choices, lambda bits: self.asymptotic_ratio(layer, bits),
                           self.memory_ratio)

    # -- write and append --------------------------------------------------------------------------------------
    def compress(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> StoredLayer:
        bits = self.resolve_bits(layer, ctx)
        n, full = layer.num_tokens, self.num_full(layer.num_tokens)
        key_spec, value_spec = self.specs(layer.keys.shape[2], layer.values.shape[2])
        split = full if self.full_first else n - full
        first, last = slice_state(layer, 0, split), slice_state(layer, split, n)
        quantized, kept = (last, first) if self.full_first else (first, last)
        return QuantizedLayer(keys=key_spec.quantize(quantized.keys, bits),
                              values=value_spec.quantize(quantized.values, bits),
                              full_keys=owned(kept.keys), full_values=owned(kept.values),
                              positions=owned(layer.positions.to(torch.int32)), timestamps=owned(layer.timestamps),
                              full_first=self.full_first)

    def merge(self, stored: StoredLayer, new: LayerState, stats: LayerStats | None, ctx: LayerContext
              ) -> StoredLayer:
        """New events join the full-precision part or are quantized; quantized data is never re-quantized."""
        assert isinstance(stored, QuantizedLayer) and stored.full_first == self.full_first
        rows = stored.positions.shape[0]
        positions = torch.cat([stored.positions, new.positions.to(torch.int32).expand(rows, -1)], dim=1)
        timestamps = torch.cat([stored.timestamps, new.timestamps.expand(rows, -1)], dim=1)
        n = stored.num_tokens + new.num_tokens
        full = self.num_full(n)
        key_spec, value_spec = self.specs(stored.full_keys.shape[2], stored.full_values.shape[2])
        new_keys, new_values = new.keys.to(stored.full_keys.dtype), new.values.to(stored.full_values.dtype)
        if self.full_first:  # [full | quantized | new]: new events fill the full part while it is short
            assert full == stored.num_full or stored.num_quantized == 0, "full part must precede quantized events"
            take = full - stored.num_full
            full_keys = torch.cat([stored.full_keys, new_keys[:, :take]], dim=1)
            full_values = torch.cat([stored.full_values, new_values[:, :take]], dim=1)
            to_quantize_k, to_quantize_v = new_keys[:, take:], new_values[:, take:]
        else:  # [quantized | full | new]: the oldest full events are flushed to the quantized part
            pending_k = torch.cat([stored.full_keys, new_keys], dim=1)
            pending_v = torch.cat([stored.full_values, new_values], dim=1)
            flush = pending_k.shape[1] - full
            assert flush >= 0, "the full-precision part may not shrink below the quantized events"
            to_quantize_k, to_quantize_v = pending_k[:, :flush], pending_v[:, :flush]
            full_keys, full_values = pending_k[:, flush:], pending_v[:, flush:]
        bits = stored.bits
        keys = stored.keys.cat(key_spec.quantize(to_quantize_k, bits))
        values = stored.values.cat(value_spec.quantize(to_quantize_v, bits))
        return QuantizedLayer(keys, values, owned(full_keys), owned(full_values), positions, timestamps,
                              self.full_first)
