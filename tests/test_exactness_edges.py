"""Edges of the exactness matrix: cached write + appends + score equal to the plain full forward.

The matrices (tests/test_scheme_matrix.py, tests/test_architecture_matrix.py) check exactness on histories shorter
than ``max_len``, every user with events, every append with events. This file checks, for every training-free
scheme at ratio 1 (on a Native model: each equals Native there) and every trained-in scheme against its own full
forward, on both backbones:

- histories longer than ``model.max_len``: one user's whole history written at once, and one user written as
  the serving replay writes (the last ``max_len`` events, positions counted from the first of them), then
  appended past ``max_len`` (SASRec's shared last position row, HSTU's constant normaliser, windows, chunks);
- a cold user (a 0-event write next to users with events, and a write where every user is cold), then appends;
- 0-event appends: a user with no new event keeps its state object, and a batch with none leaves every state and
  every score as it was;
- Linformer's column clamping: events at positions ``>= P = max_len`` all use column ``P - 1`` of ``E`` and
  ``F``, checked against the full forward and against the projections computed from the definition;
- one user of 4,096 events in float64 (model and inputs; tolerance 1e-9), so that rounding cannot hide a logic
  error behind float32's 1e-5.

Precision schemes quantize at any ratio and Compose rejects ratio 1, so they have no exact case here (the scheme
matrix skips them the same way); a policy and a trained-in layer must own what they store
(tests/test_state_storage.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from malloc.core.state import UserState
from malloc.core.tokens import Events, TokenBatch
from malloc.memory.registry import build_model_for, build_policy
from malloc.memory.schemes import POLICIES
from malloc.memory.schemes.sequence.linformer import ProjectionState
from malloc.models import ModelConfig
from malloc.models.base import SequentialRecommender
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine
from test_architecture_matrix import CASES as ARCHITECTURE_CASES
from test_architecture_matrix import tiny, train_steps
from test_scheme_matrix import SPECS, one_thread, tiny_model  # noqa: F401 (one_thread: autouse fixture)
from test_state_storage import tensors_of

NUM_ITEMS = 40
CANDIDATES = 4
ATOL = 1e-5  # float32, as the matrices
ATOL_FLOAT64 = 1e-9
BACKBONES = ["hstu", "sasrec"]
# (id, registry name, knobs) of the training-free schemes that store every event densely at ratio 1
EXACT_SPECS = [spec for spec in SPECS
               if spec[1] != "compose" and not (spec[1] in POLICIES and POLICIES[spec[1]].granularity == "precision")]
# every model case: ("policy", spec id) on the Native tiny model, or ("trained", scheme) with its own layers
MODEL_CASES = [pytest.param("policy", spec[0], backbone, id=f"{spec[0]}-{backbone}")
               for spec in EXACT_SPECS for backbone in BACKBONES]
MODEL_CASES += [pytest.param("trained", scheme, backbone, id=f"{scheme}-{backbone}")
                for scheme, backbone in ARCHITECTURE_CASES]
_TRAINED: dict[tuple[str, str], SequentialRecommender] = {}


def trained(scheme: str, backbone: str) -> SequentialRecommender:
    """The trained-in tiny model of the architecture matrix (ratio 1/2, max_len 64), after a few training steps."""
    if (scheme, backbone) not in _TRAINED:
        model = tiny(scheme, backbone, 0.5)
        train_steps(model)  # trained weights, not just the init
        _TRAINED[scheme, backbone] = model.eval()
    return _TRAINED[scheme, backbone]


def engine_for(kind: str, name: str, backbone: str, prefill_chunk: int) -> Engine:
    """A Native tiny model served by the training-free scheme ``name`` at ratio 1, or a trained-in model served
    by its own state rule."""
    if kind == "trained":
        return Engine(trained(name, backbone), prefill_chunk=prefill_chunk, candidate_chunk=3)
    _, registry_name, knobs = next(spec for spec in EXACT_SPECS if spec[0] == name)
    return Engine(tiny_model(backbone), build_policy(registry_name, 1.0, **knobs), prefill_chunk=prefill_chunk,
                  candidate_chunk=3)


# -- events --------------------------------------------------------------------------------------------------------
def stream(batch: int, length: int, seed: int) -> Events:
    """Each user's whole event stream ``(B, length)`` (timestamps increasing)."""
    return synthetic_events(batch, length, NUM_ITEMS, seed=seed)


def cut(events: Events, starts: list[int], stops: list[int]) -> Events:
    """User ``u``'s events ``[starts[u], stops[u])`` of the stream, left-aligned and padded (width 0 if none)."""
    spans = list(zip(starts, stops, strict=True))
    width = max(b - a for a, b in spans)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.pad(t[u, a:b], (0, width - (b - a))) for u, (a, b) in enumerate(spans)])

    return Events(rows(events.items), rows(events.actions), rows(events.timestamps),
                  torch.tensor([b - a for a, b in spans]))


