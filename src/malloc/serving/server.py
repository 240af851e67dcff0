"""The request protocol (DESIGN.md section 3.5) for one model: write, append, read.

Every accuracy figure MALLOC reports goes through a :class:`Server`: histories are written into stored states,
new events are appended against the stored states, and predictions are read from them.
"""

from __future__ import annotations

import torch

from malloc.core.state import LayerState, StoredLayer, UserState
from malloc.core.stats import AttentionObserver
from malloc.core.tokens import Events
from malloc.memory.policy import CachePolicy, LayerContext, SchemeError
from malloc.models.base import SequentialRecommender
from malloc.serving.prefill_cache import Prefill, PrefillCache


class Server:
    """Serves one trained model, storing each user's state under a cache policy.

    Write: the history is encoded uncompressed, then the policy compresses each layer. Append: the new events
    are computed against the stored (compressed) layers, then the policy merges them in within its budget.
    Query-aware policies observe the attention of the user's own events only.

    Args:
        model: a backbone; switched to eval mode (dropout off), since serving must be deterministic.
        policy: the cache policy (default: Native, keep everything).
        prefill_chunk: events encoded per chunk when writing a history.
        candidate_chunk: candidates scored per micro-batch.
        renormalise: HSTU only: scale stored contributions by events seen / events stored ("N = kept", METHODS.md
            R3) instead of keeping the original normaliser (evicted events contribute 0; the default).
        prefill_cache: uncompressed writes shared with other servers of the same model (a sweep's training-free
            items, :mod:`malloc.serving.prefill_cache`); None computes every write.
    """

    def __init__(self, model: SequentialRecommender, policy: CachePolicy | None = None, prefill_chunk: int = 1024,
                 candidate_chunk: int = 256, renormalise: bool = False, prefill_cache: PrefillCache | None = None
                 ) -> None:
        self.model = model.eval()
        self.policy = policy if policy is not None else CachePolicy()
        own_state = [type(layer).__name__ for layer in model.layers if not layer.plain_kv]
        if self.policy.name != "native" and own_state:
            raise SchemeError(f"{self.policy.name}: training-free policies act on plain per-event keys and values; "
                              f"scheme {model.cfg.scheme!r} stores a state of its own ({own_state[0]})")
        if renormalise and own_state:
            raise SchemeError(f"eval.hstu_normaliser=kept rescales stored per-event contributions; scheme "
                              f"{model.cfg.scheme!r} stores a state of its own ({own_state[0]})")
        if prefill_cache is not None and prefill_cache.model is not model:
            raise ValueError("prefill_cache holds the writes of another model")
        self.prefill_chunk = prefill_chunk
        self.candidate_chunk = candidate_chunk
        self.renormalise = renormalise
        self.prefill_cache = prefill_cache

    def _context(self, layer: int, user: int, history_len: int) -> LayerContext:
        return LayerContext(layer=layer, num_layers=len(self.model.layers), backbone=self.model.cfg.backbone,
                            history_len=history_len, user=user)

    def _observer(self, end_positions: torch.Tensor) -> AttentionObserver | None:
        if not self.policy.needs_attention:
            return None
        return AttentionObserver(len(self.model.layers), self.model.layers[0].kv_heads, end_positions,
                                 self.policy.observation_window)

    def write(self, events: Events) -> list[UserState]:
        """Encode stored histories ``(B, n)`` and return one compressed state per user (on the model's device)."""
        events = events.to(self.model.device)

        def prefill() -> Prefill:
            observer = self._observer(events.lengths)
            return self.model.prefill(events, chunk_size=self.prefill_chunk, observer=observer), observer

        if self.prefill_cache is None:
            states, observer = prefill()
        else:
            window = self.policy.observation_window if self.policy.needs_attention else None
            states, observer = self.prefill_cache.get(events, self.prefill_chunk, window, prefill)
        return [UserState(
            layers=tuple(self.policy.compress(layer, None if observer is None else observer.stats(index, b),
                                              self._context(index, b, state.next_position))
                         for index, layer in enumerate(state.layers)),
            last_hidden=state.last_hidden, next_position=state.next_position, last_timestamp=state.last_timestamp)
            for b, state in enumerate(states)]

    def append(self, states: list[UserState], events: Events) -> list[UserState]:
        """Compute new events ``(B, t)`` against the stored states; returns the new states."""
        events = events.to(self.model.device)
        starts = torch.tensor([s.next_position for s in states], dtype=torch.int64, device=events.items.device)
        ends = starts + events.lengths
        observer = self._observer(ends)

        def merge(stored: StoredLayer, new: LayerState, layer: int, user: int) -> StoredLayer:
            stats = None if observer is None else observer.stats(layer, user)
            end = int(new.positions[0, -1]) + 1
            return self.policy.merge(stored, new, stats, self._context(layer, user, end))

        native = self.policy.name == "native"  # then each layer keeps its own rule (a trained-in scheme's window...)
        return self.model.append(states, events, chunk_size=self.prefill_chunk, observer=observer,
                                 merge=None if native else merge, renormalise=self.renormalise)

    def score(self, states: list[UserState], items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """``(B, c)`` candidate click logits read from the states (left unchanged)."""
        device = self.model.device
        return self.model.score(states, items.to(device), timestamps.to(device), chunk_size=self.candidate_chunk,
                                renormalise=self.renormalise)

    def retrieve(self, states: list[UserState]) -> torch.Tensor:
        """``(B, num_items + 1)`` next-item logits read from the states."""
        return self.model.retrieval_logits(states)
