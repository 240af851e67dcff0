"""One request at a time against a state store: get, decode (or recompute), score, append, encode, make room, put.

:class:`Levels` holds the engines and entry identities of the allocator's ladder (one cache policy per memory
ratio, built on first use); :class:`Server` serves request ``i`` of a worker's :class:`~malloc.serve.requests.
Requests`, timing every stage into :class:`~malloc.serve.meters.RequestMeters` and keeping the prediction:

1. ``get`` the user's entry; ``decode`` it with the identity of the level the allocator stored it at (a missing,
   corrupt or stale entry is a miss, counted by reason);
2. on a miss, ``recompute`` the state from the user's event log (:mod:`malloc.serve.requests`) at the level the
   user is served at;
3. ``score``: CTR, the event's item at the event's time, as a candidate (the label is not in the state yet);
   retrieval, the full catalogue, items the user consumed before masked, and the rank of the event's item;
4. ``append`` the event with its label, with the engine of the serving level (a user stored lower grows back as
   its events arrive; its evicted events stay evicted);
5. ``encode``, then ``allocate``: while the entry does not fit the budget, recompress or drop the allocator's
   victim (each read, undo-logged and rewritten or deleted); the adaptive allocator recompresses the requester
   itself once no other user can be cut (:meth:`Server._make_room`); an entry that does not fit alone is not
   stored;
6. ``journal`` the entry's pre-image (persistent stores, :mod:`malloc.serve.journal`), then ``put``.

Recompression (the adaptive allocator) evicts a stored state to a lower ratio with the scheme's own scores,
without new attention: it needs a scheme whose scores exist without observed queries (random, recency,
StreamingLLM by position; H2O by the running sums it carries); :func:`recompressible` says which.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from malloc.core.state import LayerState, UserState
from malloc.data.batching import events
from malloc.data.sequences import Sequences
from malloc.device import synchronize
from malloc.eval.metrics import history_exclusion, target_ranks
from malloc.memory.policy import CachePolicy, EvictionPolicy, LayerContext
from malloc.memory.registry import build_policy
from malloc.models.base import SequentialRecommender
from malloc.serve.allocator import LEVELS, Allocator, Step, level_ratio
from malloc.serve.journal import UndoLog
from malloc.serve.meters import OUTCOME, RequestMeters, StageClock
from malloc.serve.options import ServeError
from malloc.serve.requests import Requests
from malloc.serving.engine import Engine
from malloc.serving.store import EntryError, EntryIdentity, Store, decode, encode, entry_identity


def recompressible(policy: CachePolicy) -> bool:
    """Whether a stored state of ``policy`` can be evicted to a lower ratio without observing new queries: an
    eviction policy whose scores need no attention statistics, or that carries them in the state (H2O)."""
    return isinstance(policy, EvictionPolicy) and (not policy.needs_attention or policy.carries_scores)


class Levels:
    """The engines and entry identities of a ladder of memory ratios for one scheme.

    Args:
        model: the trained model; scheme, knobs: the cache policy (``native``: one level, ratio 1).
        top: the ratio of level 0; levels: how many levels below it may be used (1: only ``top``).
        model_id: the model part of every entry's identity (a digest of the checkpoint).
        engine_args: ``prefill_chunk``, ``candidate_chunk``, ``renormalise`` of every :class:`Engine`.
    """

    def __init__(self, model: SequentialRecommender, scheme: str, knobs: dict[str, Any], top: float, levels: int,
                 model_id: str, engine_args: dict[str, Any]) -> None:
        self.model, self.scheme, self.knobs, self.top, self.count = model, scheme, knobs, top, levels
        self.model_id, self.engine_args = model_id, engine_args
        self._engines: dict[int, tuple[Engine, EntryIdentity]] = {}

    def ratio(self, level: int) -> float:
        return level_ratio(self.top, level)

    def _built(self, level: int) -> tuple[Engine, EntryIdentity]:
        if level not in self._engines:
            if not 0 <= level < self.count:
                raise ValueError(f"level {level} outside the ladder of {self.count}")
            engine = Engine(self.model, build_policy(self.scheme, self.ratio(level), **self.knobs), **self.engine_args)
            self._engines[level] = engine, entry_identity(engine, model=self.model_id)
        return self._engines[level]

    def engine(self, level: int) -> Engine:
        return self._built(level)[0]

    def identity(self, level: int) -> EntryIdentity:
        return self._built(level)[1]

    def kept_after(self, state: UserState, level: int) -> int:
        """Events per layer a state of ``state``'s history keeps at ``level`` (the scheme's budget rule)."""
        policy = self.engine(level).policy
        layer = state.layers[0]
        assert isinstance(policy, EvictionPolicy) and isinstance(layer, LayerState)
        return min(layer.num_tokens, policy.budget(layer, state.next_position))

    def next_step(self, state: UserState, level: int, kept: int | None = None) -> Step | None:
        """The first level below ``level`` that keeps fewer events than the ``kept`` (default: all) of ``state``'s
        events, with its modelled loss ``log(1 + k) - log(1 + k')`` and the bytes it frees; None at the bottom or
        with nothing to evict."""
        stored = state.num_tokens
        kept = stored if kept is None else kept
        if kept == 0:
            return None
        layer_bytes = sum(layer.nbytes() for layer in state.layers)
        for lower in range(level + 1, self.count):
            after = self.kept_after(state, lower)
            if after < kept:
                freed = int(layer_bytes * (kept - after) / stored)
                return Step(lower, math.log1p(kept) - math.log1p(after), max(freed, 1))
        return None

    def recompress(self, state: UserState, level: int) -> UserState:
        """``state`` evicted to ``level``'s ratio by the scheme's own scores (no new attention observed)."""
        policy = self.engine(level).policy
        assert isinstance(policy, EvictionPolicy)
        model = self.model
        layers = []
        for index, layer in enumerate(state.layers):
            assert isinstance(layer, LayerState)
            ctx = LayerContext(layer=index, num_layers=len(model.layers), backbone=model.cfg.backbone,
                               history_len=state.next_position)
            layers.append(policy.evict(layer, None, ctx))
        return UserState(layers=tuple(layers), last_hidden=state.last_hidden, next_position=state.next_position,
                         last_timestamp=state.last_timestamp)


class Server:
    """Serves a worker's requests one at a time (module docstring).

    Args:
        levels: the ladder's engines; allocator: the budget's bookkeeping; store: the shared store.
        seqs: every user's events (the event log); requests: this worker's requests, in order.
        retrieval: rank the catalogue (else CTR scores); mask_history: retrieval masks items seen before.
        adaptive: serve requested users at the top level and recompress victims (else one level).
        undo: the undo log of a persistent store (None: in-process store, no resume).
        meters: where stage times, bytes and outcomes go.
    Attributes:
        logits: ``(R,)`` float64 CTR logits (NaN until served); ranks: ``(R,)`` int64 retrieval ranks (0 until).
    """

    def __init__(self, levels: Levels, allocator: Allocator, store: Store, seqs: Sequences, requests: Requests,
                 retrieval: bool, mask_history: bool, adaptive: bool, undo: UndoLog | None,
                 meters: RequestMeters) -> None:
        self.levels, self.allocator, self.store, self.seqs, self.requests = levels, allocator, store, seqs, requests
        self.retrieval, self.mask_history, self.adaptive, self.undo, self.meters = (retrieval, mask_history, adaptive,
                                                                                    undo, meters)
        self.logits = np.full(len(requests), np.nan)
        self.ranks = np.zeros(len(requests), dtype=np.int64)

    @staticmethod
    def key(user: int) -> str:
        return f"u{user}"

    def serve(self, batch: list[int], seqs: list[int]) -> None:
        """Serve the worker's requests ``batch`` (of distinct users, in order) together; ``seqs`` are their places
        in the whole replay. A batch of one is one request; a larger one shares each model call (the engine pads
        users of different lengths; a user's result does not depend on the batch beyond floating-point order)."""
        r, alloc, meters, levels = self.requests, self.allocator, self.meters, self.levels
        users = [int(r.user[i]) for i in batch]
        evs = [int(r.event[i]) for i in batch]
        clock = StageClock(meters, batch, time.perf_counter())
        raws = [self.store.get(self.key(user)) for user in users]
        clock.lap("get", time.perf_counter())
        decoded = [self._decode(user, raw) for user, raw in zip(users, raws, strict=True)]
        clock.lap("decode", time.perf_counter())
        level = 0  # every allocator serves a requested user at the top of its ladder
        states: list[UserState | None] = [state for state, _ in decoded]
        missing = [b for b, state in enumerate(states) if state is None]
        if missing:
            written = levels.engine(level).write(self._events([users[b] for b in missing],
                                                              [int(r.log_start[users[b]]) for b in missing],
                                                              [evs[b] for b in missing]))
            for b, state in zip(missing, written, strict=True):
                states[b] = state
                meters.recomputed[batch[b]] = evs[b] - int(r.log_start[users[b]])
            synchronize()
            clock.lap("recompute", time.perf_counter())
        ready = [state for state in states if state is not None]
        assert len(ready) == len(batch)
        for b, i in enumerate(batch):
            meters.outcome[i] = OUTCOME[decoded[b][1]]
            meters.read[i] += 0 if raws[b] is None else len(raws[b])
        self._predict(batch, ready, users, evs)
        synchronize()
        clock.lap("score", time.perf_counter())
        appended = levels.engine(level).append(ready, self._events(users, evs, [e + 1 for e in evs]))
        synchronize()
        clock.lap("append", time.perf_counter())
        entries = [encode(state, levels.identity(level)) for state in appended]
        clock.lap("encode", time.perf_counter())
        for b, i in enumerate(batch):
            user, key = users[b], self.key(users[b])
            alloc.requested(user, int(r.timestamp[i]), seqs[b])
            placed = self._make_room(i, user, appended[b], level, entries[b])
            clock.lap("allocate", time.perf_counter())
            if self.undo is not None:
                meters.written[i] += self.undo.record(key, raws[b])
                clock.lap("journal", time.perf_counter())
            if placed is not None:
                stored_level, state, data = placed
                alloc.requester_cuts += int(stored_level != level)
                self.store.put(key, data)
                meters.written[i] += len(data)
                alloc.stored(user, stored_level, len(data),
                             levels.next_step(state, stored_level) if self.adaptive else None)
            else:
                if raws[b] is not None:
                    self.store.delete(key)
                alloc.dropped(user)
                alloc.not_stored += 1
            clock.lap("put", time.perf_counter())
            alloc.request_done()
        clock.done(time.perf_counter())

    # -- the stages ------------------------------------------------------------------------------------------------
    def _events(self, users: list[int], starts: list[int], stops: list[int]):
        return events(self.seqs, np.array(users, dtype=np.int64), np.array(starts, dtype=np.int64),
                      np.array(stops, dtype=np.int64))

    def _decode(self, user: int, raw: bytes | None) -> tuple[UserState | None, str]:
        level = int(self.allocator.level[user])
        if raw is None:
            return None, "dropped" if self.allocator.seen(user) else "cold"
        try:
            return decode(raw, self.levels.identity(max(level, 0)), self.levels.model.device), "hit"
        except EntryError as exc:
            return None, exc.reason

    def _predict(self, batch: list[int], states: list[UserState], users: list[int], evs: list[int]) -> None:
        engine = self.levels.engine(0)
        items = torch.as_tensor(self.requests.item[batch])[:, None]
        if not self.retrieval:
            logits = engine.score(states, items, torch.as_tensor(self.requests.timestamp[batch])[:, None])
            self.logits[batch] = logits[:, 0].double().cpu().numpy()
            return
        scores = engine.retrieve(states)
        exclude = (history_exclusion(self.seqs, np.array(users), np.array(evs), scores.shape[1], scores.device)
                   if self.mask_history else None)
        self.ranks[batch] = target_ranks(scores, items[:, 0].to(scores.device), exclude)

    def _make_room(self, i: int, user: int, state: UserState, level: int, data: bytes
                   ) -> tuple[int, UserState, bytes] | None:
        """Cut the allocator's victims until ``user``'s entry fits: ``(level, state, entry)`` to store, None if it
        cannot be stored. ``state`` is the requester's state at ``level``, ``data`` its entry.

        With the adaptive allocator the requester is cut too, once no other user can be (each is at the bottom of
        its ladder): to the highest level whose entry fits the budget, or, if none does, to the bottom, and only then
        are whole users dropped. A user whose whole state exceeds the budget is so stored at the level that fits,
        rather than recomputed from its log at its every request."""
        alloc, meters = self.allocator, self.meters
        while not alloc.fits(user, len(data)):
            if self.adaptive and alloc.cheapest(user) is None:
                lower = self._fitting_level(state, user, level, len(data))
                if lower is not None:
                    state, level = self.levels.recompress(state, lower), lower
                    data = encode(state, self.levels.identity(level))
                    continue
            choice = alloc.victim(user)
            if choice is None:
                return None
            victim, lower = choice
            key = self.key(victim)
            raw = self.store.get(key)
            meters.read[i] += 0 if raw is None else len(raw)
            if self.undo is not None:
                meters.written[i] += self.undo.record(key, raw)
            victim_state = None
            if lower is not None and raw is not None:
                try:
                    victim_state = decode(raw, self.levels.identity(int(alloc.level[victim])), self.levels.model.device)
                except EntryError:
                    victim_state = None
            if victim_state is None:
                if raw is not None:
                    self.store.delete(key)
                alloc.dropped(victim)
                alloc.drops += 1
                continue
            assert lower is not None
            assert alloc.budget is not None
            lower = self._deepest(victim_state, user, victim, lower,
                                  alloc.total - int(alloc.size[user]) + len(data) - alloc.budget)
            smaller = self.levels.recompress(victim_state, lower)
            encoded = encode(smaller, self.levels.identity(lower))
            self.store.put(key, encoded)
            meters.written[i] += len(encoded)
            alloc.stored(victim, lower, len(encoded), self.levels.next_step(smaller, lower))
            alloc.recompressions += 1
        return level, state, data

    def _fitting_level(self, state: UserState, user: int, level: int, size: int) -> int | None:
        """The highest level below ``level`` at which ``user``'s entry (``size`` bytes at ``level``) is estimated to
        fit the room the other users leave (its layers' bytes scale with the events kept); the bottom level if none
        does; None if no level below keeps fewer events."""
        alloc = self.allocator
        assert alloc.budget is not None
        room = alloc.budget - (alloc.total - int(alloc.size[user]))
        stored = state.num_tokens
        layer_bytes = sum(layer.nbytes() for layer in state.layers)
        lowest = None
        for lower in range(level + 1, self.levels.count):
            after = self.levels.kept_after(state, lower)
            if after >= stored:
                continue
            lowest = lower
            if size - layer_bytes * (stored - after) / stored <= room:
                return lower
        return lowest

    def _deepest(self, state: UserState, requester: int, victim: int, lower: int, needed: int) -> int:
        """How far down to take ``victim`` in one recompression: while its first ``lower`` step frees less than
        ``needed`` bytes, its further steps are taken as long as each is still the cheapest cut of all
        (:meth:`~malloc.serve.allocator.Allocator.cheapest`), as step-by-step greedy cuts would, at the cost of one
        decode and encode instead of several."""
        alloc = self.allocator
        freed = int(alloc.step_freed[victim])
        kept = self.levels.kept_after(state, lower)
        while freed < needed:
            step = self.levels.next_step(state, lower, kept)
            if step is None:
                break
            rival = alloc.cheapest(requester)
            if rival is not None and alloc.cut_key(victim, step) > rival:
                break
            lower, freed, kept = step.level, freed + step.freed, self.levels.kept_after(state, step.level)
        return lower


def check_levels(scheme: str, knobs: dict[str, Any], allocator: str) -> tuple[float, int]:
    """The ladder an allocator serves ``scheme`` on: ``(top ratio, levels)``.

    Raises:
        ServeError: ``adaptive`` with a scheme it cannot recompress (naming the ones it can).
    """
    if allocator != "adaptive":
        return 1.0, 1
    policy = build_policy(scheme, 0.5, **knobs)
    if not recompressible(policy):
        raise ServeError(f"--allocator adaptive recompresses stored states with the scheme's own scores; {scheme} "
                         "cannot (its scores need new queries, or it does not evict): use random, recency, "
                         "streaming_llm or h2o")
    # a scheme that carries scores (H2O) stores none at ratio 1, so its ladder starts below 1
    top = 1.0 if not policy.carries_scores else level_ratio(1.0, 1)
    return top, LEVELS


__all__ = ["Levels", "Server", "check_levels", "recompressible"]
