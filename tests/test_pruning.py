"""Token-pruning schemes (H2O, SnapKV, TOVA, random, StreamingLLM) against the paper formulas, computed by hand.

The brute-force tests recompute every attention weight with the model's own layers, one layer at a time
(``layer(..., need_weights=True)``), apply the paper's formula with explicit loops over queries and keys, and
check that the stored positions equal the expected selection exactly: no shared code with ``AttentionObserver``
or the policies.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch

from malloc.core.tokens import Events, KVBlock, TokenBatch
from malloc.memory.policy import CachePolicy, EvictionPolicy, SchemeError, native_token_bytes
from malloc.memory.registry import build_model_for
from malloc.memory.schemes import POLICIES
from malloc.memory.schemes.reference.native import Native
from malloc.memory.schemes.token_prune.h2o import H2O
from malloc.memory.schemes.token_prune.random_policy import Random
from malloc.memory.schemes.token_prune.snapkv import SnapKV
from malloc.memory.schemes.token_prune.streaming_llm import StreamingLLM
from malloc.memory.schemes.token_prune.tova import TOVA
from malloc.models import ModelConfig
from malloc.serving.engine import Engine

NUM_ITEMS = 50
BACKBONES = ["hstu", "sasrec"]
HEADS, HEAD_DIM = 4, 4
PRUNING = [Random, StreamingLLM, H2O, SnapKV, TOVA]


def tiny_model(backbone: str):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=HEADS, head_dim=HEAD_DIM, dropout=0.0, max_len=64)
    model = build_model_for(cfg, NUM_ITEMS).eval()
    with torch.no_grad():  # non-zero relative biases, so the weights depend on them
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "time_bias")):
                p.normal_(0, 0.5)
    return model


def random_users(seed: int, lengths: list[int], start_time: int = 0) -> Events:
    g = torch.Generator().manual_seed(seed)
    batch, n = len(lengths), max(lengths)
    lens = torch.tensor(lengths)
    valid = torch.arange(n)[None] < lens[:, None]
    items = torch.randint(1, NUM_ITEMS + 1, (batch, n), generator=g) * valid
    actions = torch.randint(0, 3, (batch, n), generator=g) * valid
    times = start_time + torch.cumsum(torch.randint(1, 50_000, (batch, n), generator=g), dim=1)
    return Events(items, actions, times, lens)


def user_events(events: Events, b: int) -> Events:
    t = int(events.lengths[b])
    return Events(events.items[b:b + 1, :t], events.actions[b:b + 1, :t], events.timestamps[b:b + 1, :t],
                  events.lengths[b:b + 1])


def layer_by_layer(model, events: Events, start: int = 0, stored=None):
    """One user's attention, recomputed with the model's layers: per layer ``(weights (H, t, S), values (H, S, d),
    key positions (H, S))`` over keys ``[stored; new]``, the stored layers (a UserState's) as the cache."""
    t = events.items.shape[1]
    valid = torch.ones(1, t, dtype=torch.bool)
    tokens = TokenBatch(items=events.items, actions=events.actions, positions=start + torch.arange(t)[None],
                        timestamps=events.timestamps, is_history=valid, valid=valid)
    out = []
    with torch.no_grad():
        x = model.embed(tokens)
        for index, layer in enumerate(model.layers):
            cache = None
            if stored is not None:
                s = stored.layers[index]
                cache = KVBlock(s.keys[None].float(), s.values[None].float(), s.positions[None].long(),
                                s.timestamps[None], torch.ones_like(s.positions[None], dtype=torch.bool))
            x, block, weights = layer(x, tokens, cache, need_weights=True)
            new_pos = tokens.positions[0].expand(HEADS, -1)
            if cache is None:
                values, key_pos = block.values[0], new_pos
            else:
                values = torch.cat([cache.values[0], block.values[0]], dim=1)
                key_pos = torch.cat([cache.positions[0].expand(HEADS, -1), new_pos], dim=1)
            out.append((weights[0], values, key_pos))
    return out


def expected_budget(ratio: float, n: int, per_head: bool, scores: bool) -> int:
    """The eviction budget rule, from the byte formula: keys+values, and per selection row int32 + int64 (+ f32)."""
    kv = HEADS * 2 * HEAD_DIM * 4
    native = kv + 4 + 8
    kept = kv + (HEADS if per_head else 1) * (4 + 8 + (4 if scores else 0))
    return math.floor(ratio * n * native / kept + 1e-9)


def top_by(score: dict[int, float], count: int) -> set[int]:
    """The ``count`` keys with the highest score; ties go to the larger key (the more recent event)."""
    return set(sorted(score, key=lambda j: (score[j], j), reverse=True)[:count])


def contributions(weights, values, backbone: str, queries: range, keys: range) -> list[list[list[float]]]:
    """``c[h][q][k]`` = |a| * ||v_k|| (HSTU) or a (SASRec) for query row q and key column k, 0 if k is not visible."""
    w = weights.tolist()
    norms = values.norm(dim=-1).tolist()
    out = []
    for h in range(HEADS):
        rows = []
        for q in queries:
            row = []
            for k in keys:
                scale = norms[h][k] if backbone == "hstu" else 1.0
                row.append(abs(w[h][q][k]) * scale)
            rows.append(row)
        out.append(rows)
    return out


# -- H2O ---------------------------------------------------------------------------------------------------------
def h2o_expected_write(model, events: Events, ratio: float, backbone: str):
    """Per layer and head: (kept positions, accumulated sums by position)."""
    n = events.items.shape[1]
    budget = expected_budget(ratio, n, per_head=True, scores=True)
    recent = int(0.5 * budget + 1e-9)
    result = []
    for weights, values, _ in layer_by_layer(model, events):
        c = contributions(weights, values, backbone, range(n), range(n))
        heads = []
        for h in range(HEADS):
            sums = {j: sum(c[h][i][j] for i in range(j, n)) for j in range(n)}  # queries that see j: i >= j
            mean = {j: sums[j] / (n - j) for j in range(n)}
            keep = set(range(n - recent, n))
            keep |= top_by({j: mean[j] for j in range(n) if j not in keep}, budget - len(keep))
            heads.append((sorted(keep), sums))
        result.append(heads)
    return result


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("seed", "chunk"), [(0, 1024), (1, 8)])
def test_h2o_write_and_append_equal_brute_force(backbone, seed, chunk):
    """``chunk`` 8 writes in chunks that only the longer users reach (their statistics fold into their own rows)."""
    model = tiny_model(backbone)
    ratio = 0.5
    policy = H2O(memory_ratio=ratio)
    lengths = [int(x) for x in torch.randint(20, 41, (3,), generator=torch.Generator().manual_seed(seed))]
    assert len(set(lengths)) == 3
    history = random_users(seed, lengths)
    engine = Engine(model, policy, prefill_chunk=chunk)
    states = engine.write(history)
    new = random_users(seed + 100, [5, 1, 3], start_time=10**7)
    appended = engine.append(states, new)
    for b, n in enumerate(lengths):
        expected = h2o_expected_write(model, user_events(history, b), ratio, backbone)
        for index, stored in enumerate(states[b].layers):
            assert stored.keys.shape == (HEADS, len(expected[index][0][0]), HEAD_DIM)
            for h in range(HEADS):
                keep, sums = expected[index][h]
                assert stored.positions[h].tolist() == keep, (b, index, h)
                torch.testing.assert_close(stored.scores[h], torch.tensor([sums[j] for j in keep]), rtol=1e-4,
                                           atol=1e-7)
        # one append: the new events against the stored (per-head) layers; sums accumulate
        t = int(new.lengths[b])
        total = n + t
        budget = expected_budget(ratio, total, per_head=True, scores=True)
        recent = int(0.5 * budget + 1e-9)
        per_layer = layer_by_layer(model, user_events(new, b), start=n, stored=states[b])
        for index, (weights, values, key_pos) in enumerate(per_layer):
            stored_n = states[b].layers[index].num_tokens
            c = contributions(weights, values, backbone, range(t), range(stored_n + t))
            got = appended[b].layers[index]
            for h in range(HEADS):
                _, sums_before = expected[index][h]
                row = key_pos[h].tolist()
                sums = {}
                for col, p in enumerate(row):
                    old = sums_before[p] if col < stored_n else 0.0
                    sums[p] = old + sum(c[h][i][col] for i in range(t) if n + i >= p)
                mean = {p: sums[p] / (total - p) for p in row}
                keep = {p for p in row if p >= total - recent}
                keep |= top_by({p: mean[p] for p in row if p not in keep}, budget - len(keep))
                keep = sorted(keep)
                assert got.positions[h].tolist() == keep, (b, index, h)
                torch.testing.assert_close(got.scores[h], torch.tensor([sums[p] for p in keep]), rtol=1e-4,
                                           atol=1e-7)


