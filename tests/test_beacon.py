"""Activation Beacon at small chunks, where many chunks close: the mask against a brute-force reading of the
serving rule, cached == full forward across chunk boundaries, the stored tokens, MACs of a request that closes
chunks, gradients into the beacon parameters, and the knob rule."""

from __future__ import annotations

import pytest
import torch

from malloc.core.tokens import Events, TokenBatch
from malloc.memory.policy import SchemeError
from malloc.memory.registry import build_model_for
from malloc.memory.schemes.token_merge.beacon import (
    Beacon,
    beacon_offsets,
    beacon_visibility,
    insert_beacons,
    stored_beacons,
)
from malloc.models import ModelConfig
from malloc.models.macs import count_flops, request_macs
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine

NUM_ITEMS = 40


def tiny(backbone: str, chunk: int, ratio: float = 0.5, seed: int = 0, **knobs):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=64,
                      scheme="beacon", memory_ratio=ratio, knobs={"chunk": chunk, **knobs})
    return build_model_for(cfg, NUM_ITEMS)


def full_tokens(events: Events, cands: torch.Tensor) -> TokenBatch:
    """History at positions 0.. then candidates at each user's history length (a training batch's layout)."""
    batch, length = events.items.shape
    valid, cand_valid = events.valid, cands > 0
    return TokenBatch(
        items=torch.cat([events.items * valid, cands], 1),
        actions=torch.cat([events.actions, torch.zeros_like(cands)], 1),
        positions=torch.cat([torch.arange(length)[None].expand(batch, length),
                             events.lengths[:, None].expand_as(cands)], 1),
        timestamps=torch.cat([events.timestamps, torch.full_like(cands, 2_000_000_000)], 1),
        is_history=torch.cat([valid, torch.zeros_like(cand_valid)], 1),
        valid=torch.cat([valid, cand_valid], 1))


