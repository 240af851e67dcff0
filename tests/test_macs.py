"""The analytic MACs of a request agree with PyTorch's FLOP counter (FLOPs = 2 x MACs for matrix products)."""

from __future__ import annotations

import pytest
import torch

from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.models.macs import attention_macs, count_flops, format_macs, recompute_macs, request_macs, token_macs
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine

NUM_ITEMS = 50


def tiny(backbone: str, ffn_mult: int = 1):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=32,
                      ffn_mult=ffn_mult)
    return build_model_for(cfg, NUM_ITEMS).eval()


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize(("stored", "new", "candidates", "chunk"), [(40, 1, 1, None), (40, 3, 7, 3), (90, 2, 20, 8)])
def test_request_macs_match_the_flop_counter(backbone, stored, new, candidates, chunk):
    model = tiny(backbone, ffn_mult=2 if backbone == "sasrec" else 1)
    events = synthetic_events(1, stored + new, NUM_ITEMS, seed=0)
    states = Engine(model).prefill(events.slice(0, stored))
    items = torch.randint(1, NUM_ITEMS + 1, (1, candidates), generator=torch.Generator().manual_seed(0))
    times = torch.full((1, candidates), 2_000_000_000)

    def request():
        appended = Engine(model).append(states, events.slice(stored, stored + new))
        Engine(model, candidate_chunk=chunk or candidates).score(appended, items, times)

    expected = 2 * request_macs(model.cfg, stored, new, candidates, candidate_chunk=chunk, candidate_times=1)
    assert count_flops(request) == pytest.approx(expected, rel=0.05)

    def recompute():
        engine = Engine(model, prefill_chunk=32, candidate_chunk=chunk or candidates)
        engine.score(engine.prefill(events), items, times)

    expected = 2 * recompute_macs(model.cfg, stored, new, candidates, prefill_chunk=32, candidate_chunk=chunk,
                                  candidate_times=1)
    assert count_flops(recompute) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("candidate", ["query", "item"])
def test_candidates_at_several_times_match_the_flop_counter(candidate):
    """Candidates at 3 request times: 3 tokens through the layers under "query", one per candidate under
    "item"; both pay one readout per candidate."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="hstu", dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=32,
                      candidate=candidate)
    model = build_model_for(cfg, NUM_ITEMS).eval()
    states = Engine(model).prefill(synthetic_events(1, 30, NUM_ITEMS, seed=0))
    items = torch.randint(1, NUM_ITEMS + 1, (1, 12), generator=torch.Generator().manual_seed(0))
    times = torch.tensor([[2_000_000_000 + j % 3 for j in range(12)]])
    expected = 2 * request_macs(cfg, 30, 0, 12, candidate_times=3)
    assert count_flops(lambda: Engine(model).score(states, items, times)) == pytest.approx(expected, rel=0.05)
    assert (request_macs(cfg, 30, 0, 12, candidate_times=3) < request_macs(cfg, 30, 0, 12)) == (candidate == "query")


def test_retrieval_read_macs():
    model = tiny("hstu")
    states = Engine(model).prefill(synthetic_events(1, 10, NUM_ITEMS, seed=1))
    macs = request_macs(model.cfg, 10, 0, 0, catalogue=NUM_ITEMS + 1)
    assert count_flops(lambda: Engine(model).retrieve(states)) == pytest.approx(2 * macs, rel=0.05)


def test_macs_formula_pieces():
    cfg = ModelConfig(dim=64, layers=2, heads=4, head_dim=16)
    assert token_macs(cfg) == 2 * (64 * 4 * 64 + 64 * 64)  # HSTU: uvqk + output, no feed-forward
    assert attention_macs(cfg, 1, 100) == 2 * 4 * 100 * 32
    # fewer stored events, fewer MACs; linear in the stored count
    assert request_macs(cfg, 50, 1, 10) < request_macs(cfg, 100, 1, 10)
    slope = request_macs(cfg, 101, 1, 10) - request_macs(cfg, 100, 1, 10)
    assert slope == pytest.approx(attention_macs(cfg, 11, 1))
    assert recompute_macs(cfg, 100, 1, 10) > request_macs(cfg, 100, 1, 10)
    assert format_macs(1.5e6) == "1.5 MMAC" and format_macs(0) == "0 MAC"