def test_h2o_counts_are_implied_by_positions():
    """The carried sums are normalised by ``history_len - p``: check it is what the observer counted."""
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Spy(H2O):
        def compress(self, layer, stats, ctx):
            seen.append((layer, stats, ctx, 0))
            return super().compress(layer, stats, ctx)

        def merge(self, stored, new, stats, ctx):
            seen.append((stored.extend(new), stats, ctx, int(new.positions[0, 0])))
            return super().merge(stored, new, stats, ctx)

    engine = Engine(tiny_model("sasrec"), Spy(memory_ratio=0.4))
    states = engine.write(random_users(3, [25, 30]))
    engine.append(states, random_users(4, [4, 2], start_time=10**7))
    assert len(seen) == 2 * 2 * 2
    for layer, stats, ctx, start in seen:
        positions = layer.positions.long().expand(HEADS, -1)
        count = stats.query_count.gather(1, positions)
        # write: every history query at or after p; append: the new queries at or after p
        expected = (ctx.history_len - positions.clamp(min=start)).float()
        assert torch.equal(count, expected)


# -- SnapKV ------------------------------------------------------------------------------------------------------
def snapkv_keep(row: list[int], votes: dict[int, float], total: int, budget: int, window: int, kernel: int
                ) -> list[int]:
    """SnapKV's selection over one head's chronological ``row`` of positions."""
    in_window = [p for p in row if p >= total - window]
    if budget <= len(in_window):
        return sorted(row)[len(row) - budget:] if budget else []
    earlier = [p for p in row if p < total - window]
    half = kernel // 2
    pooled = {}
    for a, p in enumerate(earlier):
        pooled[p] = max(votes[earlier[b]] for b in range(max(0, a - half), min(len(earlier), a + half + 1)))
    return sorted(set(in_window) | top_by(pooled, budget - len(in_window)))


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("window", "kernel", "chunk"), [(8, 5, 1024), (3, 3, 1024), (4, 1, 16), (8, 3, 16)])
def test_snapkv_write_and_append_equal_brute_force(backbone, window, kernel, chunk):
    """``chunk`` 16 writes the two longer users' last events in a chunk of their own (their window's votes)."""
    model = tiny_model(backbone)
    ratio = 0.45
    policy = SnapKV(memory_ratio=ratio, window=window, kernel=kernel)
    assert policy.observation_window == window
    lengths = [20, 33, 40, 17]
    history = random_users(window, lengths)
    engine = Engine(model, policy, prefill_chunk=chunk)
    states = engine.write(history)
    new = random_users(window + 100, [1, 6, 12, 3], start_time=10**7)
    appended = engine.append(states, new)
    for b, n in enumerate(lengths):
        budget = expected_budget(ratio, n, per_head=True, scores=False)
        for index, (weights, values, _) in enumerate(layer_by_layer(model, user_events(history, b))):
            c = contributions(weights, values, backbone, range(n), range(n))
            stored = states[b].layers[index]
            assert stored.keys.shape == (HEADS, min(budget, n), HEAD_DIM)
            for h in range(HEADS):
                votes = {j: sum(c[h][i][j] for i in range(n - window, n) if i >= j) for j in range(n)}
                keep = snapkv_keep(list(range(n)), votes, n, budget, window, kernel)
                assert stored.positions[h].tolist() == keep, (b, index, h)
        # append: the new events are the voters (those inside the window)
        t = int(new.lengths[b])
        total = n + t
        budget = expected_budget(ratio, total, per_head=True, scores=False)
        per_layer = layer_by_layer(model, user_events(new, b), start=n, stored=states[b])
        for index, (weights, values, key_pos) in enumerate(per_layer):
            stored_n = states[b].layers[index].num_tokens
            c = contributions(weights, values, backbone, range(t), range(stored_n + t))
            for h in range(HEADS):
                row = key_pos[h].tolist()
                votes = {p: sum(c[h][i][col] for i in range(t) if n + i >= total - window and n + i >= p)
                         for col, p in enumerate(row)}
                keep = snapkv_keep(row, votes, total, budget, window, kernel)
                assert appended[b].layers[index].positions[h].tolist() == keep, (b, index, h)