def reference_mask(tokens: TokenBatch, chunk: int) -> torch.Tensor:
    """The serving rule read literally, pair by pair: ``(B, 1, T, T)``."""
    batch, length = tokens.shape
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        pos, hist, beacon = tokens.positions[b].tolist(), tokens.is_history[b].tolist(), tokens.beacon[b].tolist()
        for i in range(length):
            for j in range(length):
                if i == j:
                    mask[b, 0, i, j] = True
                elif not hist[j]:
                    continue
                elif beacon[j] and beacon[i]:  # beacons of earlier chunks, earlier beacons of its own chunk
                    mask[b, 0, i, j] = pos[j] // chunk < pos[i] // chunk or (pos[j] // chunk == pos[i] // chunk
                                                                             and j < i)
                elif beacon[j]:  # an event or candidate: beacons of chunks that end at or before it
                    mask[b, 0, i, j] = (pos[j] // chunk + 1) * chunk <= pos[i]
                elif beacon[i]:  # a beacon: every event of its chunk
                    mask[b, 0, i, j] = pos[j] // chunk == pos[i] // chunk
                else:  # an event or candidate: earlier events of its own chunk
                    mask[b, 0, i, j] = pos[j] // chunk == pos[i] // chunk and pos[j] < pos[i]
    return mask


@pytest.mark.parametrize("placement", ["end", "spread"])
@pytest.mark.parametrize(("chunk", "beacons"), [(1, 1), (3, 2), (4, 1), (5, 3)])
def test_inserted_beacons_and_mask_follow_the_rule(chunk, beacons, placement):
    events = synthetic_events(3, 13, NUM_ITEMS, seed=0)
    events.lengths = torch.tensor([13, 7, 10])
    tokens = full_tokens(events, torch.tensor([[3, 4], [5, 0], [6, 7]]))
    expanded, index = insert_beacons(tokens, chunk, beacons, placement)
    offsets = beacon_offsets(chunk, beacons, placement).repeat(13 // chunk)
    for b, n in enumerate(events.lengths.tolist()):
        beacon = expanded.beacon[b]
        assert int(beacon.sum()) == beacons * (n // chunk)
        assert torch.equal(expanded.positions[b][beacon] % chunk, offsets[:int(beacon.sum())])
        assert torch.equal(expanded.items[b, index[b]], tokens.items[b])  # originals in order, at `index`
        assert (expanded.is_history[b][beacon]).all() and not expanded.valid[b, index[b, -1] + 1:].any()
    assert torch.equal(beacon_visibility(expanded, None, chunk), reference_mask(expanded, chunk))


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize(("chunk", "ratio", "placement"), [(1, 1.0, "end"), (3, 0.5, "end"), (4, 0.25, "end"),
                                                           (5, 0.4, "end"), (4, 0.25, "spread"), (5, 0.4, "spread"),
                                                           (8, 0.5, "spread")])
def test_cached_serving_equals_the_full_forward_across_chunks(backbone, chunk, ratio, placement):
    model = tiny(backbone, chunk, ratio, placement=placement)
    events = synthetic_events(3, 30, NUM_ITEMS, seed=2)
    events.lengths = torch.tensor([30, 19, 24])
    model.train()  # a few steps, so beacon weights differ from the events'
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(full_tokens(events, torch.zeros(3, 0, dtype=torch.int64))).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    cands = torch.randint(1, NUM_ITEMS + 1, (3, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(full_tokens(events, cands))
    states = Engine(model, prefill_chunk=3).prefill(events.slice(0, 7))
    for start, stop in ((7, 8), (8, 9), (9, 17), (17, 30)):
        states = Engine(model, prefill_chunk=4).append(states, events.slice(start, stop))
    last = torch.stack([s.last_hidden for s in states])
    assert torch.allclose(last, full[torch.arange(3), events.lengths - 1], atol=1e-5)
    logits = Engine(model, candidate_chunk=3).score(states, cands, torch.full((3, 4), 2_000_000_000))
    assert torch.allclose(logits, model.ctr_logits(full[:, 30:], cands), atol=1e-5)
    for state, n in zip(states, events.lengths.tolist(), strict=True):
        assert state.nbytes() == (model.scheme.state_bytes(model.cfg, n) + state.last_hidden.numel() * 4 + 16)
        positions = state.layers[0].positions[0]
        beacons = stored_beacons(positions, torch.ones_like(positions, dtype=torch.bool), chunk)
        assert int(beacons.sum()) == model.scheme.beacons_per_chunk() * (n // chunk)
        assert (positions[~beacons] >= n // chunk * chunk).all()  # only the open chunk's events stay raw


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize(("chunk", "stored", "new"), [(8, 62, 2), (4, 57, 9), (32, 60, 2)])
def test_request_macs_with_closing_chunks_match_the_flop_counter(backbone, chunk, stored, new):
    model = tiny(backbone, chunk, 0.25).eval()
    events = synthetic_events(1, stored + new, NUM_ITEMS, seed=5)
    states = Engine(model, prefill_chunk=16).prefill(events.slice(0, stored))
    items = torch.randint(1, NUM_ITEMS + 1, (1, 6), generator=torch.Generator().manual_seed(0))

    def request():
        appended = Engine(model).append(states, events.slice(stored, stored + new))
        Engine(model, candidate_chunk=3).score(appended, items, torch.full((1, 6), 2_000_000_000))

    keys = model.scheme.stored_keys(model.cfg, stored)
    expected = 2 * request_macs(model.cfg, keys, new, 6, candidate_chunk=3, scheme=model.scheme, history_len=stored,
                                candidate_times=1)
    assert count_flops(request) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_training_reaches_the_beacon_parameters(backbone):
    model = tiny(backbone, 4, 0.5)
    model.train()
    events = synthetic_events(4, 24, NUM_ITEMS, seed=1)
    tokens = full_tokens(events, torch.zeros(4, 0, dtype=torch.int64))
    loss = model.ctr_logits(model(tokens), tokens.items).square().mean()
    loss.backward()
    for layer in model.layers:
        beacon_linear = layer.beacon_uvqk if backbone == "hstu" else layer.beacon_qkv
        assert layer.beacon_embedding.grad.abs().sum() > 0 and beacon_linear.weight.grad.abs().sum() > 0


def test_knob_rule_and_errors():
    assert Beacon(memory_ratio=0.25).beacons_per_chunk() == 8  # alpha = 4, m = ceil(32 / 4)
    assert Beacon(memory_ratio=0.3, chunk=10).beacons_per_chunk() == 3
    assert Beacon(chunk=10, alpha=3).beacons_per_chunk() == 4
    cfg = ModelConfig(scheme="beacon", memory_ratio=0.25)
    assert Beacon(memory_ratio=0.25).stored_keys(cfg, 70) == 8 * 2 + 6
    assert Beacon(memory_ratio=0.25).append_tokens(cfg, 62, 3) == 3 + 8
    assert beacon_offsets(32, 8, "spread").tolist() == [3, 7, 11, 15, 19, 23, 27, 31]
    assert beacon_offsets(10, 3, "spread").tolist() == [3, 6, 9] and beacon_offsets(10, 3, "end").tolist() == [9] * 3
    for knobs, name in (({"alpha": 0.5}, "alpha"), ({"chunk": 0}, "chunk"), ({"chunk": 2.5}, "chunk"),
                        ({"placement": "middle"}, "placement")):
        with pytest.raises(SchemeError, match=f"beacon.*{name}"):
            Beacon(**knobs)
