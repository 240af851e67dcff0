"""One test matrix for every registered training-free scheme and wrapper (docs/DESIGN.md, "Exactness rules").

The cases are read from the registry at collection time, so a scheme is tested the moment it is registered: every
scheme, plus PyramidKV over every eviction scheme and Compose over (a shared and a per-head eviction) x every
precision scheme, x both backbones x ratios {1/2, 1/4, 1/8}, on a tiny model (D=16, H=4, d=4, L=2) serving three
users of 64-120 events: one write, 20 appends of 1-3 events, one read. Checked:

- budget: after the write and after every append, each user's stored layer bytes <= target x Native's bytes for
  the same events (no slack for evictions, which floor their budget, nor for Compose, which bisects on exact
  bytes; precision schemes may add their full-precision events, which their docstrings say come on top);
- measured ratio (all users' stored layer bytes / Native's) within 5% of the target, less the budget rule's
  rounding to whole kept events (at most one kept event per layer and user); precision schemes instead match
  their documented reachable ratio exactly (``predicted_nbytes``), or raise SchemeError naming the scheme when
  no bit width reaches the target (skipped with the reason);
- reading (scoring candidates, retrieval logits) leaves the stored state unchanged;
- at ratio 1, every scheme that stores every event densely equals Native to 1e-5 (precision schemes quantize
  at any ratio: ratio 1 is a budget for them, not the identity); Native equals the uncached forward;
- a write served from a :class:`PrefillCache` that every case of the backbone shares gives bit for bit the
  states and scores of a fresh write, and leaves the cached prefill as a fresh one;
- knobs: every field is a declared knob whose default passes, and every value a declaration rejects
  (:meth:`malloc.memory.knobs.Knob.outside`) is refused in one line naming the scheme and the knob, by the class
  and through the registry (the cases are derived from the declarations: a new scheme needs no entry here).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch

from malloc.core.state import LayerState, UserState
from malloc.core.stats import AttentionObserver
from malloc.core.tokens import Events, TokenBatch
from malloc.memory.knobs import knobs_of
from malloc.memory.policy import CachePolicy, EvictionPolicy, LayerContext, SchemeError, native_token_bytes
from malloc.memory.quant import QuantizationPolicy, QuantizedLayer
from malloc.memory.registry import WRAPPERS, build_model_for, build_policy, scheme_names
from malloc.memory.schemes import POLICIES
from malloc.memory.wrappers import Compose, Pyramid
from malloc.models import ModelConfig
from malloc.serving.engine import Engine
from malloc.serving.prefill_cache import PrefillCache

NUM_ITEMS = 40
HISTORY = [64, 93, 120]
APPENDS = 20
CANDIDATES = 5
RATIOS = {"1/2": 0.5, "1/4": 0.25, "1/8": 0.125}
BACKBONES = ["hstu", "sasrec"]
TOLERANCE = 0.05


def _specs() -> list[tuple[str, str, dict]]:
    """(test id, registry name, knobs) of every scheme and wrapper case."""
    specs = [(name, name, {}) for name in scheme_names()]
    evictions = [name for name in scheme_names() if issubclass(POLICIES[name], EvictionPolicy)]
    precisions = [name for name in scheme_names() if POLICIES[name].granularity == "precision"]
    specs += [(f"pyramid[{name}]", "pyramid", {"inner": name}) for name in evictions]
    # Compose: every precision scheme, with query-aware evictions alternating shared and per-head selections
    shared = [name for name in evictions if not POLICIES[name].per_head and POLICIES[name].needs_attention]
    per_head = [name for name in evictions if POLICIES[name].per_head]
    partners = [name for pair in zip(per_head, shared, strict=False) for name in pair] or evictions
    for index, quant in enumerate(precisions):
        evict = partners[index % len(partners)]
        specs.append((f"compose[{evict}+{quant}]", "compose", {"evict": evict, "quant": quant}))
    return specs


SPECS = _specs()
SPEC_IDS = [spec[0] for spec in SPECS]
_MODELS: dict[str, torch.nn.Module] = {}
_PREFILLS: dict[str, PrefillCache] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than several, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(backbone: str):
    if backbone not in _MODELS:
        torch.manual_seed(0)
        cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=32)
        model = build_model_for(cfg, NUM_ITEMS).eval()
        with torch.no_grad():  # non-zero relative biases, so attention depends on distances
            for name, p in model.named_parameters():
                if name.endswith(("position_bias", "time_bias")):
                    p.normal_(0, 0.5)
        _MODELS[backbone] = model
    return _MODELS[backbone]


def user_events(seed: int = 0) -> tuple[Events, list[Events], torch.Tensor, torch.Tensor]:
    """Histories, 20 appends of 1-3 events per user, and candidates after the last event."""
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(1, 4, (APPENDS, len(HISTORY)), generator=g)
    total = [h + int(extra[:, b].sum()) for b, h in enumerate(HISTORY)]
    n = max(total)
    items = torch.randint(1, NUM_ITEMS + 1, (len(HISTORY), n), generator=g)
    actions = torch.randint(0, 3, (len(HISTORY), n), generator=g)
    times = torch.cumsum(torch.randint(1, 50_000, (len(HISTORY), n), generator=g), dim=1)

    def cut(starts: list[int], stops: list[int]) -> Events:
        width = max(b - a for a, b in zip(starts, stops, strict=True))
        rows = [(items[u, a:b], actions[u, a:b], times[u, a:b]) for u, (a, b) in enumerate(zip(starts, stops,
                                                                                                  strict=True))]
        pad = [[torch.nn.functional.pad(r[i], (0, width - len(r[i]))) for r in rows] for i in range(3)]
        return Events(torch.stack(pad[0]), torch.stack(pad[1]), torch.stack(pad[2]),
                      torch.tensor([b - a for a, b in zip(starts, stops, strict=True)]))

    history = cut([0] * len(HISTORY), HISTORY)
    appends, done = [], list(HISTORY)
    for step in range(APPENDS):
        stops = [d + int(extra[step, b]) for b, d in enumerate(done)]
        appends.append(cut(done, stops))
        done = stops
    cands = torch.randint(1, NUM_ITEMS + 1, (len(HISTORY), CANDIDATES), generator=g)
    cand_times = times.max(dim=1, keepdim=True).values + 10
    return history, appends, cands, cand_times.expand(-1, CANDIDATES).contiguous()


def native_layer_bytes(model, n: int) -> int:
    layer = LayerState.empty(model.cfg.heads, model.cfg.head_dim, model.cfg.head_dim, Engine(model).state_dtype)
    return len(model.layers) * n * native_token_bytes(layer)


def layer_bytes(state: UserState) -> int:
    return sum(layer.nbytes() for layer in state.layers)


def kept_event_bytes(policy: CachePolicy, model) -> int:
    """One kept event's bytes in one layer: the rounding step of an eviction budget (0 for other schemes)."""
    layer = LayerState.empty(model.cfg.heads, model.cfg.head_dim, model.cfg.head_dim, Engine(model).state_dtype)
    inner = policy.inner if isinstance(policy, Pyramid) else policy.evict if isinstance(policy, Compose) else policy
    if isinstance(policy, Compose):
        return native_token_bytes(layer) + layer.heads * 12  # a full-precision event with per-head metadata
    return inner.kept_token_bytes(layer) if isinstance(inner, EvictionPolicy) else 0


