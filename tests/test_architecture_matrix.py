"""Every trained-in scheme x both backbones on a tiny model: trains, serves exactly, counts its bytes and MACs.

A new scheme joins the matrix by its registry line: its bad-knob cases are derived from its knob declarations
(every value each declaration rejects, :meth:`malloc.memory.knobs.Knob.outside`), its formulas are on its class.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch

from malloc.core.state import SCALAR_BYTES, tensor_nbytes
from malloc.core.tokens import Events, TokenBatch
from malloc.memory.knobs import SchemeError, knobs_of
from malloc.memory.registry import build_architecture, build_model_for
from malloc.memory.schemes import ARCHITECTURES
from malloc.models import ModelConfig
from malloc.models.macs import count_flops, request_macs
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import MAX_SCORES, Engine

NUM_ITEMS = 40
RATIOS = (0.5, 0.25)
# (scheme, knob, value): every value that a knob's declaration rejects, for every declared knob of every scheme
BAD_KNOBS: list[tuple[str, str, Any]] = [(name, key, value) for name, cls in ARCHITECTURES.items()
                                         for key, spec in knobs_of(cls).items() if key != "memory_ratio"
                                         for value in spec.outside()]
# knobs checked against the model's sizes (tiny_config: H = 4, d_k = d_v = 4), which no declaration can say
MODEL_BOUND_KNOBS = [("gqa", {"groups": 3}, "divisor of model.heads"), ("mla", {"latent_dim": 33}, "at most")]
CASES = [(name, backbone) for name, cls in ARCHITECTURES.items() for backbone in cls.backbones]


def tiny_config(scheme: str, backbone: str, ratio: float = 0.5, layers: int = 2, **knobs) -> ModelConfig:
    return ModelConfig(backbone=backbone, dim=16, layers=layers, heads=4, head_dim=4, dropout=0.0, max_len=64,
                       scheme=scheme, memory_ratio=ratio, knobs=knobs)


def tiny(scheme: str, backbone: str, ratio: float = 0.5, layers: int = 2, seed: int = 0, **knobs):
    torch.manual_seed(seed)
    return build_model_for(tiny_config(scheme, backbone, ratio, layers, **knobs), NUM_ITEMS)


def full_tokens(events: Events, cand_items: torch.Tensor, cand_positions: torch.Tensor,
                cand_times: torch.Tensor) -> TokenBatch:
    """History events at positions 0.. followed by candidates (a training batch's layout)."""
    batch, length = events.items.shape
    valid = events.valid
    cand_valid = cand_items > 0
    return TokenBatch(
        items=torch.cat([events.items * valid, cand_items], 1),
        actions=torch.cat([events.actions, torch.zeros_like(cand_items)], 1),
        positions=torch.cat([torch.arange(length)[None].expand(batch, length), cand_positions], 1),
        timestamps=torch.cat([events.timestamps, cand_times], 1),
        is_history=torch.cat([valid, torch.zeros_like(cand_valid)], 1),
        valid=torch.cat([valid, cand_valid], 1))


def train_steps(model, steps: int = 3) -> list[float]:
    """A few Adam steps of next-item loss on random histories; returns the losses."""
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    events = synthetic_events(4, 24, NUM_ITEMS, seed=1)
    tokens = full_tokens(events, torch.zeros(4, 0, dtype=torch.int64), torch.zeros(4, 0, dtype=torch.int64),
                         torch.zeros(4, 0, dtype=torch.int64))
    losses = []
    for _ in range(steps):
        logits = model.item_logits(model(tokens))[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, NUM_ITEMS + 1), events.items[:, 1:].reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("scheme", "backbone"), CASES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_own_prefill_append_score_equals_own_full_forward(scheme, backbone, ratio):
    model = tiny(scheme, backbone, ratio)
    train_steps(model)  # trained weights, not just the init
    model.eval()
    batch, length = 3, 50
    events = synthetic_events(batch, length, NUM_ITEMS, seed=2)
    events.lengths = torch.tensor([50, 33, 41])
    cand_items = torch.randint(1, NUM_ITEMS + 1, (batch, 5), generator=torch.Generator().manual_seed(3))
    cand_positions = events.lengths[:, None].expand(-1, 5)
    cand_times = torch.full((batch, 5), 2_000_000_000)
    with torch.no_grad():
        full = model(full_tokens(events, cand_items, cand_positions, cand_times))
    states = Engine(model, prefill_chunk=7).prefill(events.slice(0, 17))
    for start, stop in ((17, 18), (18, 30), (30, 50)):  # the middle append one user at a time (max_scores=1)
        engine = Engine(model, prefill_chunk=5, max_scores=1 if start == 18 else MAX_SCORES)
        states = engine.append(states, events.slice(start, stop))
    last = torch.stack([s.last_hidden for s in states])
    assert torch.allclose(last, full[torch.arange(batch), events.lengths - 1], atol=1e-5)
    before = [s.nbytes() for s in states]
    logits = Engine(model, candidate_chunk=2).score(states, cand_items, cand_times)
    assert torch.allclose(logits, model.ctr_logits(full[:, length:], cand_items), atol=1e-5)
    assert [s.nbytes() for s in states] == before  # scoring leaves the state as it was


@pytest.mark.parametrize(("scheme", "backbone"), CASES)
@pytest.mark.parametrize("history_len", [1, 37, 130])
def test_stored_bytes_match_the_formula(scheme, backbone, history_len):
    model = tiny(scheme, backbone, 0.25).eval()
    events = synthetic_events(1, history_len, NUM_ITEMS, seed=4)
    state = Engine(model, prefill_chunk=16).prefill(events)[0]
    expected = model.scheme.state_bytes(model.cfg, history_len)
    assert state.nbytes() == expected + tensor_nbytes(state.last_hidden) + SCALAR_BYTES


@pytest.mark.parametrize(("scheme", "backbone"), CASES)
def test_request_macs_match_the_flop_counter(scheme, backbone):
    model = tiny(scheme, backbone, 0.25).eval()
    stored, new, candidates = 60, 2, 6
    events = synthetic_events(1, stored + new, NUM_ITEMS, seed=5)
    states = Engine(model, prefill_chunk=16).prefill(events.slice(0, stored))
    items = torch.randint(1, NUM_ITEMS + 1, (1, candidates), generator=torch.Generator().manual_seed(0))
    times = torch.full((1, candidates), 2_000_000_000)

    def request():
        appended = Engine(model).append(states, events.slice(stored, stored + new))
        Engine(model, candidate_chunk=3).score(appended, items, times)

    keys = model.scheme.stored_keys(model.cfg, stored)
    expected = 2 * request_macs(model.cfg, keys, new, candidates, candidate_chunk=3, scheme=model.scheme,
                                candidate_times=1)
    assert count_flops(request) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize(("scheme", "backbone"), CASES)
@pytest.mark.parametrize("layers", [2, 8])
def test_trains_without_nan_at_two_and_eight_layers(scheme, backbone, layers):
    losses = train_steps(tiny(scheme, backbone, 0.5, layers=layers), steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("scheme", "backbone"), CASES)
def test_measured_ratio_is_at_most_the_target_or_documented(scheme, backbone):
    """At a long enough history every scheme stores no more than Native, and less at a smaller ratio."""
    native = tiny("native", backbone, 1.0)
    n = 200
    native_total = native.cfg.layers * n * (native.cfg.heads * 2 * native.cfg.head_dim * 4 + 12)
    big, small = (tiny(scheme, backbone, r).scheme.state_bytes(native.cfg, n) for r in (0.5, 0.125))
    assert small <= big <= native_total


def test_every_knob_is_declared_and_its_default_passes():
    """Every field of a trained-in scheme is a declared knob (the declaration is what checks, converts and lists
    it), each has a bad-knob case, and the defaults pass their own declarations."""
    for name, cls in ARCHITECTURES.items():
        declared = knobs_of(cls)
        assert set(declared) == {f.name for f in dataclasses.fields(cls)}, f"{name}: a knob without knob(...)"
        assert {key for scheme, key, _ in BAD_KNOBS if scheme == name} == set(declared) - {"memory_ratio"}
        cls()


@pytest.mark.parametrize(("scheme", "knob", "value"), BAD_KNOBS, ids=[f"{s}-{k}-{v!r}" for s, k, v in BAD_KNOBS])
def test_bad_knob_gives_a_clear_error(scheme, knob, value):
    """Refused by the class itself and through the registry, in one line naming the scheme and the knob."""
    cls = ARCHITECTURES[scheme]
    with pytest.raises(SchemeError, match=rf"^{scheme}: {knob} must be .*, got {re.escape(repr(value))}$"):
        cls(**{knob: value})
    with pytest.raises(SchemeError, match=rf"^{scheme}: (knob )?{knob}\b") as info:
        build_architecture(tiny_config(scheme, cls.backbones[0], **{knob: value}))
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("scheme", list(ARCHITECTURES))
@pytest.mark.parametrize("ratio", [0.0, 1.5, float("nan")])
def test_bad_ratio_and_unknown_knob_give_a_clear_error(scheme, ratio):
    with pytest.raises(SchemeError, match=rf"^{scheme}: memory_ratio must be a number in \(0, 1\], got"):
        ARCHITECTURES[scheme](memory_ratio=ratio)
    with pytest.raises(SchemeError, match="unknown knob"):
        build_architecture(tiny_config(scheme, ARCHITECTURES[scheme].backbones[0], no_such_knob=1))


@pytest.mark.parametrize(("scheme", "knobs", "words"), MODEL_BOUND_KNOBS)
def test_knobs_bound_by_the_model_give_a_clear_error(scheme, knobs, words):
    with pytest.raises(SchemeError, match=rf"^{scheme}: knob {next(iter(knobs))}.*{words}"):
        build_architecture(tiny_config(scheme, ARCHITECTURES[scheme].backbones[0], **knobs))


def test_unknown_and_misplaced_scheme_names():
    with pytest.raises(SchemeError, match="unknown trained-in scheme"):
        build_architecture(tiny_config("nope", "hstu"))
    with pytest.raises(SchemeError, match="training-free policy"):
        build_architecture(tiny_config("h2o", "hstu"))
    with pytest.raises(SchemeError, match="native"):
        build_architecture(tiny_config("native", "hstu", ratio=0.5))
