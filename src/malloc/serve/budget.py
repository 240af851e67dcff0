"""The global budget in bytes: Native's total on the same replay, and the uniform ratio that meets a budget.

A budget ``--budget f`` is ``f`` times the bytes Native's entries hold at the end of the replay (every requested
user's state after its last request, as :class:`~malloc.serving.store.StateStore` entries: ``nbytes()`` plus the
header), the most an uncompressed store ever holds, since states only grow. :func:`native_entry_bytes` computes it
exactly from each user's event count by encoding a zero state of that length (the header depends on the digits of
the shapes only); ``tests/test_serve.py`` checks it against a Native replay's store.

The uniform allocator at a budget serves every user at the largest ratio ``r`` whose final total fits it
(:func:`uniform_ratio`, by bisection): for an eviction policy the total is exact, each user's layers keeping what
the policy's budget rule keeps for its history (``floor(r n native / kept)`` events, :func:`eviction_bytes`), so the
floor that leaves a short history nothing at a small ratio is counted; for other schemes it is ``r`` times Native's
layer bytes (:func:`linear_bytes`). Both add, per entry, what compression does not touch (the header, the last
hidden state, the counters), measured on a real entry of the scheme: the longest user's, at the ratio found (the
header holds the ratio's and the shapes' digits), so that it bounds the others'. Should the total still pass the
budget during the replay, the uniform allocator drops the least recently requested users, as LRU does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from malloc.core.state import SCALAR_BYTES, LayerState, UserState
from malloc.memory.policy import EvictionPolicy, native_token_bytes
from malloc.serve.options import ServeError
from malloc.serve.requests import Requests
from malloc.serving.engine import Engine
from malloc.serving.store import EntryIdentity, encode


def final_events(requests: Requests) -> np.ndarray:
    """``(U,)`` events each user's state holds after its last request (0 for users without a request)."""
    last = np.full(requests.num_users, -1, dtype=np.int64)
    np.maximum.at(last, requests.user, requests.event)
    return np.where(last >= 0, last + 1 - requests.log_start, 0)


def zero_state(engine: Engine, events: int) -> UserState:
    """A Native state of ``events`` events, every tensor zero (the shapes and dtypes of ``engine``'s states)."""
    empty = engine.empty_state()
    layers = []
    for layer in empty.layers:
        assert isinstance(layer, LayerState)
        heads, _, key_dim = layer.keys.shape
        layers.append(LayerState(keys=torch.zeros(heads, events, key_dim, dtype=layer.keys.dtype),
                                 values=torch.zeros(heads, events, layer.values.shape[2], dtype=layer.values.dtype),
                                 positions=torch.zeros(1, events, dtype=torch.int32),
                                 timestamps=torch.zeros(1, events, dtype=torch.int64)))
    hidden = torch.zeros(engine.model.cfg.dim, dtype=engine.state_dtype)
    return UserState(layers=tuple(layers), last_hidden=hidden, next_position=events, last_timestamp=0)


def check_plain(engine: Engine) -> None:
    """A budget is a fraction of Native's bytes: the model's layers must store plain per-event keys and values.

    Raises:
        ServeError: naming the model's scheme.
    """
    own = [type(layer).__name__ for layer in engine.model.layers if not layer.plain_kv]
    if own:
        raise ServeError(f"--budget is a fraction of Native's bytes; the model's scheme {engine.model.cfg.scheme!r} "
                         f"stores a state of its own ({own[0]}): serve it with --allocator uniform and no budget")


def native_entry_bytes(engine: Engine, identity: EntryIdentity, events: np.ndarray) -> np.ndarray:
    """``(U,)`` int64 bytes of a Native entry holding ``events[u]`` events (0 where ``events[u] == 0``).

    ``engine`` serves Native and ``identity`` is its entries' identity."""
    check_plain(engine)
    per_event, fixed = event_bytes(engine), fixed_bytes(engine)
    out = np.where(events > 0, per_event * events + fixed, 0).astype(np.int64)
    digits = np.char.str_len(events.astype(str))
    for count in np.unique(digits[events > 0]).tolist():  # the header differs only with the shapes' digits
        sample = zero_state(engine, 10 ** (count - 1))
        out[(digits == count) & (events > 0)] += len(encode(sample, identity)) - sample.nbytes()
    return out


def event_bytes(engine: Engine) -> int:
    """Bytes a Native state of ``engine``'s model stores per event: in every layer every head's key and value, an
    int32 position and an int64 timestamp."""
    total = 0
    for layer in engine.empty_state().layers:
        assert isinstance(layer, LayerState)
        heads, _, key_dim = layer.keys.shape
        total += heads * (key_dim * layer.keys.element_size() + layer.values.shape[2] * layer.values.element_size())
        total += 4 + 8
    return total


def fixed_bytes(engine: Engine) -> int:
    """Bytes of a state that do not grow with its events: the last hidden state and the 16 counter bytes."""
    return engine.model.cfg.dim * torch.empty(0, dtype=engine.state_dtype).element_size() + SCALAR_BYTES


FinalBytes = Callable[[float], int]


def linear_bytes(events: np.ndarray, native_layers: np.ndarray, overhead: int) -> FinalBytes:
    """Final total at ratio ``r`` when a scheme stores ``r`` times Native's layer bytes (``native_layers (U,)``)
    plus ``overhead`` per entry (users with ``events > 0``): the model for schemes that do not evict."""
    held = events > 0
    users, layers = int(held.sum()), native_layers[held].astype(np.float64)
    return lambda ratio: int(np.floor(ratio * layers).sum()) + users * overhead


def eviction_bytes(events: np.ndarray, policy: EvictionPolicy, layer: LayerState, layers: int,
                   overhead: int) -> FinalBytes:
    """Final total at ratio ``r`` of an eviction policy: per user and layer, the events its budget rule keeps for
    the user's history (``floor(r n native_token_bytes / kept_token_bytes)``, at most ``n``) at their kept bytes,
    plus ``overhead`` per entry. ``layer`` is one of the policy's stored layers (for the per-event sizes)."""
    held = events[events > 0].astype(np.float64)
    native, kept = native_token_bytes(layer), policy.kept_token_bytes(layer)

    def total(ratio: float) -> int:
        count = np.minimum(held, np.floor(ratio * held * native / kept + 1e-9))
        return int(count.sum()) * kept * layers + len(held) * overhead

    return total


def uniform_ratio(budget: int, final_bytes: FinalBytes, users: int, overhead: int) -> float:
    """The largest memory ratio (at most 1) whose final total, ``final_bytes(ratio)``, fits ``budget`` (bisection;
    the total is a non-decreasing step function of the ratio).

    Raises:
        ServeError: a budget below the entries' fixed bytes, ``users`` entries of ``overhead`` bytes.
    """
    if final_bytes(1.0) <= budget:
        return 1.0
    if final_bytes(1e-12) > budget:
        raise ServeError(f"--budget of {budget:,} bytes leaves nothing for the states' layers: {users:,} entries of "
                         f"{overhead:,} fixed bytes (header, last hidden state, counters) need {users * overhead:,}; "
                         "choose a larger budget")
    low, high = 1e-12, 1.0
    for _ in range(64):
        middle = (low + high) / 2
        low, high = (middle, high) if final_bytes(middle) <= budget else (low, middle)
    return low


__all__ = [
    "FinalBytes",
    "check_plain",
    "event_bytes",
    "eviction_bytes",
    "final_events",
    "fixed_bytes",
    "linear_bytes",
    "native_entry_bytes",
    "uniform_ratio",
    "zero_state",
]