def budget_slack(policy: CachePolicy, model, state: UserState) -> float:
    """Bytes a scheme documents storing on top of its budget: precision schemes keep their full-precision events
    (KIVI's residual, IntactKV's pivots) "on top" of the ratio their bits reach; every other scheme has none."""
    if not isinstance(policy, QuantizationPolicy):
        return 0.0
    layer = LayerState.empty(model.cfg.heads, model.cfg.head_dim, model.cfg.head_dim, Engine(model).state_dtype)
    return sum(policy.num_full(stored.num_tokens) for stored in state.layers) * native_token_bytes(layer)


def build(name: str, ratio: float, knobs: dict) -> CachePolicy:
    try:
        return build_policy(name, ratio, **knobs)
    except SchemeError as exc:
        pytest.skip(f"{name} does not accept memory_ratio {ratio} (documented): {exc}")


def snapshot(states: list[UserState]) -> list:
    return [(s.nbytes(), s.next_position, s.last_hidden.clone(),
             [tuple(t.clone() for t in dataclasses.astuple(layer.read())) for layer in s.layers]) for s in states]


def assert_same(before: list, after: list) -> None:
    for (b_bytes, b_pos, b_hidden, b_layers), (a_bytes, a_pos, a_hidden, a_layers) in zip(before, after,
                                                                                          strict=True):
        assert (b_bytes, b_pos) == (a_bytes, a_pos) and torch.equal(b_hidden, a_hidden)
        for b_layer, a_layer in zip(b_layers, a_layers, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(b_layer, a_layer, strict=True))