def parts_from(written: list[int], sizes: list[list[int]], starts: list[int] | None = None
               ) -> list[tuple[list[int], list[int]]]:
    """(starts, stops) of a write of the events ``[starts[u], written[u])`` (``starts`` 0 by default), then of
    appends of ``sizes[i][u]`` events each."""
    parts, done = [([0] * len(written) if starts is None else list(starts), list(written))], list(written)
    for step in sizes:
        stops = [d + s for d, s in zip(done, step, strict=True)]
        parts.append((done, stops))
        done = stops
    return parts


# -- the check -----------------------------------------------------------------------------------------------------
def full_forward(model: SequentialRecommender, events: Events, user: int, start: int, stop: int,
                 cands: torch.Tensor, cand_time: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The plain forward over user ``user``'s events ``[start, stop)`` (positions from 0) and the candidates.

    Returns:
        the last event's output ``(D,)`` (None without events) and the candidates' logits ``(c,)``.
    """
    n, c = stop - start, cands.shape[0]
    tokens = TokenBatch(
        items=torch.cat([events.items[user, start:stop], cands])[None],
        actions=torch.cat([events.actions[user, start:stop], torch.zeros(c, dtype=torch.int64)])[None],
        positions=torch.cat([torch.arange(n), torch.full((c,), n)])[None],
        timestamps=torch.cat([events.timestamps[user, start:stop], torch.full((c,), cand_time)])[None],
        is_history=torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(c, dtype=torch.bool)])[None],
        valid=torch.ones(1, n + c, dtype=torch.bool))
    with torch.no_grad():
        hidden = model(tokens)[0]
    return (hidden[n - 1] if n else None), model.ctr_logits(hidden[n:], cands)


def candidates(events: Events, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, c)`` candidate items and request times after every event of the stream."""
    items = torch.randint(1, NUM_ITEMS + 1, (events.items.shape[0], CANDIDATES),
                          generator=torch.Generator().manual_seed(seed))
    times = events.timestamps.max(dim=1, keepdim=True).values + 60
    return items, times.expand(-1, CANDIDATES).contiguous()


def assert_exact(engine: Engine, events: Events, parts: list[tuple[list[int], list[int]]],
                 atol: float = ATOL) -> list[UserState]:
    """Serve the parts (a write, then appends) and compare every user's last output and candidate logits with
    the full forward over the events the user was served."""
    states = engine.write(cut(events, *parts[0]))
    for part in parts[1:]:
        states = engine.append(states, cut(events, *part))
    cands, times = candidates(events, seed=7)
    logits = engine.score(states, cands, times)
    first, last = parts[0][0], parts[-1][1]
    for user, state in enumerate(states):
        assert state.next_position == last[user] - first[user]
        hidden, expected = full_forward(engine.model, events, user, first[user], last[user], cands[user],
                                        int(times[user, 0]))
        torch.testing.assert_close(logits[user], expected, atol=atol, rtol=0)
        if hidden is None:
            assert state.last_hidden.numel() == 0  # nothing seen: no retrieval read yet
        else:
            torch.testing.assert_close(state.last_hidden.to(hidden.dtype), hidden, atol=atol, rtol=0)
    return states


# -- the edges -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "name", "backbone"), MODEL_CASES)
def test_histories_longer_than_max_len(kind, name, backbone):
    """User 0: a whole history of 2.5 ``max_len`` written at once; user 1: the replay's write of the last
    ``max_len`` events of a longer history; both then appended past (another) ``max_len``."""
    engine = engine_for(kind, name, backbone, prefill_chunk=24)
    max_len = engine.model.cfg.max_len
    whole, longer = 5 * max_len // 2, 2 * max_len + 7
    events = stream(2, longer + 2 * max_len, seed=11)
    sizes = [[1, 1], [max_len // 2, 3], [0, max_len], [9, 1]]
    states = assert_exact(engine, events, parts_from([whole, longer], sizes, starts=[0, longer - max_len]))
    assert [s.next_position for s in states] == [whole + max_len // 2 + 10, 2 * max_len + 5]


@pytest.mark.parametrize(("kind", "name", "backbone"), MODEL_CASES)
def test_cold_users(kind, name, backbone):
    """A 0-event write next to users with events, then appends (the cold user's first in the second append);
    and a write where every user is cold."""
    engine = engine_for(kind, name, backbone, prefill_chunk=16)
    events = stream(3, 120, seed=12)
    assert_exact(engine, events, parts_from([40, 0, 17], [[2, 0, 5], [1, 30, 3], [0, 1, 2]]))
    assert_exact(engine, events, parts_from([0, 0, 0], [[0, 3, 0], [5, 20, 1]]))


def snapshot(states: list[UserState]) -> list[tuple]:
    """Copies of every tensor of every state (any stored-layer format), with the counters."""
    return [(s.next_position, s.last_timestamp, s.nbytes(), [t.clone() for t in tensors_of(s)]) for s in states]


def assert_same(before: list[tuple], after: list[tuple]) -> None:
    for (*b_counts, b_tensors), (*a_counts, a_tensors) in zip(before, after, strict=True):
        assert b_counts == a_counts and len(b_tensors) == len(a_tensors)
        assert all(torch.equal(b, a) for b, a in zip(b_tensors, a_tensors, strict=True))


@pytest.mark.parametrize(("kind", "name", "backbone"), MODEL_CASES)
def test_zero_event_appends_change_nothing(kind, name, backbone):
    """An append with no new event leaves the state (the same object) and the scores as they were: for one user
    of a batch, and for a whole batch (padded or of width 0)."""
    engine = engine_for(kind, name, backbone, prefill_chunk=16)
    events = stream(3, 80, seed=13)
    states = engine.write(cut(events, [0, 0, 0], [30, 0, 45]))
    cands, times = candidates(events, seed=8)
    scores, before = engine.score(states, cands, times), snapshot(states)
    padded = Events(torch.ones(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64),
                    torch.full((3, 4), 10**9), torch.zeros(3, dtype=torch.int64))  # 4 columns, no event
    for empty in (padded, cut(events, [30, 0, 45], [30, 0, 45])):  # and a width of 0
        after = engine.append(states, empty)
        assert all(a is b for a, b in zip(after, states, strict=True))
        assert_same(before, snapshot(after))
        assert torch.equal(engine.score(after, cands, times), scores)
    # one user without new events among users with some
    after = engine.append(states, cut(events, [30, 0, 45], [32, 0, 50]))
    assert after[1] is states[1]
    assert_same(before[1:2], snapshot(after[1:2]))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_linformer_clamps_columns_past_max_len(backbone):
    """Events at positions ``>= P`` (``P = max_len`` columns) all use column ``P - 1``: three ``P`` of history, in
    a write and appends, equal the full forward, and layer 0's stored projections equal
    ``sum_j E[:, min(pos_j, P - 1)] k_j^T`` (and ``F``, ``v``) computed from the definition."""
    model = tiny("linformer", backbone, 0.25, layers=1).eval()
    max_len = model.cfg.max_len
    events = stream(1, 3 * max_len, seed=14)
    parts = parts_from([max_len + 5], [[1], [max_len], [max_len - 6]])
    states = assert_exact(Engine(model, prefill_chunk=40), events, parts)
    tokens = TokenBatch(items=events.items, actions=events.actions, positions=torch.arange(3 * max_len)[None],
                        timestamps=events.timestamps, is_history=torch.ones_like(events.items, dtype=torch.bool),
                        valid=torch.ones_like(events.items, dtype=torch.bool))
    layer = model.layers[0]
    with torch.no_grad():  # layer 0 sees the embeddings: its keys and values need no attention
        x = model.embed(tokens)
        if backbone == "hstu":
            _, v, _, k = F.silu(layer.uvqk(layer.input_norm(x))).split(layer.split, dim=-1)
        else:
            _, k, v = layer.qkv(layer.attention_norm(x)).split(layer.split, dim=-1)
    heads, dim = layer.heads, layer.key_dim
    k, v = k[0].reshape(-1, heads, dim).transpose(0, 1), v[0].reshape(-1, heads, dim).transpose(0, 1)  # (H, n, d)
    columns = torch.arange(3 * max_len).clamp(max=max_len - 1)
    assert (columns == max_len - 1).sum() == 2 * max_len + 1  # most events share the last column
    stored = states[0].layers[0]
    assert isinstance(stored, ProjectionState)
    projection = layer.projection
    torch.testing.assert_close(stored.keys, projection.keys.detach()[:, columns] @ k, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stored.values, projection.values.detach()[:, columns] @ v, atol=1e-4, rtol=1e-5)


FLOAT64_CASES = [pytest.param("native", backbone, id=f"native-{backbone}") for backbone in BACKBONES]
FLOAT64_CASES += [pytest.param(scheme, backbone, id=f"{scheme}-{backbone}") for scheme, backbone in ARCHITECTURE_CASES]


def float64_model(scheme: str, backbone: str) -> SequentialRecommender:
    """A one-layer, two-head float64 model (the 4,096 x 4,096 attention of the full forward dominates the cost),
    trained a few steps in float32, with non-zero relative biases so that HSTU's attention depends on distances."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=8, layers=1, heads=2, head_dim=4, dropout=0.0, max_len=64,
                      scheme=scheme, memory_ratio=1.0 if scheme == "native" else 0.25)
    model = build_model_for(cfg, NUM_ITEMS)
    train_steps(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "time_bias")):
                p.normal_(0, 0.5)
    return model.double().eval()


@pytest.mark.parametrize(("scheme", "backbone"), FLOAT64_CASES)
def test_a_4096_event_user_in_float64(scheme, backbone):
    """One user of 4,096 events (64 ``max_len``), written in chunks of 1,024 and appended, in float64 (model,
    inputs and stored state): equal to the full forward to 1e-9, where float32 rounding would allow 1e-5."""
    engine = Engine(float64_model(scheme, backbone), prefill_chunk=1024, candidate_chunk=3)
    assert engine.state_dtype == torch.float64
    events = stream(1, 4096, seed=15)
    states = assert_exact(engine, events, parts_from([4000], [[1], [0], [95]]), atol=ATOL_FLOAT64)
    assert states[0].last_hidden.dtype == torch.float64
