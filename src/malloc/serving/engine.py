"""The serving engine: write, append and read per-user states for one model under one cache policy.

Every accuracy figure MALLOC reports goes through an :class:`Engine`, batched over users of different lengths:

- ``write(events) -> states``: encode each history from scratch (in chunks, so a 16k-event history never builds a
  16k x 16k attention matrix: each chunk is an append to the state written so far), then let the policy compress
  each layer;
- ``append(states, events) -> states``: compute only the new events against the stored (compressed) states, then
  let the policy merge them in within its budget; the input states are not modified;
- ``score(states, items, timestamps) -> logits``: candidates attend to the state and to themselves only, never to
  each other, and never enter the state; processed in micro-batches (M-FALCON style); where the layers see no
  candidate's item (``candidate = "query"``), a user's candidates at one time are one token
  (:mod:`malloc.serving.candidates`);
- ``retrieve(states)``: the last stored event's output dotted with every item's embedding.

The model contributes embeddings, the layer stack (:meth:`~malloc.models.base.SequentialRecommender.encode`) and
the heads; its layers say what they store (:class:`~malloc.models.base.AttentionLayer`'s state hooks). The engine
owns the rest: chunking, grouping users, assembling each layer's stored states into what attention reads, and the
policy. With :class:`~malloc.memory.schemes.reference.native.Native` (keep everything, the default) each layer
keeps its own rule (a trained-in scheme's window, projection or recurrent state), and prefill + append + score
equals the model's full forward over the same tokens (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from malloc.core.state import LayerState, StoredLayer, UserState
from malloc.core.stats import AttentionObserver, ObservedRows
from malloc.core.tokens import Events, TokenBatch
from malloc.memory.policy import CachePolicy, LayerContext, SchemeError
from malloc.memory.schemes.reference.native import Native
from malloc.models.base import DTYPES, SequentialRecommender
from malloc.serving.candidates import MergedCandidates, merge_candidates
from malloc.serving.prefill_cache import Prefill, PrefillCache

# merge(stored layer, new events' dense layer, layer index, user index) -> the stored layer to keep
Merge = Callable[[StoredLayer, LayerState, int, int], StoredLayer]

# attention scores (users x heads x chunk x keys) computed at once by an append; past this, users go in groups
# (docs/BENCHMARKS.md, "Batched writes": groups of a few million scores write as fast as one user at a time)
MAX_SCORES = 1 << 21


class Engine:
    """Serves one trained model, storing each user's state under a cache policy.

    Query-aware policies observe the attention of the user's own events only.

    Args:
        model: a backbone; switched to eval mode (dropout off), since serving must be deterministic.
        policy: the cache policy (default: :class:`Native`, keep everything).
        prefill_chunk: events encoded per chunk when writing a history (and appending many events).
        candidate_chunk: candidates scored per micro-batch.
        renormalise: HSTU only: scale stored contributions by events seen / events stored ("N = kept",
            docs/DESIGN.md, "Eviction and HSTU's normaliser") instead of keeping the original normaliser (evicted
            events contribute 0; the default).
        prefill_cache: uncompressed writes shared with other engines of the same model (a sweep's training-free
            items, :mod:`malloc.serving.prefill_cache`); None computes every write.
        max_scores: attention scores per group of users of an append (at least one user per group).
    Raises:
        SchemeError: a policy that compresses keys and values on a model whose layers store a state of their own,
            or ``renormalise`` on such a model.
    """

    def __init__(self, model: SequentialRecommender, policy: CachePolicy | None = None, *, prefill_chunk: int = 1024,
                 candidate_chunk: int = 256, renormalise: bool = False, prefill_cache: PrefillCache | None = None,
                 max_scores: int = MAX_SCORES) -> None:
        self.model = model.eval()
        self.policy = policy if policy is not None else Native()
        own_state = [type(layer).__name__ for layer in model.layers if not layer.plain_kv]
        if not self.policy.keeps_everything and own_state:
            raise SchemeError(f"{self.policy.name}: training-free policies act on plain per-event keys and values; "
                              f"scheme {model.cfg.scheme!r} stores a state of its own ({own_state[0]})")
        if renormalise and own_state:
            raise SchemeError(f"eval.hstu_normaliser=kept rescales stored per-event contributions; scheme "
                              f"{model.cfg.scheme!r} stores a state of its own ({own_state[0]})")
        if prefill_cache is not None and prefill_cache.model is not model:
            raise ValueError("prefill_cache holds the writes of another model")
        if min(prefill_chunk, candidate_chunk, max_scores) < 1:
            raise ValueError("prefill_chunk, candidate_chunk and max_scores must be >= 1")
        self.prefill_chunk = prefill_chunk
        self.candidate_chunk = candidate_chunk
        self.renormalise = renormalise
        self.prefill_cache = prefill_cache
        self.max_scores = max_scores

    # -- what the stored state looks like ---------------------------------------------------------------------
    @property
    def state_dtype(self) -> torch.dtype:
        """The stored tensors' dtype: ``model.state_dtype``, except that "float32", the exact reference, keeps a
        float64 model's precision (float64 is how the exactness tests rule out rounding; a float32 state would
        round every stored key to 1e-7 and hide a logic error behind it)."""
        stored = DTYPES[self.model.cfg.state_dtype]
        if stored == torch.float32 and self.model.item_embedding.weight.dtype == torch.float64:
            return torch.float64
        return stored

    @property
    def device(self) -> torch.device:
        return self.model.device

    def empty_state(self) -> UserState:
        """A cold user's state: every layer empty, no event seen."""
        layers = tuple(layer.empty_state(self.state_dtype, self.device) for layer in self.model.layers)
        return UserState(layers=layers, last_hidden=torch.zeros(0, device=self.device), next_position=0,
                         last_timestamp=0)

    def caches(self, states: list[UserState]) -> list[Any]:
        """Each layer's stored states of the batch as attention reads them (a layer's ``collate``), scaled by
        events seen / events stored under ``renormalise``."""
        dtype = self.model.item_embedding.weight.dtype
        blocks = [layer.collate([s.layers[index] for s in states], dtype)
                  for index, layer in enumerate(self.model.layers)]
        if not self.renormalise:
            return blocks
        return [replace(block, scale=torch.tensor(
            [[s.next_position / max(s.layers[index].num_tokens, 1)] for s in states], dtype=dtype,
            device=self.device)) for index, block in enumerate(blocks)]

    # -- requests ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, events: Events, observer: AttentionObserver | None = None) -> list[UserState]:
        """Encode histories ``(B, n)`` from scratch into uncompressed states (each layer's own rule), reporting
        the attention to ``observer`` if given."""
        events = events.to(self.device)
        states = [self.empty_state() for _ in range(events.items.shape[0])]
        return self._extend(states, events, observer, merge=None)

    def write(self, events: Events) -> list[UserState]:
        """Encode stored histories ``(B, n)`` and return one state per user compressed by the policy."""
        events = events.to(self.device)

        def fresh() -> Prefill:
            observer = self._observer(events.lengths)
            return self.prefill(events, observer), observer

        if self.prefill_cache is None:
            states, observer = fresh()
        else:
            window = self.policy.observation_window if self.policy.needs_attention else None
            states, observer = self.prefill_cache.get(events, self.prefill_chunk, window, fresh)
        return [UserState(
            layers=tuple(self.policy.compress(layer, None if observer is None else observer.stats(index, b),
                                              self._context(index, b, state.next_position))
                         for index, layer in enumerate(state.layers)),
            last_hidden=state.last_hidden, next_position=state.next_position, last_timestamp=state.last_timestamp)
            for b, state in enumerate(states)]

    @torch.no_grad()
    def append(self, states: list[UserState], events: Events) -> list[UserState]:
        """Compute new events ``(B, t)`` against the stored states; returns the new states (inputs unchanged)."""
        events = events.to(self.device)
        starts = torch.tensor([s.next_position for s in states], dtype=torch.int64, device=self.device)
        observer = self._observer(starts + events.lengths)
        if self.policy.keeps_everything:  # each layer's own rule (a trained-in scheme's window, ...)
            return self._extend(states, events, observer, merge=None)

        def merge(stored: StoredLayer, new: LayerState, layer: int, user: int) -> StoredLayer:
            stats = None if observer is None else observer.stats(layer, user)
            end = int(new.positions[0, -1]) + 1
            return self.policy.merge(stored, new, stats, self._context(layer, user, end))

        return self._extend(states, events, observer, merge)

    @torch.no_grad()
    def score(self, states: list[UserState], items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """Click logits ``(B, c)`` of candidates ``items (B, c)`` (0 = padding, its logit meaningless) requested at
        ``timestamps (B, c)``, read from the states (left unchanged), ``candidate_chunk`` candidates at a time."""
        items, timestamps = items.to(self.device), timestamps.to(self.device)
        merged = self._merge(items, timestamps)
        token_items, token_times = (items, timestamps) if merged is None else (merged.items, merged.timestamps)
        caches = self.caches(states)
        next_pos = torch.tensor([s.next_position for s in states], dtype=torch.int64, device=self.device)
        hidden = []
        for start in range(0, token_items.shape[1], self.candidate_chunk):
            part = token_items[:, start:start + self.candidate_chunk]
            valid = part > 0
            tokens = TokenBatch(items=part, actions=torch.zeros_like(part), positions=next_pos[:, None].expand_as(part),
                                timestamps=token_times[:, start:start + self.candidate_chunk],
                                is_history=torch.zeros_like(valid), valid=valid)
            hidden.append(self.model.encode(tokens, caches)[0])
        outputs = torch.cat(hidden, dim=1)
        return self.model.ctr_logits(outputs if merged is None else merged.spread(outputs), items)

    @torch.no_grad()
    def request(self, states: list[UserState], events: Events, items: torch.Tensor, timestamps: torch.Tensor
                ) -> tuple[list[UserState], torch.Tensor]:
        """A CTR request per user: append ``events (B, t)``, then score candidates ``items (B, c)`` at ``timestamps
        (B, c)`` from the states after the append. Returns the new states and the logits ``(B, c)``, equal to
        ``append`` then ``score``.

        When nothing is compressed on append (the policy keeps everything and every layer stores plain keys and
        values in the compute dtype, with no tokens of its own) and the request fits one chunk, the events and the
        candidates go through the layers together, in one pass: a candidate sees the new events as history, as it
        would see them stored, and no event sees a candidate. Otherwise it is ``append`` then ``score``.
        """
        events, items, timestamps = events.to(self.device), items.to(self.device), timestamps.to(self.device)
        merged = self._merge(items, timestamps)
        token_items, token_times = (items, timestamps) if merged is None else (merged.items, merged.timestamps)
        if not self._one_pass(events, token_items):
            appended = self.append(states, events)
            return appended, self.score(appended, items, timestamps)
        t, count = events.items.shape[1], token_items.shape[1]
        next_pos = torch.tensor([s.next_position for s in states], dtype=torch.int64, device=self.device)
        valid, candidate = events.valid, token_items > 0
        tokens = TokenBatch(
            items=torch.cat([events.items, token_items], dim=1),
            actions=torch.cat([events.actions, torch.zeros_like(token_items)], dim=1),
            positions=torch.cat([next_pos[:, None] + torch.arange(t, device=self.device)[None, :],
                                 (next_pos + events.lengths)[:, None].expand(-1, count)], dim=1),
            timestamps=torch.cat([events.timestamps, token_times], dim=1),
            is_history=torch.cat([valid, torch.zeros_like(candidate)], dim=1),
            valid=torch.cat([valid, candidate], dim=1))
        hidden, blocks, processed = self.model.encode_tokens(tokens, self.caches(states), None)
        dtype, lengths, times = self.state_dtype, events.lengths.tolist(), events.timestamps.tolist()
        updated = []
        for b, state in enumerate(states):
            new_events = lengths[b]
            if new_events == 0:
                updated.append(state)
                continue
            layers = tuple(layer.store(stored, layer.new_state(block, processed, b, new_events, dtype))
                           for layer, stored, block in zip(self.model.layers, state.layers, blocks, strict=True))
            updated.append(UserState(layers=layers, last_hidden=hidden[b, new_events - 1].to(dtype).clone(),
                                     next_position=state.next_position + new_events,
                                     last_timestamp=times[b][new_events - 1]))
        outputs = hidden[:, t:]
        return updated, self.model.ctr_logits(outputs if merged is None else merged.spread(outputs), items)

    @torch.no_grad()
    def retrieve(self, states: list[UserState]) -> torch.Tensor:
        """``(B, num_items + 1)`` next-item logits from each state's last event output."""
        hidden = torch.stack([s.last_hidden.to(self.model.item_embedding.weight.dtype) for s in states])
        return self.model.item_logits(hidden)

    # -- the append loop ---------------------------------------------------------------------------------------
    def _one_pass(self, events: Events, items: torch.Tensor) -> bool:
        """Whether :meth:`request` may run the events and the candidates in one pass (see there)."""
        return (self.policy.keeps_everything and not self.renormalise and self.model.cfg.scheme == "native"
                and all(layer.plain_kv for layer in self.model.layers)
                and self.state_dtype == self.model.item_embedding.weight.dtype
                and events.items.shape[1] <= self.prefill_chunk and items.shape[1] <= self.candidate_chunk)

    def _merge(self, items: torch.Tensor, timestamps: torch.Tensor) -> MergedCandidates | None:
        """The candidates as distinct tokens where the layers cannot tell them apart (see
        :mod:`malloc.serving.candidates`), else None (every candidate is its own token)."""
        return merge_candidates(items, timestamps) if self.model.item_blind_candidates else None

    def _context(self, layer: int, user: int, history_len: int) -> LayerContext:
        return LayerContext(layer=layer, num_layers=len(self.model.layers), backbone=self.model.cfg.backbone,
                            history_len=history_len, user=user)

    def _observer(self, end_positions: torch.Tensor) -> AttentionObserver | None:
        if not self.policy.needs_attention:
            return None
        return AttentionObserver(len(self.model.layers), self.model.layers[0].kv_heads, end_positions,
                                 self.policy.observation_window)

    def _extend(self, states: list[UserState], events: Events, observer: AttentionObserver | None,
                merge: Merge | None) -> list[UserState]:
        """The states after ``events``: ``prefill_chunk`` events at a time, each chunk for the users whose events
        reach it only (the others would only pad its attention), in groups of users whose attention scores stay
        within ``max_scores`` (one huge score tensor is slower than several that fit the caches; each user's
        result is the same). ``merge`` keeps a layer's stored and new events (None: the layer's own rule).

        Observed chunks are shorter: the observer reads each chunk's ``(H, chunk, S)`` weights of a user and folds
        them into per-event running sums, so a chunk is at most ``max_scores / (H S)`` events long and no
        ``(T, S)`` weight, bias or mask tensor of a long history ever exists (an observed write of 16,384 events
        holds ``(4, 32, 16,384)`` at a time at the default size, not ``(4, 1,024, 16,384)``)."""
        heads = self.model.cfg.heads
        step = self.prefill_chunk
        if observer is not None:
            most_keys = max((s.num_tokens for s in states), default=0) + events.items.shape[1]
            step = max(1, min(step, self.max_scores // (heads * max(most_keys, 1))))
        for start in range(0, events.items.shape[1], step):
            chunk = events.slice(start, start + step)
            active = torch.nonzero(chunk.lengths > 0).flatten()
            if len(active) == 0:  # events are left-aligned: no later chunk has any either
                break
            keys = max(states[u].num_tokens for u in active.tolist()) + chunk.items.shape[1]
            group = max(1, self.max_scores // (heads * chunk.items.shape[1] * keys))
            if len(active) == len(states) and group >= len(states):
                states = self._append_chunk(states, chunk, observer, merge)
                continue
            states = list(states)
            for first in range(0, len(active), group):
                rows = active[first:first + group]
                users = rows.tolist()
                done = self._append_chunk([states[u] for u in users], chunk.take(rows),
                                          None if observer is None else observer.restrict(rows), merge, users)
                for u, state in zip(users, done, strict=True):
                    states[u] = state
        return states

    def _append_chunk(self, states: list[UserState], events: Events,
                      observer: AttentionObserver | ObservedRows | None, merge: Merge | None,
                      users: list[int] | None = None) -> list[UserState]:
        """One chunk of :meth:`_extend`; ``users`` are the batch indices of ``states`` (merge's user argument)."""
        device = events.items.device
        next_pos = torch.tensor([s.next_position for s in states], dtype=torch.int64, device=device)
        length = events.items.shape[1]
        valid = events.valid
        tokens = TokenBatch(items=events.items, actions=events.actions,
                            positions=next_pos[:, None] + torch.arange(length, device=device)[None, :],
                            timestamps=events.timestamps, is_history=valid, valid=valid)
        hidden, blocks, processed = self.model.encode_tokens(tokens, self.caches(states), observer)
        counts = processed.valid.sum(dim=1).tolist()  # new tokens per user, left-aligned (events, maybe more)
        dtype = self.state_dtype
        updated = []
        for b, state in enumerate(states):
            t = int(events.lengths[b])
            if t == 0:
                updated.append(state)
                continue
            layers = []
            for index, (layer, stored, block) in enumerate(zip(self.model.layers, state.layers, blocks, strict=True)):
                new = layer.new_state(block, processed, b, counts[b], dtype)
                user = b if users is None else users[b]
                layers.append(layer.store(stored, new) if merge is None else merge(stored, new, index, user))
            updated.append(UserState(layers=tuple(layers), last_hidden=hidden[b, t - 1].to(dtype).clone(),
                                     next_position=state.next_position + t,
                                     last_timestamp=int(events.timestamps[b, t - 1])))
        return updated


__all__ = ["MAX_SCORES", "Engine"]
