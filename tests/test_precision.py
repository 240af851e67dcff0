"""Precision schemes (KIVI, IntactKV, INT8) and their shared quantizer: packing, error bounds, exact bytes,
streaming appends, and serving end to end against Native."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from malloc.core.state import LayerState
from malloc.core.tokens import Events
from malloc.memory.policy import CachePolicy, LayerContext, SchemeError, native_token_bytes
from malloc.memory.quant import (
    QuantizedLayer,
    QuantizedTensor,
    expand_groups,
    pack_bits,
    quantize_asymmetric,
    quantize_symmetric,
    unpack_bits,
)
from malloc.memory.registry import build_model_for
from malloc.memory.schemes import POLICIES
from malloc.memory.schemes.precision.int8 import Int8
from malloc.memory.schemes.precision.intactkv import IntactKV
from malloc.memory.schemes.precision.kivi import KIVI
from malloc.memory.schemes.reference.native import Native
from malloc.models import ModelConfig
from malloc.serving.engine import Engine

HEADS, DIM = 4, 16  # the default model's H and d (fp32)
F16_HALF_ULP = 2.0 ** -11  # relative rounding of float16 (normal range)
F16_MIN_HALF_STEP = 2.0 ** -25  # absolute rounding of float16 near 0 (subnormals)


def dense(n: int, start: int = 0, heads: int = HEADS, dim: int = DIM, seed: int = 0, rows: int = 1) -> LayerState:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.silu(torch.randn(heads, n, dim, generator=gen) * 2)  # post-SiLU: skewed positive
    values = torch.randn(heads, n, dim, generator=gen)
    positions = torch.arange(start, start + n, dtype=torch.int32)[None].expand(rows, -1).contiguous()
    return LayerState(keys, values, positions, (positions.long() * 60 + 7))


def ctx(history_len: int) -> LayerContext:
    return LayerContext(layer=0, num_layers=2, backbone="hstu", history_len=history_len)


def cat_states(parts: list[LayerState]) -> LayerState:
    return LayerState(*(torch.cat([getattr(p, f) for p in parts], dim=1)
                        for f in ("keys", "values", "positions", "timestamps")))


# -- packing ---------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), lead=st.lists(st.integers(1, 3), max_size=2), m=st.integers(0, 37),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, lead, m, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (*lead, m), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, math.ceil(m * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, m), codes)


def test_two_bits_are_four_codes_per_byte():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    assert pack_bits(torch.tensor([[15, 1]], dtype=torch.uint8), 4).tolist() == [[15 | 1 << 4]]


# -- quantization error ----------------------------------------------------------------------------------------
def group_minmax(x: torch.Tensor, group: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 per-group min and max, expanded back to x's shape (groups cut along dim, last one short)."""
    chunks = x.split(group, dim=dim)
    low = torch.cat([c.amin(dim=dim, keepdim=True).expand_as(c) for c in chunks], dim=dim)
    high = torch.cat([c.amax(dim=dim, keepdim=True).expand_as(c) for c in chunks], dim=dim)
    return low, high


