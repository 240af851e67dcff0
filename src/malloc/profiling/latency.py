"""Wall-clock timing of the serving path and of training steps, with synthetic inputs.

Benchmark hygiene: every timed call is warmed up first, the clock is read with
``time.perf_counter`` after synchronising the GPU (when one is in use), and calls are repeated until both a
minimum count and a minimum total time are reached, so medians and tails (p50, p99) come from many samples.

The headline measurement is :func:`request_latency`: for one user with a stored history of ``history_len``
events, the cached request (append the new events to the stored state, then score the candidates) against the
full recompute (prefill the whole history plus the new events, then score).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from malloc.core.tokens import NUM_ACTIONS, Events, TokenBatch
from malloc.device import synchronize
from malloc.models.base import SequentialRecommender
from malloc.serving.engine import Engine


def synthetic_events(batch: int, length: int, num_items: int, seed: int) -> Events:
    """Random events for ``batch`` users of ``length`` events each (no padding).

    Items are uniform in ``1..num_items``, actions uniform over the action ids, and timestamps strictly
    increase per user (gaps of 1 to 3,600 seconds from a random start).

    Returns:
        :class:`Events` with ``(batch, length)`` tensors and ``lengths`` all equal to ``length``.
    """
    if batch < 1 or length < 0 or num_items < 1:
        raise ValueError(f"need batch >= 1, length >= 0, num_items >= 1; got {batch}, {length}, {num_items}")
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (batch, length), generator=generator)
    actions = torch.randint(0, NUM_ACTIONS, (batch, length), generator=generator)
    start = torch.randint(1_500_000_000, 1_600_000_000, (batch, 1), generator=generator)
    gaps = torch.randint(1, 3601, (batch, length), generator=generator)
    timestamps = start + torch.cumsum(gaps, dim=1)
    return Events(items=items, actions=actions, timestamps=timestamps,
                  lengths=torch.full((batch,), length, dtype=torch.int64))


def time_call(fn: Callable[[], Any], *, warmup: int = 2, min_repeats: int = 5, min_seconds: float = 0.2,
              max_repeats: int = 1000) -> np.ndarray:
    """Seconds per call of ``fn()``.

    Runs ``warmup`` untimed calls, then times calls one by one until at least ``min_repeats`` calls have been
    timed and their total reaches ``min_seconds`` (or ``max_repeats`` calls were timed).

    Returns:
        ``(repeats,)`` float64 seconds, in call order.
    """
    if min_repeats < 1 or max_repeats < min_repeats or warmup < 0 or min_seconds < 0:
        raise ValueError("need warmup >= 0, 1 <= min_repeats <= max_repeats and min_seconds >= 0; got "
                         f"warmup={warmup}, min_repeats={min_repeats}, max_repeats={max_repeats}, "
                         f"min_seconds={min_seconds}")
    for _ in range(warmup):
        fn()
    synchronize()
    samples: list[float] = []
    total = 0.0
    while len(samples) < max_repeats and (len(samples) < min_repeats or total < min_seconds):
        tic = time.perf_counter()
        fn()
        synchronize()
        elapsed = time.perf_counter() - tic
        samples.append(elapsed)
        total += elapsed
    return np.asarray(samples, dtype=np.float64)


def synthetic_candidates(events: Events, count: int, num_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, count)`` random candidate items and request times just after each user's last event."""
    generator = torch.Generator().manual_seed(seed)
    batch = events.items.shape[0]
    items = torch.randint(1, num_items + 1, (batch, count), generator=generator)
    last = events.timestamps.max(dim=1, keepdim=True).values  # (B, 1)
    return items, (last + 1).expand(batch, count).clone()


