"""Every stored tensor owns its memory: a user's state keeps alive exactly the bytes ``UserState.nbytes()`` counts.

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

from malloc.core.state import SCALAR_BYTES, UserState
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
            assert alive == state.nbytes(), (
                f"{case}: user {user} after the {stage} keeps {alive} B alive, nbytes() = {state.nbytes()}")
    assert [s.next_position for s in states] == [w + a for w, a in zip(WRITTEN, APPENDED, strict=True)]


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
