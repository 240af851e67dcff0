"""Budget wrappers: PyramidKV's per-layer ratios, Compose's byte arithmetic, and wrapper specs in the registry."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from malloc.core.state import LayerState
from malloc.core.tokens import Events
from malloc.memory.policy import LayerContext, SchemeError, native_token_bytes
from malloc.memory.quant import QuantizedLayer
from malloc.memory.registry import WRAPPER, build_model_for, build_policy, describe, scheme_names, wrapper_names
from malloc.memory.schemes import ARCHITECTURES
from malloc.memory.wrappers import Compose, Pyramid, dense_layer, pyramid_ratios
from malloc.models import ModelConfig
from malloc.serving.engine import Engine


def dense(n: int, heads: int = 4, dim: int = 16, seed: int = 0) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    return LayerState(keys=torch.randn(heads, n, dim, generator=g), values=torch.randn(heads, n, dim, generator=g),
                      positions=torch.arange(n, dtype=torch.int32)[None], timestamps=torch.arange(n)[None] * 60)


def ctx(n: int, layer: int = 0, layers: int = 2) -> LayerContext:
    return LayerContext(layer=layer, num_layers=layers, backbone="hstu", history_len=n)


# -- PyramidKV ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2, 3, 8])
@pytest.mark.parametrize("ratio", [0.05, 0.125, 0.25, 0.5, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("beta", [1.0, 2.0, 20.0])
def test_pyramid_ratios_average_to_target_and_fall_with_depth(layers, ratio, beta):
    ratios = pyramid_ratios(ratio, layers, beta)
    assert len(ratios) == layers
    assert math.isclose(sum(ratios) / layers, ratio, rel_tol=1e-12)
    assert all(0.0 < r <= 1.0 + 1e-12 for r in ratios)
    assert all(a >= b for a, b in itertools.pairwise(ratios))
    if layers > 1 and beta > 1 and ratio < 1:
        assert ratios[0] > ratios[-1]
        steps = [a - b for a, b in itertools.pairwise(ratios)]
        assert max(steps) - min(steps) < 1e-12  # linear in depth


def test_pyramid_kvpress_form():
    # r = 0.25, beta = 20: r_min = r / beta, r_max = 2 r - r_min, linear in between
    assert pyramid_ratios(0.25, 3, 20) == pytest.approx([0.4875, 0.25, 0.0125])
    # r_max would exceed 1: the pyramid flattens to [1, 2r - 1]
    assert pyramid_ratios(0.75, 2, 20) == pytest.approx([1.0, 0.5])
    assert pyramid_ratios(0.3, 4, 1.0) == pytest.approx([0.3] * 4)  # beta = 1: uniform (the inner policy)


def test_pyramid_delegates_each_layer_to_the_inner_policy():
    policy = build_policy("pyramid", 0.25, inner="recency")
    assert isinstance(policy, Pyramid) and policy.inner.name == "recency"
    layer, n = dense(200), 200
    kept = [policy.compress(layer, None, ctx(n, index, 4)).num_tokens for index in range(4)]
    expected = [math.floor(r * n + 1e-9) for r in pyramid_ratios(0.25, 4, 20.0)]
    assert kept == expected and kept == sorted(kept, reverse=True)
    assert sum(kept) / (4 * n) == pytest.approx(0.25, abs=4 / (4 * n))


def test_pyramid_passes_the_inner_knobs_and_observation_needs():
    policy = build_policy("pyramid", 0.5, inner="snapkv", inner_knobs={"window": 3}, beta=4)
    assert policy.inner.window == 3 and policy.beta == 4
    assert policy.needs_attention and policy.observation_window == 3
    assert not build_policy("pyramid", 0.5, inner="recency").needs_attention


def test_pyramid_layers_store_fewer_events_with_depth_on_a_model():
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(dim=16, layers=3, heads=4, head_dim=4, dropout=0.0, max_len=32), 30).eval()
    g = torch.Generator().manual_seed(0)
    n = 90
    events = Events(torch.randint(1, 31, (2, n), generator=g), torch.randint(0, 3, (2, n), generator=g),
                    torch.cumsum(torch.randint(1, 100, (2, n), generator=g), 1), torch.tensor([n, 70]))
    for inner in ("h2o", "tova"):
        states = Engine(model, build_policy("pyramid", 0.25, inner=inner)).write(events)
        for state in states:
            tokens = [layer.num_tokens for layer in state.layers]
            assert tokens[0] > tokens[1] > tokens[2], (inner, tokens)


# -- Compose -----------------------------------------------------------------------------------------------------
def test_compose_ratio_arithmetic_with_a_fixed_rate_quantizer():
    # int8 stores every event at the same cost e, so q = e / native and the eviction keeps memory_ratio / q of n
    policy = build_policy("compose", 0.1, evict="recency", quant="int8")
    layer, n = dense(1000), 1000
    per_event = policy.quant_bytes(layer, 1, ctx(n))
    assert policy.quant_bytes(layer, 300, ctx(n)) == 300 * per_event
    q = per_event / native_token_bytes(layer)
    kept = policy.kept_events(layer, ctx(n))
    assert kept == math.floor(0.1 * n * native_token_bytes(layer) / per_event)
    assert kept / n == pytest.approx(0.1 / q, abs=1 / n)  # kept fraction x q = memory_ratio
    stored = policy.compress(layer, None, ctx(n))
    assert isinstance(stored, QuantizedLayer) and stored.num_tokens == kept
    assert stored.nbytes() <= policy.target_bytes(layer, n) < stored.nbytes() + per_event
    assert stored.read().positions[0, -1] == n - 1  # recency kept the newest events


@pytest.mark.parametrize("bits", [2, 4])
def test_compose_fits_the_byte_budget_with_a_residual_quantizer(bits):
    policy = build_policy("compose", 0.1, evict="recency", quant="kivi", quant_knobs={"bits": bits})
    layer, n = dense(2000), 2000
    stored = policy.compress(layer, None, ctx(n))
    target = policy.target_bytes(layer, n)
    assert stored.nbytes() <= target
    assert stored.nbytes() >= 0.95 * target  # KIVI's residual makes q(B)/B rise as B falls: solved on bytes
    alone = policy.quant_bytes(layer, n, ctx(n)) / (n * native_token_bytes(layer))
    assert stored.num_tokens / n == pytest.approx(0.1 / alone, rel=0.15)  # roughly memory_ratio / q


def test_compose_stores_per_head_selections_and_keeps_the_budget_on_append():
    policy = build_policy("compose", 0.2, evict="snapkv", quant="int8")
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=32), 30).eval()
    g = torch.Generator().manual_seed(1)
    n = 80
    events = Events(torch.randint(1, 31, (1, n), generator=g), torch.randint(0, 3, (1, n), generator=g),
                    torch.cumsum(torch.randint(1, 100, (1, n), generator=g), 1), torch.tensor([n]))
    engine = Engine(model, policy)
    states = engine.write(events.slice(0, 60))
    for start in range(60, n, 5):
        states = engine.append(states, events.slice(start, start + 5))
        for index, layer in enumerate(states[0].layers):
            assert isinstance(layer, QuantizedLayer) and layer.positions.shape[0] == 4  # (H, B) per head
            shape = dense_layer(layer)
            assert layer.nbytes() <= policy.target_bytes(shape, states[0].next_position), index
    scores = engine.score(states, torch.tensor([[1, 2, 3]]), torch.full((1, 3), 10**7))
    assert torch.isfinite(scores).all()


def test_compose_serves_a_cold_user_next_to_users_with_events():
    """A 0-event write stores nothing (no history to take a budget from), and the user's first append then stores
    what a write of the same events stores."""
    policy = build_policy("compose", 0.25, evict="snapkv", quant="kivi")
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=32), 30).eval()
    g = torch.Generator().manual_seed(1)
    n = 80
    events = Events(torch.randint(1, 31, (3, n), generator=g), torch.randint(0, 3, (3, n), generator=g),
                    torch.cumsum(torch.randint(1, 100, (3, n), generator=g), 1), torch.tensor([n, 0, 50]))
    engine = Engine(model, policy)
    states = engine.write(events)
    assert [layer.num_tokens for layer in states[1].layers] == [0, 0]
    assert sum(layer.nbytes() for layer in states[1].layers) == 0
    states = engine.append(states, Events(events.items, events.actions, events.timestamps, torch.tensor([0, 70, 0])))
    alone = engine.write(Events(events.items[1:2], events.actions[1:2], events.timestamps[1:2], torch.tensor([70])))
    assert states[1].nbytes() == alone[0].nbytes()
    for appended, written in zip(states[1].layers, alone[0].layers, strict=True):
        assert isinstance(appended, QuantizedLayer) and 0 < appended.num_tokens < 70
        pairs = zip(dataclasses.astuple(appended.read()), dataclasses.astuple(written.read()), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    items, times = torch.tensor([[1, 2, 3]] * 3), torch.full((3, 3), 10**7)
    torch.testing.assert_close(engine.score(states, items, times)[1:2], engine.score(alone, items[:1], times[:1]))


def test_dense_layer_dequantizes_to_the_state_dtype():
    stored = build_policy("int8").compress(dense(10), None, ctx(10))
    back = dense_layer(stored, torch.bfloat16)
    assert back.keys.dtype == torch.bfloat16 and back.positions.dtype == torch.int32 and back.num_tokens == 10
    assert dense_layer(dense(4).with_scores(torch.ones(1, 4))).scores is None


# -- wrapper specs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "ratio", "knobs", "message"),
    [
        ("pyramid", 0.25, {}, "inner"),
        ("pyramid", 0.25, {"inner": "kivi"}, "eviction"),
        ("pyramid", 0.25, {"inner": "native"}, "native"),
        ("pyramid", 0.25, {"inner": "pyramid"}, "wrapper"),
        ("pyramid", 0.25, {"inner": "nope"}, "nope"),
        ("pyramid", 0.25, {"inner": "h2o", "inner_knobs": {"windw": 3}}, "windw"),
        ("pyramid", 0.25, {"inner": "h2o", "inner_knobs": [1]}, "inner_knobs"),
        ("pyramid", 0.25, {"inner": "h2o", "beta": 0.5}, "beta"),
        ("pyramid", 0.25, {"inner": "h2o", "betta": 2}, "betta"),
        ("pyramid", 1.5, {"inner": "h2o"}, "memory_ratio"),
        ("compose", 0.1, {"evict": "snapkv"}, "quant"),
        ("compose", 0.1, {"evict": "kivi", "quant": "int8"}, "eviction"),
        ("compose", 0.1, {"evict": "recency", "quant": "tova"}, "precision"),
        ("compose", 0.1, {"evict": "recency", "quant": "kivi", "quant_knobs": {"bits": 3}}, "bits"),
        ("compose", 1.0, {"evict": "recency", "quant": "kivi"}, "memory_ratio"),
        ("compose", 0.1, {"evict": "compose", "quant": "kivi"}, "wrapper"),
        ("compose", "0.1", {"evict": "recency", "quant": "kivi"}, "memory_ratio"),
    ],
)
def test_bad_wrapper_specs_raise_scheme_error(name, ratio, knobs, message):
    with pytest.raises(SchemeError, match=message) as info:
        build_policy(name, ratio, **knobs)
    assert name in str(info.value) or message in str(info.value)


def test_describe_lists_wrappers_separately():
    rows = describe()
    names = [row.name for row in rows]
    assert names == [*scheme_names(), *ARCHITECTURES, *wrapper_names()]
    wrappers = [row for row in rows if row.family == WRAPPER]
    assert [row.name for row in wrappers] == ["pyramid", "compose"]
    assert wrappers[0].knobs == {"inner": None, "inner_knobs": {}, "beta": 20.0}
    assert all(row.family == "training-free" for row in rows if row.name in scheme_names())
    assert isinstance(build_policy("compose", 0.1, evict="recency", quant="int8"), Compose)