def serve(engine: Engine, history: Events, appends: list[Events], check=None) -> list[UserState]:
    states = engine.write(history)
    if check is not None:
        check(states)
    for events in appends:
        states = engine.append(states, events)
        if check is not None:
            check(states)
    return states


def check_precision_format(policy: QuantizationPolicy, states: list[UserState]) -> None:
    """Every stored layer's bytes equal the scheme's documented formula at the bits it chose."""
    for state in states:
        for layer in state.layers:
            assert isinstance(layer, QuantizedLayer)
            shape = LayerState(layer.full_keys[:, :0], layer.full_values[:, :0], layer.positions[:, :0],
                               layer.timestamps[:, :0])
            assert layer.nbytes() == policy.predicted_nbytes(shape, layer.num_tokens, layer.bits)


@pytest.mark.parametrize("ratio", list(RATIOS.values()), ids=list(RATIOS))
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("case", "name", "knobs"), SPECS, ids=SPEC_IDS)
def test_scheme_budget_ratio_and_read_only(case, name, knobs, backbone, ratio):
    policy = build(name, ratio, knobs)
    model = tiny_model(backbone)
    history, appends, cands, cand_times = user_events()
    engine = Engine(model, policy, prefill_chunk=50, candidate_chunk=3)

    def within_budget(states: list[UserState]) -> None:
        for b, state in enumerate(states):
            native = native_layer_bytes(model, state.next_position)
            allowed = ratio * native + budget_slack(policy, model, state)
            assert layer_bytes(state) <= allowed + 1e-6, (
                f"{case}: user {b} stores {layer_bytes(state)} B > {ratio} x {native} B after {state.next_position}")

    try:
        states = serve(engine, history, appends, within_budget)
    except SchemeError as exc:
        assert policy.granularity == "precision", f"{case}: only precision schemes may find a ratio unreachable"
        assert name in str(exc)
        pytest.skip(f"{case}: ratio {ratio} unreachable at these shapes (documented): {exc}")

    def assert_near_target(states: list[UserState], reachable: list[int] | None = None) -> None:
        stored = sum(layer_bytes(s) for s in states)
        native = sum(native_layer_bytes(model, s.next_position) for s in states)
        target = ratio * native if reachable is None else sum(min(ratio * native_layer_bytes(model, s.next_position),
                                                                  r) for s, r in zip(states, reachable, strict=True))
        rounding = len(states) * len(model.layers) * kept_event_bytes(policy, model)
        assert stored >= target * (1 - TOLERANCE) - rounding, f"{case}: measured {stored / native:.4f} vs {ratio}"

    if isinstance(policy, QuantizationPolicy):  # the ratio its bits reach, never above the target
        check_precision_format(policy, states)
    elif isinstance(policy, Compose):
        # at write: the target, or what the quantizer reaches alone if that is less (nothing is evicted then).
        # After appends the ratio may fall further: a KIVI flush frees bytes, but evicted events cannot return.
        written = Engine(model, policy, prefill_chunk=50).write(history)
        dense = Engine(model, prefill_chunk=50).write(history)
        alone = [sum(policy.quant_bytes(layer, layer.num_tokens, LayerContext(index, len(model.layers), backbone,
                                                                              s.next_position))
                     for index, layer in enumerate(s.layers)) for s in dense]
        assert_near_target(written, alone)
    else:
        assert_near_target(states)

    before = snapshot(states)
    scores = engine.score(states, cands, cand_times)
    engine.retrieve(states)
    assert torch.isfinite(scores).all()
    assert_same(before, snapshot(states))


