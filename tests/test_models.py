"""Invariants of the backbones' serving path (docs/DESIGN.md, "Exactness rules").

- prefill + any number of appends at any split points + score equals the full uncached forward (fp32, 1e-5);
- the stored last hidden state equals the full forward's output at the last event;
- permuting candidates permutes the scores; scoring leaves the stored state unchanged;
- ``nbytes()`` equals the closed-form formula.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from malloc.config import load_config
from malloc.configio import ConfigError
from malloc.core.state import SCALAR_BYTES
from malloc.core.stats import AttentionObserver
from malloc.core.tokens import Events, TokenBatch
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.serving.engine import MAX_SCORES, Engine

NUM_ITEMS = 50
BACKBONES = ["hstu", "sasrec"]


# CTR heads: (model.candidate, model.ctr_readout, model.item_prior)
HEADS = [("item", "head", False), ("item", "dot", True), ("query", "dot", True)]


def tiny_model(backbone: str, layers: int = 2, candidate: str = "item", ctr_readout: str = "head",
               item_prior: bool = False):
    """``backbone`` "hstu+positions": HSTU with ``model.absolute_positions`` and a window (16) shorter than the
    longest test history, so positions past it share the last embedding."""
    torch.manual_seed(0)
    absolute_positions = backbone == "hstu+positions"
    cfg = ModelConfig(backbone=backbone.split("+")[0], dim=16, layers=layers, heads=4, head_dim=4, dropout=0.0,
                      max_len=16 if absolute_positions else 32, candidate=candidate, ctr_readout=ctr_readout,
                      item_prior=item_prior, absolute_positions=absolute_positions)
    model = build_model_for(cfg, NUM_ITEMS).eval()
    with torch.no_grad():  # non-zero relative biases and priors, so the test covers them
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "time_bias", "item_bias.weight")):
                p.normal_(0, 0.5)
    return model


def random_users(seed: int, lengths: list[int], num_candidates: int):
    g = torch.Generator().manual_seed(seed)
    batch, n = len(lengths), max(lengths)
    lens = torch.tensor(lengths)
    valid = torch.arange(n)[None] < lens[:, None]
    items = torch.randint(1, NUM_ITEMS + 1, (batch, n), generator=g) * valid
    actions = torch.randint(0, 3, (batch, n), generator=g) * valid
    times = torch.cumsum(torch.randint(0, 50_000, (batch, n), generator=g), dim=1)
    cands = torch.randint(1, NUM_ITEMS + 1, (batch, num_candidates), generator=g)
    cand_times = times.max(dim=1, keepdim=True).values + torch.randint(1, 1000, (batch, num_candidates), generator=g)
    return Events(items, actions, times, lens), cands, cand_times


def full_forward(model, events: Events, cands: torch.Tensor, cand_times: torch.Tensor):
    """Outputs of the uncached forward over [history; candidates at position len(history)], on the model's device."""
    events, cands, cand_times = events.to("cpu"), cands.cpu(), cand_times.cpu()
    batch, n = events.items.shape
    c = cands.shape[1]
    valid = events.valid
    tokens = TokenBatch(
        items=torch.cat([events.items, cands], 1),
        actions=torch.cat([events.actions, torch.zeros_like(cands)], 1),
        positions=torch.cat([torch.arange(n)[None].expand(batch, n), events.lengths[:, None].expand(batch, c)], 1),
        timestamps=torch.cat([events.timestamps, cand_times], 1),
        is_history=torch.cat([valid, torch.zeros(batch, c, dtype=torch.bool)], 1),
        valid=torch.cat([valid, torch.ones(batch, c, dtype=torch.bool)], 1),
    )
    tokens = TokenBatch(*(getattr(tokens, f).to(model.device) for f in
                          ("items", "actions", "positions", "timestamps", "is_history", "valid")))
    with torch.no_grad():
        hidden = model(tokens)
    last = hidden[torch.arange(batch), (events.lengths - 1).clamp(min=0)]
    return model.ctr_logits(hidden[:, n:], tokens.items[:, n:]), last