def test_snapkv_budget_below_window_keeps_most_recent():
    policy = SnapKV(memory_ratio=0.2, window=8)
    states = Engine(tiny_model("hstu"), policy).write(random_users(0, [30]))
    budget = expected_budget(0.2, 30, per_head=True, scores=False)
    assert budget < 8
    for stored in states[0].layers:
        assert stored.positions.tolist() == [list(range(30 - budget, 30))] * HEADS


# -- TOVA, StreamingLLM, random ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", BACKBONES)
def test_tova_keeps_what_the_latest_event_attends_to(backbone):
    model = tiny_model(backbone)
    lengths = [24, 37]
    history = random_users(5, lengths)
    states = Engine(model, TOVA(memory_ratio=0.4)).write(history)
    for b, n in enumerate(lengths):
        budget = expected_budget(0.4, n, per_head=False, scores=False)
        for index, (weights, values, _) in enumerate(layer_by_layer(model, user_events(history, b))):
            c = contributions(weights, values, backbone, range(n - 1, n), range(n))
            score = {j: sum(c[h][0][j] for h in range(HEADS)) / HEADS for j in range(n)}
            assert states[b].layers[index].positions.tolist() == [sorted(top_by(score, budget))]


@pytest.mark.parametrize(("sink", "ratio"), [(4, 0.5), (0, 0.5), (4, 0.1), (40, 0.5)])
def test_streaming_llm_keeps_sinks_and_recent(sink, ratio):
    n = 30
    states = Engine(tiny_model("hstu"), StreamingLLM(memory_ratio=ratio, sink=sink)).write(random_users(1, [n]))
    budget = expected_budget(ratio, n, per_head=False, scores=False)
    sinks = min(sink, budget - 1)
    expected = list(range(sinks)) + list(range(n - (budget - sinks), n))
    for stored in states[0].layers:
        assert stored.positions.tolist() == [expected]


