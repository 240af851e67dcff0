"""Every stored tensor owns its memory: a user's state keeps alive exactly the bytes ``UserState.nbytes()`` counts,
plus the spare rows of dense layers grown by appends (``LayerState.resident_bytes``, at most ``SPARE_FRACTION``).

A stored tensor that is a slice (or a view, even an empty one) of a buffer computed for the whole batch keeps that
buffer alive: eight RWKV users once reported 18.5 KB and held 557 KB. The bytes a state keeps alive are the sizes
of the distinct untyped storages its tensors reference (deduplicated by their address); for every registered
scheme (training-free and trained-in) and every wrapper, on both backbones, after a batched write of users of
different lengths (a cold user of 0 events among them) and a batched append, they equal ``nbytes()`` exactly. So
do the precision schemes on the trained-in schemes that store per-event keys and values (MLA + KIVI, ...).

One documented difference: the two counters (next position, last timestamp) are Python ints, not tensors, and
``nbytes()`` counts them as ``SCALAR_BYTES``. Zero-size tensors need no exception: one created empty has a storage
of 0 bytes, and one cut from a batch buffer is the very leak this test looks for (its storage is the whole buffer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from malloc.core.state import SCALAR_BYTES, SPARE_FRACTION, LayerState, UserState
from malloc.core.tokens import Events
from malloc.memory.registry import WRAPPERS, build_model_for, build_policy
from malloc.memory.schemes import ARCHITECTURES, POLICIES
from malloc.models.base import SequentialRecommender
from malloc.serving.engine import Engine
from test_architecture_matrix import CASES as ARCHITECTURE_CASES
from test_architecture_matrix import tiny, tiny_config
from test_scheme_matrix import SPEC_IDS, SPECS, one_thread, tiny_model  # noqa: F401 (one_thread: autouse fixture)

NUM_ITEMS = 40
WRITTEN = [37, 0, 81, 5]  # a cold user (0 events) next to users of different lengths
APPENDED = [3, 6, 0, 1]  # one user gets no new event
RATIO = 0.5


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor a stored object references, through dataclass fields, tuples and lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from tensors_of(getattr(obj, field.name))
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_of(item)


def bytes_kept_alive(state: UserState) -> int:
    """Sum of the sizes of the distinct untyped storages the state's tensors reference."""
    storages = {}
    for tensor in tensors_of(state):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def events(lengths: list[int], seed: int, start: int) -> Events:
    """Random events, padded to the longest user, timestamps increasing from ``start``."""
    g = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), max(lengths)
    times = start + torch.cumsum(torch.randint(1, 3600, (batch, width), generator=g), dim=1)
    return Events(torch.randint(1, NUM_ITEMS + 1, (batch, width), generator=g),
                  torch.randint(0, 3, (batch, width), generator=g), times, torch.tensor(lengths))


def assert_owned(model: SequentialRecommender, engine: Engine, case: str) -> None:
    """Write, check, append, check: every user's state keeps alive exactly its ``nbytes()``."""
    states = engine.write(events(WRITTEN, seed=0, start=1_500_000_000))
    for stage in ("write", "append"):
        if stage == "append":
            states = engine.append(states, events(APPENDED, seed=1, start=1_600_000_000))
        for user, state in enumerate(states):
            alive = bytes_kept_alive(state) + SCALAR_BYTES
            resident = state.nbytes() + sum(resident_bytes(layer) - layer.nbytes() for layer in state.layers)
            assert alive == resident, (
                f"{case}: user {user} after the {stage} keeps {alive} B alive, nbytes() = {state.nbytes()}, "
                f"with spare rows {resident}")
            for layer in state.layers:  # spare rows: at most SPARE_FRACTION of the events
                assert resident_bytes(layer) <= layer.nbytes() * (1 + SPARE_FRACTION), case
    assert [s.next_position for s in states] == [w + a for w, a in zip(WRITTEN, APPENDED, strict=True)]


def resident_bytes(layer: Any) -> int:
    """A stored layer's bytes in memory: ``nbytes()``, plus spare rows for a dense layer grown by appends."""
    return layer.resident_bytes() if isinstance(layer, LayerState) else layer.nbytes()


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize(("case", "name", "knobs"), SPECS, ids=SPEC_IDS)
def test_training_free_states_own_their_memory(case, name, knobs, backbone):
    model = tiny_model(backbone)
    policy = build_policy(name, 1.0 if name == "native" else RATIO, **knobs)
    assert_owned(model, Engine(model, policy, prefill_chunk=16), case)