def full_forward_logits(model, history: Events, appends: list[Events], cands: torch.Tensor,
                        cand_times: torch.Tensor) -> torch.Tensor:
    """Candidate logits of the plain uncached forward over each user's whole history + candidates."""
    logits = []
    for b in range(history.items.shape[0]):
        parts = [history, *appends]
        items = torch.cat([p.items[b, :int(p.lengths[b])] for p in parts])
        actions = torch.cat([p.actions[b, :int(p.lengths[b])] for p in parts])
        times = torch.cat([p.timestamps[b, :int(p.lengths[b])] for p in parts])
        n, c = len(items), cands.shape[1]
        tokens = TokenBatch(
            items=torch.cat([items, cands[b]])[None],
            actions=torch.cat([actions, torch.zeros(c, dtype=torch.long)])[None],
            positions=torch.cat([torch.arange(n), torch.full((c,), n)])[None],
            timestamps=torch.cat([times, cand_times[b]])[None],
            is_history=torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(c, dtype=torch.bool)])[None],
            valid=torch.ones(1, n + c, dtype=torch.bool))
        with torch.no_grad():
            logits.append(model.ctr_logits(model(tokens), tokens.items)[0, n:])
    return torch.stack(logits)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_native_equals_uncached(backbone):
    model = tiny_model(backbone)
    history, appends, cands, cand_times = user_events(seed=1)
    engine = Engine(model, build_policy("native", 1.0), prefill_chunk=50, candidate_chunk=3)
    states = serve(engine, history, appends)
    expected = full_forward_logits(model, history, appends, cands, cand_times)
    torch.testing.assert_close(engine.score(states, cands, cand_times), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("case", "name", "knobs"), SPECS, ids=SPEC_IDS)
def test_ratio_one_equals_native(case, name, knobs, backbone):
    policy = build(name, 1.0, knobs)
    model = tiny_model(backbone)
    history, appends, cands, cand_times = user_events(seed=2)
    states = serve(Engine(model, policy, prefill_chunk=50), history, appends)
    dense = all(isinstance(layer, LayerState) and layer.num_tokens == s.next_position
                for s in states for layer in s.layers)
    if not dense:
        assert policy.granularity == "precision", f"{case} at ratio 1 dropped or compressed events"
        pytest.skip(f"{case}: precision schemes quantize at any ratio (ratio 1 is a budget, not the identity)")
    native = Engine(model, prefill_chunk=50)
    native_states = serve(native, history, appends)
    torch.testing.assert_close(Engine(model, policy).score(states, cands, cand_times),
                               native.score(native_states, cands, cand_times), atol=1e-5, rtol=0)
    assert sum(layer_bytes(s) for s in states) == sum(layer_bytes(s) for s in native_states)



def assert_same_stats(cached: AttentionObserver | None, fresh: AttentionObserver | None) -> None:
    """Two prefills' observers hold the same statistics for every layer and user."""
    assert (cached is None) == (fresh is None)
    if cached is None or fresh is None:
        return
    for layer in range(cached.layers):
        for user in range(len(cached.end_positions)):
            pairs = zip(dataclasses.astuple(cached.stats(layer, user)), dataclasses.astuple(fresh.stats(layer, user)),
                        strict=True)
            assert all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize(("case", "name", "knobs"), SPECS, ids=SPEC_IDS)