def split_events(events: Events, cuts: list[int]) -> list[Events]:
    bounds = [0, *sorted(set(cuts)), events.items.shape[1]]
    return [events.slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone", [*BACKBONES, "hstu+positions"])
@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=4),
    cut_fractions=st.lists(st.floats(0.05, 0.95), max_size=3),
    prefill_chunk=st.integers(1, 30),
    candidate_chunk=st.integers(1, 8),
    max_scores=st.sampled_from([1, 300, MAX_SCORES]),
    seed=st.integers(0, 10_000),
)
def test_cached_equals_full_forward(backbone, head, lengths, cut_fractions, prefill_chunk, candidate_chunk,
                                    max_scores, seed):
    """``max_scores`` 1 and 300 compute a chunk in groups of users (one user, or a few); every CTR head."""
    model = tiny_model(backbone, candidate=head[0], ctr_readout=head[1], item_prior=head[2])
    events, cands, cand_times = random_users(seed, lengths, num_candidates=7)
    expected_logits, expected_last = full_forward(model, events, cands, cand_times)
    n = max(lengths)
    parts = split_events(events, [max(1, int(f * n)) for f in cut_fractions])
    states = Engine(model, prefill_chunk=prefill_chunk, max_scores=max_scores).prefill(parts[0])
    for part in parts[1:]:
        states = Engine(model, prefill_chunk=prefill_chunk, max_scores=max_scores).append(states, part)
    logits = Engine(model, candidate_chunk=candidate_chunk).score(states, cands, cand_times)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    last = torch.stack([s.last_hidden for s in states])
    torch.testing.assert_close(last, expected_last, atol=1e-5, rtol=0)
    assert [s.next_position for s in states] == lengths


