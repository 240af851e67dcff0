"""Candidates the layers cannot tell apart (``candidate = "query"``) run as one token: the logits equal those of
each candidate scored alone, through ``score`` and the one-pass ``request``, on both backbones."""

from __future__ import annotations

import pytest
import torch

from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.profiling.latency import synthetic_candidates, synthetic_events
from malloc.serving.candidates import merge_candidates
from malloc.serving.engine import Engine


def test_merge_groups_each_users_candidates_by_time_and_keeps_padding_apart():
    items = torch.tensor([[5, 6, 7, 8, 0], [9, 9, 4, 0, 0]])
    times = torch.tensor([[10, 20, 10, 20, 10], [3, 3, 3, 0, 3]])
    merged = merge_candidates(items, times)
    assert merged is not None and merged.items.shape == (2, 3)
    token = merged.token
    assert token[0, 0] == token[0, 2] and token[0, 1] == token[0, 3] and token[0, 0] != token[0, 1]
    assert token[0, 4] not in (token[0, 0], token[0, 1])  # padding at time 10 does not join the real ones
    assert token[1, 0] == token[1, 1] == token[1, 2] and token[1, 3] == token[1, 4] != token[1, 0]
    assert torch.equal(merged.timestamps.gather(1, token)[items > 0], times[items > 0])
    assert bool((merged.items.gather(1, token)[items > 0] > 0).all())  # a real candidate's token is valid
    # a padding token per user, and the second user's unused third column
    assert int((merged.items == 0).sum()) == 3


def test_merge_of_one_time_per_user_is_one_token():
    merged = merge_candidates(torch.tensor([[5, 6, 7], [8, 9, 4]]), torch.tensor([[3, 3, 3], [1, 1, 1]]))
    assert merged is not None and torch.equal(merged.items, torch.tensor([[5], [8]]))
    assert torch.equal(merged.timestamps, torch.tensor([[3], [1]])) and not bool(merged.token.any())


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_merge_reads_times_of_other_dtypes(dtype):
    merged = merge_candidates(torch.tensor([[5, 6, 0]]), torch.tensor([[3, 3, 3]], dtype=dtype))
    assert merged is not None and merged.items.shape == (1, 2) and merged.token[0, 0] == merged.token[0, 1]


def test_merge_returns_none_when_no_two_candidates_share_a_time():
    assert merge_candidates(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3]])) is None
    assert merge_candidates(torch.tensor([[1]]), torch.tensor([[1]])) is None


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_merged_candidates_score_as_each_alone(backbone):
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(backbone=backbone, dim=16, heads=2, head_dim=8, max_len=64), 300)
    assert model.item_blind_candidates
    events = synthetic_events(3, 31, 300, seed=1)
    items, times = synthetic_candidates(events, 20, 300, seed=2)
    times[:, ::3] += 50  # two request times per user
    items[2, 14:] = 0  # padding
    engine = Engine(model, candidate_chunk=4)
    valid = items > 0
    with torch.no_grad():
        stored = engine.prefill(events.slice(0, 30))
        merged = engine.score(stored, items, times)
        alone = torch.cat([engine.score(stored, items[:, j:j + 1], times[:, j:j + 1]) for j in range(20)], dim=1)
        torch.testing.assert_close(merged[valid], alone[valid], atol=1e-5, rtol=0)
        _, requested = engine.request(stored, events.slice(30, 31), items, times)
        appended = engine.append(stored, events.slice(30, 31))
        each = torch.cat([engine.score(appended, items[:, j:j + 1], times[:, j:j + 1]) for j in range(20)], dim=1)
        torch.testing.assert_close(requested[valid], each[valid], atol=1e-5, rtol=0)


def test_item_aware_candidates_are_not_merged():
    model = build_model_for(ModelConfig(backbone="hstu", dim=16, heads=2, head_dim=8, candidate="item",
                                        ctr_readout="head"), 50)
    assert not model.item_blind_candidates
    assert Engine(model)._merge(torch.tensor([[1, 2]]), torch.tensor([[5, 5]])) is None