def f16_rounding(t: torch.Tensor) -> torch.Tensor:
    return t.abs() * F16_HALF_ULP + F16_MIN_HALF_STEP


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 70), d=st.integers(1, 20), group=st.integers(1, 40),
       axis=st.sampled_from([1, 2]), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_asymmetric_error_within_analytic_bound(bits, n, d, group, axis, scale, seed):
    """|x - x_hat| <= s16/2 + |z - z16| + M |s - s16| (+ float32 rounding), with s, z the exact group statistics.

    Inside the rounded grid the code is off by at most half a step; the grid ``[z16, z16 + M s16]`` can end short
    of ``[min, max]`` by at most ``|z - z16| + M |s - s16|``, where the code clips. Since ``s16``/``z16`` are float16
    roundings of ``s``/``z``, both differences are at most ``2^-11 |.| + 2^-25``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.silu(torch.randn(3, n, d, generator=gen)) * scale
    levels = 2 ** bits - 1
    codes, s16, z16 = quantize_asymmetric(x, bits, group, axis)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= levels
    size = x.shape[axis]
    s16e, z16e = expand_groups(s16, group, axis, size), expand_groups(z16, group, axis, size)
    x_hat = codes.float() * s16e + z16e
    low, high = group_minmax(x, group, axis)
    s, z = (high - low) / levels, low
    assert torch.all((s - s16e).abs() <= f16_rounding(s)) and torch.all((z - z16e).abs() <= f16_rounding(z))
    bound = s16e / 2 + (z - z16e).abs() + levels * (s - s16e).abs()
    bound += 4 * torch.finfo(torch.float32).eps * (z16e.abs() + levels * s16e)  # float32 s Q + z
    assert torch.all((x - x_hat).abs() <= bound)
    assert torch.all((x - x_hat).abs() <= s16e / 2 + f16_rounding(z) + levels * f16_rounding(s) + 1e-6 * scale)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_symmetric_int8_error_within_bound(n, d, seed):
    """Symmetric absmax: |x - x_hat| <= s16/2 + 127 |s - s16|, with s = max|x| / 127 per (head, event)."""
    x = torch.randn(3, n, d, generator=torch.Generator().manual_seed(seed)) * 5
    codes, s16 = quantize_symmetric(x, 8, d, 2)
    x_hat = (codes.float() - 128) * s16.float()
    s = x.abs().amax(dim=2, keepdim=True) / 127
    bound = s16.float() / 2 + 127 * (s - s16.float()).abs() + 1e-6
    assert torch.all((x - x_hat).abs() <= bound)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_read_error_within_bound(bits):
    """Keys per channel over groups of 32 events, values per token over d_v channels; the residual is exact."""
    layer, policy = dense(130), KIVI(bits=bits)
    stored = policy.compress(layer, None, ctx(130))
    assert isinstance(stored, QuantizedLayer)
    q = stored.num_quantized
    assert q == 96 and stored.num_full == 34  # 32 * floor((130 - 32) / 32) quantized
    view = stored.read()
    levels = 2 ** bits - 1
    for got, want, group, axis in ((view.keys, layer.keys, 32, 1), (view.values, layer.values, DIM, 2)):
        low, high = group_minmax(want[:, :q], group, axis)
        s, z = (high - low) / levels, low
        bound = s / 2 + f16_rounding(z) + levels * f16_rounding(s) + 1e-5
        assert torch.all((got[:, :q] - want[:, :q]).abs() <= bound)
        assert torch.equal(got[:, q:], want[:, q:])


# -- bytes -----------------------------------------------------------------------------------------------------
def kivi_bytes(n: int, bits: int, group: int = 32, residual: int = 32, h: int = HEADS, d: int = DIM) -> int:
    q = group * (max(n - residual, 0) // group)  # complete groups beyond the residual are quantized
    value_group = min(group, d)
    payload = 2 * q * math.ceil(h * d * bits / 8)
    key_meta = 2 * 2 * h * (q // group) * d  # fp16 scale + zero per (head, channel, token group)
    value_meta = 2 * 2 * h * q * math.ceil(d / value_group)  # per (head, token, channel group)
    return payload + key_meta + value_meta + (n - q) * h * 2 * d * 4 + n * (4 + 8)


def intactkv_bytes(n: int, bits: int, pivots: int = 4, h: int = HEADS, d: int = DIM) -> int:
    p = min(pivots, n)
    return (n - p) * (2 * math.ceil(h * d * bits / 8) + 2 * 2 * 2 * h) + p * h * 2 * d * 4 + n * 12


def int8_bytes(n: int, h: int = HEADS, d: int = DIM) -> int:
    return n * (2 * h * d + 2 * 2 * h + 12)


CASES = [(KIVI(bits=2), lambda n: kivi_bytes(n, 2)), (KIVI(bits=4), lambda n: kivi_bytes(n, 4)),
         (KIVI(bits=2, group=8, residual=0), lambda n: kivi_bytes(n, 2, 8, 0)),
         (IntactKV(bits=8), lambda n: intactkv_bytes(n, 8)), (IntactKV(bits=4), lambda n: intactkv_bytes(n, 4)),
         (IntactKV(bits=2, pivots=0), lambda n: intactkv_bytes(n, 2, 0)), (Int8(), int8_bytes)]


@pytest.mark.parametrize(("policy", "formula"), CASES, ids=lambda c: repr(c) if isinstance(c, CachePolicy) else "")
@pytest.mark.parametrize("n", [1, 4, 31, 63, 64, 100, 257, 1000])
def test_nbytes_equals_formula(policy, formula, n):
    layer = dense(n)
    stored = policy.compress(layer, None, ctx(n))
    assert stored.nbytes() == formula(n) == policy.predicted_nbytes(layer, n, stored.bits)
    assert stored.num_tokens == n


def test_default_model_ratios():
    """The ratios stated in the docstrings (H=4, d=16, fp32; 524 Native bytes per event)."""
    expected = {(KIVI, 2): (0.4431, 0.1646), (KIVI, 4): (0.4821, 0.2232), (IntactKV, 8): (0.3551, 0.3309),
                (IntactKV, 4): (0.2379, 0.2093), (IntactKV, 2): (0.1792, 0.1485), (Int8, 8): (0.2977, 0.2977)}
    for (cls, bits), ratios in expected.items():
        policy = cls() if cls is Int8 else cls(bits=bits)
        for n, want in zip((100, 1000), ratios, strict=True):
            layer = dense(n)
            assert policy.compress(layer, None, ctx(n)).nbytes() / (n * native_token_bytes(layer)) == pytest.approx(
                want, abs=5e-5)


# asymptotic ratios (residual / pivots amortised), default model: KIVI 4 bits 0.1908, 2 bits 0.1298;
# IntactKV 8 bits 0.3282, 4 bits 0.2061, 2 bits 0.1450
@pytest.mark.parametrize(("cls", "ratio", "bits"), [(KIVI, 1.0, 4), (KIVI, 0.19, 2), (KIVI, 0.191, 4),
                                                    (IntactKV, 1.0, 8), (IntactKV, 0.3, 4), (IntactKV, 0.2, 2)])
def test_bits_from_memory_ratio(cls, ratio, bits):
    """Bits follow the asymptotic ratio; a long history then stays within the target (a short one may not)."""
    policy = cls(memory_ratio=ratio)
    assert policy.compress(dense(100), None, ctx(100)).bits == bits
    long = dense(4096)
    assert policy.compress(long, None, ctx(4096)).nbytes() <= ratio * 4096 * native_token_bytes(long) * 1.05


# -- appends ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [KIVI(bits=2), KIVI(bits=4, group=8, residual=5), IntactKV(bits=4),
                                    IntactKV(bits=2, pivots=10), Int8()], ids=repr)
def test_streaming_append_equals_one_write(policy):
    """Write 7 events, append 20 chunks: the stored layer is the one a single write of all events gives
    (streaming flushes never re-quantize), positions stay chronological, bytes follow the formula."""
    parts = [dense(7, seed=1)]
    stored = policy.compress(parts[0], None, ctx(7))
    for i in range(20):
        start = sum(p.num_tokens for p in parts)
        new = dense(1 + i % 5, start=start, seed=2 + i)
        parts.append(new)
        stored = policy.merge(stored, new, None, ctx(start + new.num_tokens))
        n = stored.num_tokens
        assert stored.nbytes() == policy.predicted_nbytes(parts[0], n, stored.bits)
        assert torch.equal(stored.read().positions, torch.arange(n)[None])
    full = cat_states(parts)
    once = policy.compress(full, None, ctx(full.num_tokens))
    a, b = stored.read(), once.read()
    assert stored.nbytes() == once.nbytes()
    for f in ("keys", "values", "positions", "timestamps"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_per_head_positions_are_stored_and_counted():
    layer = dense(80, rows=HEADS)
    policy = IntactKV(bits=4)
    stored = policy.merge(policy.compress(layer, None, ctx(80)), dense(3, start=80), None, ctx(83))
    assert stored.read().positions.shape == (HEADS, 83)
    assert stored.nbytes() == policy.predicted_nbytes(layer, 83, 4) == intactkv_bytes(83, 4) + 83 * 12 * (HEADS - 1)


# -- serving end to end ----------------------------------------------------------------------------------------
def tiny_model(backbone: str):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=128)
    return build_model_for(cfg, 40).eval()


def random_events(gen: torch.Generator, batch: int, t: int, start_time: int) -> Events:
    items = torch.randint(1, 41, (batch, t), generator=gen)
    actions = torch.randint(0, 3, (batch, t), generator=gen)
    times = (start_time + 60 * torch.arange(t))[None].expand(batch, -1).contiguous()
    return Events(items, actions, times, torch.full((batch,), t))


def serve(model, policy: CachePolicy, appends: int = 20):
    gen = torch.Generator().manual_seed(1)
    engine = Engine(model, policy)
    states = engine.write(random_events(gen, 3, 40, 0))
    for i in range(appends):
        states = engine.append(states, random_events(gen, 3, 1 + i % 2, 10**5 + 1000 * i))
    candidates = torch.randint(1, 41, (3, 12), generator=gen)
    return states, engine.score(states, candidates, torch.full((3, 12), 10**6))


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_serving_end_to_end(backbone):
    """Write 40 events, append 20 times (1-2 events), score: bytes follow the predicted ratio after every request,
    and 8-bit IntactKV scores stay within 1e-2 of Native's."""
    model = tiny_model(backbone)
    native_states, native_scores = serve(model, Native())
    for policy in (IntactKV(bits=8), KIVI(bits=4, group=8, residual=8), Int8()):
        states, scores = serve(model, policy)
        assert torch.isfinite(scores).all()
        for state, native in zip(states, native_states, strict=True):
            for stored, dense_layer in zip(state.layers, native.layers, strict=True):
                n = stored.num_tokens
                assert n == dense_layer.num_tokens
                assert torch.equal(stored.read().positions, dense_layer.positions.long())
                predicted = policy.predicted_ratio(dense_layer, n, n, stored.bits)
                assert stored.nbytes() / dense_layer.nbytes() == pytest.approx(predicted, rel=1e-12)
                assert predicted < 1.0
        if isinstance(policy, IntactKV):
            assert (scores - native_scores).abs().max() < 1e-2