@pytest.mark.parametrize(("scheme", "backbone"), ARCHITECTURE_CASES)
def test_trained_in_states_own_their_memory(scheme, backbone):
    model = tiny(scheme, backbone, RATIO).eval()
    assert_owned(model, Engine(model, prefill_chunk=16), scheme)


PLAIN_KV = [name for name in ARCHITECTURES
            if build_model_for(tiny_config(name, ARCHITECTURES[name].backbones[0]), NUM_ITEMS).layers[0].plain_kv]
PRECISION = [name for name, cls in POLICIES.items() if cls.granularity == "precision"]


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize("policy", PRECISION)
@pytest.mark.parametrize("scheme", PLAIN_KV)
def test_precision_on_trained_in_states_own_their_memory(scheme, policy, backbone):
    """A precision scheme on a trained-in model's per-event state (MLA: a latent as keys, values of width 0)."""
    model = tiny(scheme, backbone, RATIO).eval()
    assert_owned(model, Engine(model, build_policy(policy, 1.0), prefill_chunk=16), f"{scheme}+{policy}")


def test_every_scheme_and_wrapper_is_covered():
    assert {name for _, name, _ in SPECS} == set(POLICIES) | set(WRAPPERS)
    assert {name for name, _ in ARCHITECTURE_CASES} == set(ARCHITECTURES)
    assert {"mla", "gqa"} <= set(PLAIN_KV)


def dense(n: int, seed: int, start: int = 0) -> LayerState:
    """A shared-selection dense layer of ``n`` random events at positions ``start`` on (4 heads of 3)."""
    g = torch.Generator().manual_seed(seed)
    return LayerState(torch.randn(4, n, 3, generator=g), torch.randn(4, n, 3, generator=g),
                      torch.arange(start, start + n, dtype=torch.int32)[None], torch.arange(start, start + n)[None])


def joined(*layers: LayerState) -> LayerState:
    """The layers' events one after the other, in fresh tensors (what ``extend`` must equal)."""
    return LayerState(*(torch.cat([getattr(layer, name) for layer in layers], dim=1)
                        for name in ("keys", "values", "positions", "timestamps")))


def assert_same_events(got: LayerState, expected: LayerState) -> None:
    for name in ("keys", "values", "positions", "timestamps"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_appends_write_in_place_into_spare_rows_and_equal_a_join():
    layer, parts = dense(40, 0), [dense(1, seed, 40 + seed) for seed in range(1, 8)]
    grown = layer.extend(parts[0])
    assert grown.spare is not None and grown.spare.capacity == 41 + 41 // 8  # room for 5 more
    storage = grown.keys.untyped_storage().data_ptr()
    for part in parts[1:6]:  # five appends into the spare rows, then one that must grow the tensors
        grown = grown.extend(part)
        assert grown.keys.untyped_storage().data_ptr() == storage
    grown = grown.extend(parts[6])
    assert grown.keys.untyped_storage().data_ptr() != storage
    assert_same_events(grown, joined(layer, *parts))
    assert grown.nbytes() == joined(layer, *parts).nbytes() < grown.resident_bytes()


def test_two_appends_from_one_stored_layer_do_not_share_rows():
    """Two requests from the same stored state (a replay, or a retried request): the first writes in place, the
    second finds its rows taken and copies; each result holds its own events, and the parent is unchanged."""
    parent = dense(30, 0).extend(dense(2, 1, 30))
    before = joined(parent)
    first, second = parent.extend(dense(1, 2, 32)), parent.extend(dense(1, 3, 32))
    assert first.spare is parent.spare and second.spare is None
    assert_same_events(first, joined(before, dense(1, 2, 32)))
    assert_same_events(second, joined(before, dense(1, 3, 32)))
    assert_same_events(parent, before)
    assert_same_events(first.extend(dense(1, 4, 33)), joined(before, dense(1, 2, 32), dense(1, 4, 33)))


def test_appends_with_a_gradient_or_per_head_events_join_into_new_tensors():
    per_head = dense(10, 0).select(torch.stack([torch.arange(8)] * 4))  # (H, 8) indices: per-head metadata
    assert per_head.extend(dense(1, 1, 10)).spare is None
    tracked = dense(10, 0)
    tracked = LayerState(tracked.keys.requires_grad_(), tracked.values, tracked.positions, tracked.timestamps)
    assert tracked.extend(dense(1, 1, 10)).spare is None
    with torch.no_grad():
        assert tracked.extend(dense(1, 1, 10)).spare is not None