def test_random_is_deterministic_and_independent_of_the_batch():
    model = tiny_model("sasrec")
    policy = Random(memory_ratio=0.4, seed=3)
    history = random_users(7, [20, 31, 26])
    first = Engine(model, policy).write(history)
    again = Engine(model, policy).write(history)
    order = [2, 0, 1]
    shuffled = Events(history.items[order], history.actions[order], history.timestamps[order],
                      history.lengths[order])
    permuted = Engine(model, policy, prefill_chunk=7).write(shuffled)
    alone = Engine(model, policy).write(user_events(history, 1))
    for b, state in enumerate(first):
        for index, stored in enumerate(state.layers):
            assert torch.equal(stored.positions, again[b].layers[index].positions)
            assert torch.equal(stored.positions, permuted[order.index(b)].layers[index].positions)
    for index, stored in enumerate(first[1].layers):
        assert torch.equal(stored.positions, alone[0].layers[index].positions)
    # a different seed draws differently, layers draw differently, and the draw is not recency
    other = Engine(model, Random(memory_ratio=0.4, seed=4)).write(history)
    assert any(not torch.equal(first[b].layers[0].positions, other[b].layers[0].positions) for b in range(3))
    assert any(not torch.equal(s.layers[0].positions, s.layers[1].positions) for s in first)
    assert any(s.layers[0].positions[0].tolist() != list(range(n - s.layers[0].num_tokens, n))
               for s, n in zip(first, [20, 31, 26], strict=True))


# -- every pruning scheme ----------------------------------------------------------------------------------------
def test_pruning_schemes_are_registered():
    for cls in PRUNING:
        assert POLICIES[cls.name] is cls
        assert cls.granularity == "token-prune"
        assert issubclass(cls, EvictionPolicy)