def test_intactkv_chosen_bits_stay_within_ratio_on_append():
    """IntactKV's ratio only falls as events arrive, so the write-time bits keep every append within budget."""
    model = tiny_model("hstu")
    states, _ = serve(model, IntactKV(memory_ratio=0.5), appends=20)  # 4 bits: 0.4857 at the 40-event write
    for layer in states[0].layers:
        assert layer.bits == 4 and layer.num_tokens == 70
        assert layer.nbytes() <= 0.5 * layer.num_tokens * (4 * (4 + 4) * 4 + 12)


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize(("policy", "tolerance"), [(KIVI(bits=4, group=8, residual=8), 2e-2), (IntactKV(bits=8), 5e-3),
                                                   (Int8(), 5e-3)], ids=lambda p: getattr(p, "name", ""))
def test_precision_schemes_quantize_the_mla_latent(policy, tolerance, backbone):
    """MLA stores one latent per event as keys, with values of width 0: a precision scheme on an MLA model
    quantizes the latent (no value codes, no value scales), ``nbytes()`` is its formula after every request, and
    the scores stay near MLA's unquantized ones (within each scheme's ``tolerance``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=128,
                      scheme="mla", memory_ratio=0.5)
    model = build_model_for(cfg, 40).eval()
    plain_states, plain_scores = serve(model, Native())
    states, scores = serve(model, policy)
    for state, plain in zip(states, plain_states, strict=True):
        for stored, latent in zip(state.layers, plain.layers, strict=True):
            assert isinstance(stored, QuantizedLayer) and stored.num_tokens == latent.num_tokens == 70
            assert stored.num_quantized > 0 and stored.values.nbytes() == 0 and stored.full_values.shape[2] == 0
            assert stored.nbytes() == policy.predicted_nbytes(latent, stored.num_tokens, stored.bits)
            assert stored.nbytes() < latent.nbytes()
    assert (scores - plain_scores).abs().max() < tolerance


# -- knobs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "scheme", "knob"), [
    (lambda: KIVI(bits=3), "kivi", "bits"), (lambda: KIVI(bits=8), "kivi", "bits"),
    (lambda: KIVI(group=0), "kivi", "group"), (lambda: KIVI(residual=-1), "kivi", "residual"),
    (lambda: IntactKV(bits=3), "intactkv", "bits"), (lambda: IntactKV(pivots=-1), "intactkv", "pivots"),
    (lambda: KIVI(memory_ratio=0.0), "kivi", "memory_ratio"), (lambda: Int8(memory_ratio=1.5), "int8", "memory_ratio"),
])
def test_bad_knobs_raise(make, scheme, knob):
    with pytest.raises(SchemeError, match=rf"^{scheme}: .*{knob}"):
        make()


@pytest.mark.parametrize(("policy", "n", "listed"), [
    (KIVI(memory_ratio=0.1), 100, "4 bits -> 0.1908, 2 bits -> 0.1298"),
    (IntactKV(memory_ratio=0.1), 100, "8 bits -> 0.3282, 4 bits -> 0.2061, 2 bits -> 0.1450"),
    (Int8(memory_ratio=0.25), 100, "0.2977"),
], ids=repr)
def test_unreachable_ratio_raises(policy, n, listed):
    with pytest.raises(SchemeError, match=rf"^{policy.name}: memory_ratio") as info:
        policy.compress(dense(n), None, ctx(n))
    assert listed in str(info.value)


def test_registered():
    assert {POLICIES[name] for name in ("kivi", "intactkv", "int8")} == {KIVI, IntactKV, Int8}
    for cls in (KIVI, IntactKV, Int8):
        assert cls.granularity == "precision" and cls.__doc__


def test_quantized_tensor_empty_and_cat():
    empty = QuantizedTensor.empty(HEADS, DIM, 2, 32, "token")
    assert empty.num_tokens == 0 and empty.nbytes() == 0
    x = dense(64).keys
    q = empty.cat(QuantizedTensor.quantize(x[:, :32], 2, 32, "token")).cat(
        QuantizedTensor.quantize(x[:, 32:], 2, 32, "token"))
    assert torch.equal(q.dequantize(), QuantizedTensor.quantize(x, 2, 32, "token").dequantize())