def test_shared_prefill_is_exact(case, name, knobs, backbone):
    policy = build(name, 1.0 if name == "native" else 0.5, knobs)
    model = tiny_model(backbone)
    cache = _PREFILLS.setdefault(backbone, PrefillCache(model))  # shared by every case: writes of other policies
    history, appends, cands, cand_times = user_events(seed=3)
    fresh = Engine(model, policy, prefill_chunk=50, candidate_chunk=3)
    shared = Engine(model, policy, prefill_chunk=50, candidate_chunk=3, prefill_cache=cache)
    try:
        expected = serve(fresh, history, appends)
    except SchemeError as exc:  # a precision scheme whose bit widths cannot reach the ratio on these shapes
        pytest.skip(f"{case} does not reach memory_ratio 0.5 here (documented): {exc}")
    got = serve(shared, history, appends)
    assert_same(snapshot(expected), snapshot(got))
    assert torch.equal(shared.score(got, cands, cand_times), fresh.score(expected, cands, cand_times))
    window = policy.observation_window if policy.needs_attention else None

    def recompute():
        observer = None if window is None else AttentionObserver(len(model.layers), model.layers[0].kv_heads,
                                                                 history.lengths, window)
        return Engine(model, prefill_chunk=50).prefill(history, observer), observer

    hits = cache.hits
    cached_states, cached_observer = cache.get(history, 50, window, recompute)
    assert cache.hits == hits + 1, "the write was not kept in the cache"
    fresh_states, fresh_observer = recompute()
    assert_same(snapshot(fresh_states), snapshot(cached_states))  # no policy modified the shared prefill
    assert_same_stats(cached_observer, fresh_observer)


# -- knobs, from the declarations ------------------------------------------------------------------------------
# (case, registry name, the wrapper's inner schemes or {}, scheme class, knob, value): every value each declared
# knob rejects, for every scheme and wrapper; a wrapper's knobs are tried with valid inner schemes
_INNER = {"pyramid": {"inner": "h2o"}, "compose": {"evict": "recency", "quant": "kivi"}}
_CLASSES = [(name, cls, {}) for name, cls in POLICIES.items()] + [(name, w.cls, _INNER[name])
                                                                   for name, w in WRAPPERS.items()]
BAD_KNOBS: list[tuple[str, dict, type, str, Any]] = [(name, inner, cls, key, value) for name, cls, inner in _CLASSES
                                                     for key, spec in knobs_of(cls).items()
                                                     for value in spec.outside()]


def test_every_knob_is_declared_and_its_default_passes():
    for name, cls, inner in _CLASSES:
        fields = {f.name for f in dataclasses.fields(cls)}
        scheme_valued = set(WRAPPERS[name].schemes) if name in WRAPPERS else set()
        assert set(knobs_of(cls)) | {f.removesuffix("_knobs") for f in scheme_valued} == fields, (
            f"{name}: a field without knob(...)")
        if not inner:
            cls()
    assert {name for name, *_ in BAD_KNOBS} == {name for name, _, _ in _CLASSES}  # memory_ratio at least


@pytest.mark.parametrize(("name", "inner", "cls", "knob", "value"), BAD_KNOBS,
                         ids=[f"{n}-{k}-{v!r}" for n, _, _, k, v in BAD_KNOBS])
def test_bad_knob_gives_a_clear_error(name, inner, cls, knob, value):
    """Refused in one line naming the scheme and the knob: by the class (whose declarations check it) and through
    the registry (which converts by the same declarations); ``memory_ratio`` is the registry's second argument."""
    ratio = next(f.default for f in dataclasses.fields(cls) if f.name == "memory_ratio")  # valid for every scheme
    policy = build_policy(name, ratio, **inner)
    with pytest.raises(SchemeError, match=rf"^{name}: {knob} must be .*, got {re.escape(repr(value))}$"):
        dataclasses.replace(policy, **{knob: value})
    with pytest.raises(SchemeError, match=rf"^{name}: (knob )?{knob}\b") as info:
        if knob == "memory_ratio":
            build_policy(name, value, **inner)
        else:
            build_policy(name, ratio, **inner, **{knob: value})
    assert len(str(info.value).splitlines()) == 1