@dataclasses.dataclass(frozen=True)
class ObservedNative(CachePolicy):
    """Native served with the attention weights computed (the path query-aware schemes run on)."""

    needs_attention: ClassVar[bool] = True


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("cls", PRUNING)
def test_ratio_one_equals_native(backbone, cls):
    model = tiny_model(backbone)
    history = random_users(2, [9, 17, 4])
    new = random_users(3, [2, 1, 3], start_time=10**7)
    cands = torch.randint(1, NUM_ITEMS + 1, (3, 5), generator=torch.Generator().manual_seed(0))
    times = torch.full((3, 5), 10**8)
    # bitwise against Native on the same kernels (SASRec's fused attention returns no weights, so schemes that
    # observe attention run the reference softmax), and to float precision against plain Native
    reference = ObservedNative() if cls.needs_attention else Native()
    logits, retrieval, stored = [], [], []
    for policy in (reference, cls(memory_ratio=1.0), Native()):
        engine = Engine(model, policy, prefill_chunk=5)
        states = engine.append(engine.write(history), new)
        assert [s.num_tokens for s in states] == [11, 18, 7]
        logits.append(engine.score(states, cands, times))
        retrieval.append(engine.retrieve(states))
        stored.append([s.nbytes() for s in states])
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(retrieval[0], retrieval[1])
    torch.testing.assert_close(logits[1], logits[2], rtol=1e-5, atol=1e-5)
    assert stored[0] == stored[1] == stored[2]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("cls", PRUNING)
@pytest.mark.parametrize("ratio", [0.15, 0.6])
def test_budget_holds_through_appends(backbone, cls, ratio):
    model = tiny_model(backbone)
    policy = cls(memory_ratio=ratio)
    engine = Engine(model, policy)
    lengths = [12, 3, 25]
    states = engine.write(random_users(11, lengths))
    history = list(lengths)
    g = torch.Generator().manual_seed(12)
    for step in range(21):
        if step:
            more = [int(x) for x in torch.randint(0, 4, (3,), generator=g)]
            states = engine.append(states, random_users(100 + step, more, start_time=10**7 * step))
            history = [h + m for h, m in zip(history, more, strict=True)]
        for state, n in zip(states, history, strict=True):
            assert state.next_position == n
            for stored in state.layers:
                budget = policy.budget(stored, n)
                rows = HEADS if cls.per_head else 1
                assert stored.keys.shape == (HEADS, min(budget, n), HEAD_DIM)  # stored for real, not masked
                assert stored.positions.shape == (rows, min(budget, n))
                assert stored.nbytes() <= ratio * n * native_token_bytes(stored) * (1 + 1e-9)  # float rounding
                for row in stored.positions.tolist():
                    assert row == sorted(set(row)) and all(0 <= p < n for p in row)
                if cls.carries_scores:
                    assert stored.scores is not None and stored.scores.shape == stored.positions.shape


@pytest.mark.parametrize("cls", [H2O, SnapKV])
def test_per_head_selections_differ_between_heads(cls):
    states = Engine(tiny_model("hstu"), cls(memory_ratio=0.3)).write(random_users(0, [40, 36]))
    layers = [layer for state in states for layer in state.layers]
    assert all(layer.positions.shape[0] == HEADS for layer in layers)
    assert any(not torch.equal(layer.positions[0], layer.positions[h]) for layer in layers for h in range(HEADS))


@pytest.mark.parametrize(("cls", "knobs", "message"), [
    (H2O, {"recent_fraction": 1.5}, "h2o: recent_fraction"),
    (H2O, {"recent_fraction": -0.1}, "h2o: recent_fraction"),
    (H2O, {"memory_ratio": 0.0}, "h2o: memory_ratio"),
    (SnapKV, {"window": 0}, "snapkv: window"),
    (SnapKV, {"window": 2.5}, "snapkv: window"),
    (SnapKV, {"kernel": 4}, "snapkv: kernel"),
    (SnapKV, {"kernel": 0}, "snapkv: kernel"),
    (TOVA, {"memory_ratio": 1.5}, "tova: memory_ratio"),
    (Random, {"seed": 1.5}, "random: seed"),
    (StreamingLLM, {"sink": -1}, "streaming_llm: sink"),
])
def test_bad_knobs_raise_scheme_error(cls, knobs, message):
    with pytest.raises(SchemeError, match=message):
        cls(**knobs)


def test_h2o_evict_without_carried_scores_uses_observed_means():
    """``evict`` on a layer with no carried sums (as Compose calls it) selects as the write does."""
    model = tiny_model("hstu")
    history = random_users(9, [30])
    policy = H2O(memory_ratio=0.5)
    written = Engine(model, policy).write(history)

    @dataclasses.dataclass(frozen=True)
    class NoCarry(H2O):
        def compress(self, layer, stats, ctx):
            return self.evict(layer, stats, ctx)

    plain = Engine(model, NoCarry(memory_ratio=0.5)).write(history)
    for a, b in zip(written[0].layers, plain[0].layers, strict=True):
        assert torch.equal(a.positions, b.positions)