def request_latency(model: SequentialRecommender, history_len: int, *, candidates: int = 100,
                    append_events: int = 1, prefill_chunk: int = 1024, seed: int = 0, users: int = 1,
                    chain: bool = False, recompute_timing: dict[str, Any] | None = None, **timing: Any
                    ) -> dict[str, Any]:
    """Latency of a request of ``users`` users at once (batch 1 by default), cached against full recompute.

    A stored state per user is built once by prefilling ``history_len`` random events. Then:

    - cached: ``Engine.request``: ``append_events`` new events appended to the stored state and ``candidates``
      candidates scored from the extended state (one pass through the layers for Native); every repeat starts from
      the same stored state (a request returns a new state and leaves the stored one untouched), so each one
      joins the stored layers with its new events into new tensors; with ``chain``, each repeat appends to the
      state the one before returned, as a user's next request does in serving (the stored layers take the new
      events into their spare rows in place, ``LayerState.extend``), and the history grows by ``append_events``
      per repeat;
    - recompute: ``prefill`` of the whole ``history_len + append_events`` events (in chunks of
      ``prefill_chunk``, so no ``n x n`` attention matrix is built at once), then ``score`` of the same
      candidates.

    Args:
        model: the backbone; put in eval mode, everything runs under ``torch.no_grad()``.
        users: users served by one call (one ``Engine.request`` over a batch of ``users`` states); a batch
            shares the per-call cost, which ``*_ms_per_user`` divides out.
        recompute_timing: :func:`time_call` keywords for the recompute only, overriding ``timing`` (a
            recompute of a long history takes minutes on a CPU; fewer calls keep runs short).
        timing: keyword arguments of :func:`time_call` (``warmup``, ``min_repeats``, ``min_seconds``,
            ``max_repeats``).
    Returns:
        ``history_len``, ``users``, ``cached_ms_p50``, ``cached_ms_p99``, ``recompute_ms_p50``,
        ``recompute_ms_p99`` (per call, all ``users`` together), ``cached_ms_per_user`` and
        ``recompute_ms_per_user`` (the p50 divided by ``users``), ``speedup_p50`` (recompute p50 / cached p50),
        ``state_bytes`` (stored state of the history, per user), ``threads`` (``torch.get_num_threads()``),
        ``repeats_cached``, ``repeats_recompute``.
    """
    if history_len < 1 or candidates < 1 or append_events < 1 or users < 1:
        raise ValueError("need history_len, candidates, append_events, users >= 1; got "
                         f"{history_len}, {candidates}, {append_events}, {users}")
    model.eval()
    num_items = model.num_items
    events = synthetic_events(users, history_len + append_events, num_items, seed)
    items, times = (t.to(model.device) for t in synthetic_candidates(events, candidates, num_items, seed + 1))
    events = events.to(model.device)
    history, new = events.slice(0, history_len), events.slice(history_len, history_len + append_events)
    engine = Engine(model, prefill_chunk=prefill_chunk)
    with torch.no_grad():
        stored = engine.prefill(history)

        newest = [stored]

        def cached() -> torch.Tensor:
            states, logits = engine.request(newest[0], new, items, times)
            if chain:
                newest[0] = states
            return logits

        def recompute() -> torch.Tensor:
            return engine.score(engine.prefill(events), items, times)

        cached_s = time_call(cached, **timing)
        recompute_s = time_call(recompute, **{**timing, **(recompute_timing or {})})
    cached_p50, recompute_p50 = float(np.median(cached_s)), float(np.median(recompute_s))
    return {
        "history_len": history_len,
        "users": users,
        "chain": chain,
        "cached_ms_p50": 1e3 * cached_p50,
        "cached_ms_p99": 1e3 * float(np.percentile(cached_s, 99)),
        "recompute_ms_p50": 1e3 * recompute_p50,
        "recompute_ms_p99": 1e3 * float(np.percentile(recompute_s, 99)),
        "cached_ms_per_user": 1e3 * cached_p50 / users,
        "recompute_ms_per_user": 1e3 * recompute_p50 / users,
        "speedup_p50": recompute_p50 / cached_p50,
        "state_bytes": stored[0].nbytes(),
        "threads": torch.get_num_threads(),
        "repeats_cached": len(cached_s),
        "repeats_recompute": len(recompute_s),
    }


@dataclass
class TrainingBatch:
    """Synthetic full windows for timing a training step.

    Attributes:
        tokens: ``(B, T)`` history tokens at positions ``0..T-1``, all valid.
        labels: ``(B, T)`` float 0/1 click labels, one per token.
    """

    tokens: TokenBatch
    labels: torch.Tensor

    @property
    def num_events(self) -> int:
        return int(self.tokens.valid.sum())


def synthetic_training_batch(batch: int, length: int, num_items: int, seed: int) -> TrainingBatch:
    """``batch`` random full windows of ``length`` events with random click labels."""
    events = synthetic_events(batch, length, num_items, seed)
    valid = events.valid
    tokens = TokenBatch(items=events.items, actions=events.actions,
                        positions=torch.arange(length)[None, :].expand(batch, length).clone(),
                        timestamps=events.timestamps, is_history=valid, valid=valid)
    labels = torch.randint(0, 2, (batch, length), generator=torch.Generator().manual_seed(seed + 1)).float()
    return TrainingBatch(tokens=tokens, labels=labels)


def training_step(model: SequentialRecommender, optimiser: torch.optim.Optimizer, batch: TrainingBatch
                  ) -> float:
    """One full forward, a click loss on every token, backward and optimiser step; returns the loss.

    The loss head is the CTR head (one logit per token), so the step's cost is the backbone's, not the loss's.
    """
    model.train()
    hidden = model(batch.tokens)  # (B, T, D)
    loss = F.binary_cross_entropy_with_logits(model.ctr_logits(hidden, batch.tokens.items)[batch.tokens.valid],
                                              batch.labels[batch.tokens.valid])
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach())