@pytest.mark.parametrize("backbone", BACKBONES)
def test_grouped_writes_observe_the_same_attention(backbone):
    """A write in groups of users (and in chunks only the longer users reach) folds each user's attention into
    that user's own statistics: the same as one batched write."""
    model = tiny_model(backbone)
    events, _, _ = random_users(3, [23, 9, 17, 4], num_candidates=1)
    observed = []
    for max_scores in (MAX_SCORES, 1):
        observer = AttentionObserver(2, 4, events.lengths, window=3)
        states = Engine(model, prefill_chunk=5, max_scores=max_scores).prefill(events, observer)
        observed.append((states, observer))
    (one, one_obs), (grouped, grouped_obs) = observed
    for b in range(4):
        torch.testing.assert_close(grouped[b].last_hidden, one[b].last_hidden, atol=1e-6, rtol=0)
        for layer in range(2):
            for got, want in zip(dataclasses.astuple(grouped_obs.stats(layer, b)),
                                 dataclasses.astuple(one_obs.stats(layer, b)), strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_absolute_positions_enter_the_input_and_clamp_at_the_window():
    """Under ``model.absolute_positions`` an item's input depends on its position up to ``max_len - 1`` (15 here)
    and not past it; without it, only the relative bias sees order, and the stored bytes do not change."""
    model, plain = tiny_model("hstu+positions"), tiny_model("hstu")
    assert plain.position_embedding is None

    def inputs(net, positions):
        tokens = TokenBatch(items=torch.full((1, 4), 7), actions=torch.ones(1, 4, dtype=torch.long),
                            positions=torch.tensor([positions]), timestamps=torch.zeros(1, 4, dtype=torch.long),
                            is_history=torch.ones(1, 4, dtype=torch.bool), valid=torch.ones(1, 4, dtype=torch.bool))
        return net.embed(tokens)[0]

    with torch.no_grad():
        x = inputs(model, [3, 5, 15, 40])
        assert not torch.allclose(x[0], x[1])
        torch.testing.assert_close(x[2], x[3], atol=0, rtol=0)
        y = inputs(plain, [3, 5, 15, 40])
        torch.testing.assert_close(y[0], y[3], atol=0, rtol=0)
    events, _, _ = random_users(5, [20, 7], num_candidates=1)
    assert ([s.nbytes() for s in Engine(model).prefill(events)]
            == [s.nbytes() for s in Engine(plain).prefill(events)])


def test_absolute_positions_on_sasrec_is_an_error():
    """SASRec always has its own positions: asking for HSTU's option there is refused by name, not ignored."""
    config = Path(__file__).resolve().parents[1] / "configs" / "bench" / "sasrec-retrieval.yaml"
    with pytest.raises(ConfigError, match=r"^model: absolute_positions is an HSTU option; sasrec always has"):
        load_config(config, ["model.absolute_positions=true"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_permuting_candidates_permutes_scores(backbone):
    model = tiny_model(backbone)
    events, cands, cand_times = random_users(3, [9, 4], num_candidates=11)
    states = Engine(model).prefill(events)
    scores = Engine(model, candidate_chunk=3).score(states, cands, cand_times)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    permuted = Engine(model, candidate_chunk=4).score(states, cands[:, perm], cand_times[:, perm])
    torch.testing.assert_close(permuted, scores[:, perm], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_scoring_leaves_state_unchanged(backbone):
    model = tiny_model(backbone)
    events, cands, cand_times = random_users(4, [12, 5], num_candidates=6)
    states = Engine(model).prefill(events)
    before = [[(layer.keys.clone(), layer.values.clone(), layer.positions.clone()) for layer in s.layers]
              for s in states]
    Engine(model).score(states, cands, cand_times)
    Engine(model).retrieve(states)
    for state, saved in zip(states, before, strict=True):
        assert state.next_position in (12, 5)
        for layer, (k, v, p) in zip(state.layers, saved, strict=True):
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v) and torch.equal(layer.positions, p)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_append_returns_new_states(backbone):
    model = tiny_model(backbone)
    events, _, _ = random_users(5, [6, 6], num_candidates=1)
    states = Engine(model).prefill(events.slice(0, 3))
    appended = Engine(model).append(states, events.slice(3, 6))
    assert [s.num_tokens for s in states] == [3, 3]
    assert [s.num_tokens for s in appended] == [6, 6]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nbytes_equals_formula(backbone, dtype):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=3, heads=4, head_dim=4, dropout=0.0, state_dtype=dtype)
    model = build_model_for(cfg, NUM_ITEMS).eval()
    events, _, _ = random_users(6, [17, 2], num_candidates=1)
    states = Engine(model).prefill(events)
    b = 4 if dtype == "float32" else 2
    for state, n in zip(states, [17, 2], strict=True):
        kv = cfg.layers * n * cfg.heads * (2 * cfg.head_dim) * b
        metadata = cfg.layers * n * (4 + 8)  # int32 position + int64 timestamp per stored token and layer
        assert state.nbytes() == kv + metadata + cfg.dim * b + SCALAR_BYTES


def test_empty_state_has_only_bookkeeping():
    model = tiny_model("hstu")
    assert Engine(model).empty_state().nbytes() == SCALAR_BYTES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_cached_equals_full_forward_on_gpu(backbone):
    model = tiny_model(backbone).cuda()
    events, cands, cand_times = random_users(7, [20, 9, 3], num_candidates=9)
    expected_logits, expected_last = full_forward(model, events, cands, cand_times)
    states = Engine(model, prefill_chunk=4).prefill(events.slice(0, 6).to("cuda"))
    states = Engine(model, prefill_chunk=5).append(states, events.slice(6, 20).to("cuda"))
    logits = Engine(model, candidate_chunk=4).score(states, cands.cuda(), cand_times.cuda())
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([s.last_hidden for s in states]), expected_last, atol=1e-5, rtol=0)


def test_fused_softmax_attention_equals_reference():
    from malloc.models.sasrec import softmax_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    k, v = torch.cat([k, k], 2), torch.cat([v, v], 2)
    visible = torch.rand(2, 1, 7, 14, generator=g) > 0.5
    visible[..., 0] = True
    fused, none = softmax_attention(q, k, v, visible)
    reference, probs = softmax_attention(q, k, v, visible, need_weights=True)
    assert none is None and probs.shape == (2, 4, 7, 14)
    torch.testing.assert_close(fused, reference, atol=1e-6, rtol=0)


def test_dropout_draws_as_pytorch_in_training_and_is_skipped_in_eval():
    from malloc.models.base import Dropout

    x = torch.ones(1000)
    torch.manual_seed(0)
    ours = Dropout(0.5)(x)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.Dropout(0.5)(x)) and not torch.equal(ours, x)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0)(x) is x
