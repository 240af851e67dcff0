"""What every backbone shares: embeddings, heads, the training forward and the serving path.

Serving path (DESIGN.md section 3.5), batched over users of different lengths:

- ``prefill(events) -> states``: encode histories and write each user's state (in chunks, so a 16k-event
  history never builds a 16k x 16k attention matrix: each chunk is an append to the state written so far);
- ``append(states, events) -> states``: compute only the new events, against the stored state;
- ``score(states, candidates) -> logits``: candidates attend to the state and to themselves only, never to each
  other, and never enter the state; processed in micro-batches (M-FALCON style);
- ``retrieval_logits(states)``: the last stored event's output dotted with every item embedding.

With no compression, prefill + append + score equals :meth:`forward` over the same tokens (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.state import LayerState, StoredLayer, UserState, collate_layers
from malloc.core.stats import AttentionObserver, ObservedRows
from malloc.core.tokens import NUM_ACTIONS, Events, KVBlock, TokenBatch, concat_keys
from malloc.models.config import ModelConfig

# merge(stored layer, new events' dense layer, layer index, user index) -> the stored layer to keep
Merge = Callable[[StoredLayer, LayerState, int, int], StoredLayer]

# attention scores (users x heads x chunk x keys) computed at once by a serving append; past this, users go in
# groups (docs/BENCHMARKS.md, "Batched writes": on the 2-core CPU, groups within 1M-8M scores wrote 8 users of
# 1,485 to 7,697 events as fast as one user at a time, one group 1.1x to 2.8x slower depending on the load)
MAX_SCORES = 1 << 21
# candidates per chunk of the training forward (:meth:`SequentialRecommender.candidate_outputs`)
CANDIDATE_CHUNK = 64

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
L2_EPS = 1e-6


class AttentionLayer(nn.Module):
    """Interface of one backbone layer, and of the state it stores for a user.

    ``forward(x, tokens, cache, need_weights)`` takes the new tokens' inputs ``x (B, T, D)``, their metadata and
    the batch's cache as :meth:`collate` built it (or None), and returns ``y (B, T, D)``, what the new tokens add
    to the state (for attention layers: a KVBlock of ``T`` keys), and, if asked, the attention weights
    ``(B, kv_heads, T, n + T)`` over ``[cache; new]`` (0 where a key is not visible; query heads that share a
    stored head are averaged).

    The state hooks default to plain per-event keys and values (:class:`LayerState` with ``kv_heads`` heads,
    kept in full on append). Schemes that store something else (a window, a projection, a recurrent state)
    override them; ``plain_kv`` says whether training-free cache policies may act on what is stored.
    """

    heads: int
    kv_heads: int
    key_dim: int
    value_dim: int
    plain_kv: bool = True

    def forward(self, x: torch.Tensor, tokens: TokenBatch, cache: Any, need_weights: bool = False
                ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        raise NotImplementedError

    def empty_state(self, dtype: torch.dtype, device: torch.device) -> StoredLayer:
        return LayerState.empty(self.kv_heads, self.key_dim, self.value_dim, dtype, device)

    def collate(self, stored: list[StoredLayer], dtype: torch.dtype) -> Any:
        """The batch's stored layers as :meth:`forward` reads them (default: a padded KVBlock)."""
        return collate_layers(stored, dtype)

    def new_state(self, new: Any, tokens: TokenBatch, user: int, count: int, dtype: torch.dtype) -> LayerState:
        """What user ``user``'s first ``count`` new tokens add, as a stored layer of their own."""
        return LayerState(new.keys[user, :, :count].to(dtype), new.values[user, :, :count].to(dtype),
                          tokens.positions[user, None, :count].to(torch.int32),
                          tokens.timestamps[user, None, :count])

    def store(self, stored: StoredLayer, new: StoredLayer) -> StoredLayer:
        """The stored layer after an append (default: keep everything)."""
        assert isinstance(stored, LayerState) and isinstance(new, LayerState)
        return stored.extend(new)


class LayerScheme(Protocol):
    """A trained-in architecture scheme, as a backbone sees it (see ``malloc.memory.architecture``)."""

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer: ...

    def expand(self, tokens: TokenBatch) -> tuple[TokenBatch, torch.Tensor | None]: ...


class SequentialRecommender(nn.Module):
    """Embeddings + a stack of :class:`AttentionLayer` + CTR and retrieval heads.

    Args:
        cfg: hyperparameters.
        num_items: item vocabulary size (dense ids ``1..num_items``; 0 is padding).
        scheme: a trained-in architecture scheme that builds the layers (and may add tokens of its own), or
            None for the backbone's plain layers (Native).
    """

    def __init__(self, cfg: ModelConfig, num_items: int, scheme: LayerScheme | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.scheme = scheme
        self.item_embedding = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.action_embedding = nn.Embedding(NUM_ACTIONS, cfg.dim)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(self.build_layer() if scheme is None else scheme.build_layer(cfg)
                                    for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.ctr_head = nn.Linear(cfg.dim, 1)
        # CTR extras (ModelConfig.item_prior, .candidate): they act on candidates only, so the state is unchanged
        self.item_bias = nn.Embedding(num_items + 1, 1) if cfg.item_prior else None
        self.candidate_query = nn.Parameter(torch.randn(cfg.dim) * 0.02) if cfg.candidate == "query" else None
        self.readout = nn.Linear(cfg.dim, cfg.dim, bias=False) if cfg.ctr_readout == "dot" else None
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.action_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            if self.item_bias is not None:
                self.item_bias.weight.zero_()

    # -- hooks for the backbones -------------------------------------------------------------------------------
    def build_layer(self) -> AttentionLayer:
        raise NotImplementedError

    def embed(self, tokens: TokenBatch) -> torch.Tensor:
        """Input embeddings ``(B, T, D)``."""
        return self.item_inputs(tokens) + self.action_embedding(tokens.actions)

    def item_inputs(self, tokens: TokenBatch) -> torch.Tensor:
        """``(B, T, D)`` what each token shows of its item: the item embedding, except for candidates under
        ``candidate = "query"`` (the shared query embedding)."""
        items = self.item_embedding(tokens.items)
        if self.candidate_query is None:
            return items
        candidate = (tokens.valid & ~tokens.is_history)[:, :, None]
        return torch.where(candidate, self.candidate_query.to(items.dtype), items)

    def set_item_prior(self, item_log_odds: torch.Tensor, base_log_odds: float) -> None:
        """Initialise the CTR prior: ``item_bias[i] = item_log_odds[i] - base`` and the head's bias ``base``.

        Args:
            item_log_odds: ``(num_items + 1,)`` each item's smoothed training log-odds (entry 0: padding).
        """
        if self.item_bias is None:
            raise ValueError("set_item_prior needs model.item_prior")
        with torch.no_grad():
            self.item_bias.weight.copy_((item_log_odds - base_log_odds).reshape(-1, 1))
            self.ctr_head.bias.fill_(base_log_odds)

    # -- training forward --------------------------------------------------------------------------------------
    def encode(self, tokens: TokenBatch, caches: list[KVBlock] | None = None,
               observer: AttentionObserver | None = None) -> tuple[torch.Tensor, list[KVBlock]]:
        """Run the layer stack over new tokens against optional cached blocks.

        Args:
            observer: if given, receives every layer's attention weights (query-aware cache policies).
        Returns:
            ``h (B, T, D)`` final normalised outputs, and what the new tokens add to each layer's state.
        """
        hidden, blocks, _ = self._encode(tokens, caches, observer)
        return hidden, blocks

    def _encode(self, tokens: TokenBatch, caches: list[Any] | None,
                observer: AttentionObserver | ObservedRows | None) -> tuple[torch.Tensor, list[Any], TokenBatch]:
        """:meth:`encode`, also returning the tokens the layers processed (a scheme may add its own)."""
        processed, original = (tokens, None) if self.scheme is None else self.scheme.expand(tokens)
        x = self.input_dropout(self.embed(processed))
        new_blocks = []
        for index, layer in enumerate(self.layers):
            cache = None if caches is None else caches[index]
            x, block, weights = layer(x, processed, cache, need_weights=observer is not None)
            if observer is not None:
                observer.observe(index, weights, concat_keys(cache, block), processed)
            new_blocks.append(block)
        hidden = self.final_norm(x)
        if original is not None:  # back to the caller's tokens: (B, T') -> (B, T)
            hidden = hidden.gather(1, original[:, :, None].expand(-1, -1, hidden.shape[2]))
        return hidden, new_blocks, processed

    def forward(self, tokens: TokenBatch) -> torch.Tensor:
        """The plain full forward used for training: ``(B, T)`` tokens -> ``(B, T, D)`` outputs."""
        return self.encode(tokens)[0]

    def candidate_outputs(self, tokens: TokenBatch, candidates_from: int, chunk: int = CANDIDATE_CHUNK
                          ) -> torch.Tensor:
        """``(B, T - candidates_from, D)`` outputs of the candidate tokens ``tokens[:, candidates_from:]`` (no candidate
        sees another), computed as serving scores them: the history once, then candidates in chunks of ``chunk``
        against each layer's history keys, instead of one forward over ``T x T`` pairs of which the
        candidate-candidate block is masked but for its diagonal. Equal to ``forward(tokens)[:, candidates_from:]``
        up to rounding (tested). A trained-in scheme (whose layers store something else than the keys they
        compute) takes the one full forward."""
        if self.scheme is not None or candidates_from >= tokens.items.shape[1]:
            return self.encode(tokens)[0][:, candidates_from:]
        _, blocks = self.encode(tokens.slice(0, candidates_from))
        candidates = tokens.slice(candidates_from, tokens.items.shape[1])
        return torch.cat([self.encode(candidates.slice(start, start + chunk), blocks)[0]
                          for start in range(0, candidates.items.shape[1], chunk)], dim=1)

    def ctr_logits(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` candidate outputs and ``(...)`` their item ids -> ``(...)`` click logits: the head, plus
        ``<W h, e_item>`` under ``ctr_readout = "dot"`` and the item's prior under ``item_prior``."""
        logits = self.ctr_head(hidden).squeeze(-1)
        if self.readout is not None:
            logits = logits + (self.readout(hidden) * self.item_embedding(items)).sum(-1)
        if self.item_bias is not None:
            logits = logits + self.item_bias(items).squeeze(-1)
        return logits

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` user representations -> ``(..., num_items + 1)`` logits; column 0 (padding) is -inf.

        ``model.l2_norm``: both sides L2-normalised (cosine scores, as generative-recommenders' retrieval)."""
        logits = self.user_vector(hidden) @ self.item_vectors().T
        logits[..., 0] = float("-inf")
        return logits

    def user_vector(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` the retrieval query of a user representation (L2-normalised under ``model.l2_norm``)."""
        return F.normalize(hidden, dim=-1, eps=L2_EPS) if self.cfg.l2_norm else hidden

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., D)`` the retrieval keys of ``items`` (default: the whole table, ``(num_items + 1, D)``)."""
        table = self.item_embedding.weight if items is None else self.item_embedding(items)
        return F.normalize(table, dim=-1, eps=L2_EPS) if self.cfg.l2_norm else table

    # -- serving path ------------------------------------------------------------------------------------------
    @property
    def state_dtype(self) -> torch.dtype:
        """The stored tensors' dtype: ``cfg.state_dtype``, except that "float32", the exact reference, keeps a
        float64 model's precision (float64 is how the exactness tests rule out rounding; a float32 state would
        round every stored key to 1e-7 and hide a logic error behind it)."""
        stored = DTYPES[self.cfg.state_dtype]
        if stored == torch.float32 and self.item_embedding.weight.dtype == torch.float64:
            return torch.float64
        return stored

    @property
    def device(self) -> torch.device:
        return self.item_embedding.weight.device

    def empty_state(self) -> UserState:
        layers = tuple(layer.empty_state(self.state_dtype, self.device) for layer in self.layers)
        return UserState(layers=layers, last_hidden=torch.zeros(0, device=self.device), next_position=0,
                         last_timestamp=0)

    def _caches(self, states: list[UserState], renormalise: bool = False) -> list[Any]:
        """The stored layers as attention reads them.

        Args:
            renormalise: scale each user's stored contributions by events seen / events stored (HSTU's
                "N = kept" switch, METHODS.md R3); off, evicted events contribute exactly 0 under the original N.
        """
        dtype = self.item_embedding.weight.dtype
        blocks = [layer.collate([s.layers[index] for s in states], dtype)
                  for index, layer in enumerate(self.layers)]
        if not renormalise:
            return blocks
        return [replace(block, scale=torch.tensor(
            [[s.next_position / max(s.layers[index].num_tokens, 1)] for s in states], dtype=dtype,
            device=block.keys.device)) for index, block in enumerate(blocks)]

    @torch.no_grad()
    def prefill(self, events: Events, chunk_size: int = 1024, observer: AttentionObserver | None = None,
                max_scores: int = MAX_SCORES) -> list[UserState]:
        """Encode histories from scratch and write one (uncompressed) state per user."""
        states = [self.empty_state() for _ in range(events.items.shape[0])]
        return self.append(states, events, chunk_size=chunk_size, observer=observer, max_scores=max_scores)

    @torch.no_grad()
    def append(self, states: list[UserState], events: Events, chunk_size: int = 1024,
               observer: AttentionObserver | None = None, merge: Merge | None = None, renormalise: bool = False,
               max_scores: int = MAX_SCORES) -> list[UserState]:
        """Compute only the new events against the stored states and return the updated states.

        The input states are not modified. Events longer than ``chunk_size`` are appended chunk by chunk; each
        chunk is computed for the users whose events reach it only (the others would only pad its attention), in
        groups of users whose attention scores (users x heads x chunk x keys) stay within ``max_scores``: one
        huge score tensor is slower than several that fit the caches, and each user's result is the same.

        Args:
            observer: receives the attention weights of the new events.
            merge: how a layer's stored events and the new events become the stored layer (a cache policy;
                default: the layer's own rule, :meth:`AttentionLayer.store`).
            renormalise: see :meth:`_caches`.
            max_scores: attention scores per group of users (at least one user per group).
        """
        for start in range(0, events.items.shape[1], chunk_size):
            chunk = events.slice(start, start + chunk_size)
            active = torch.nonzero(chunk.lengths > 0).flatten()
            if len(active) == 0:  # events are left-aligned: no later chunk has any either
                break
            keys = max(states[u].num_tokens for u in active.tolist()) + chunk.items.shape[1]
            group = max(1, max_scores // (self.cfg.heads * chunk.items.shape[1] * keys))
            if len(active) == len(states) and group >= len(states):
                states = self._append_chunk(states, chunk, observer, merge, renormalise)
                continue
            states = list(states)
            for first in range(0, len(active), group):
                rows = active[first:first + group]
                users = rows.tolist()
                done = self._append_chunk([states[u] for u in users], chunk.take(rows),
                                          None if observer is None else observer.restrict(rows), merge,
                                          renormalise, users)
                for u, state in zip(users, done, strict=True):
                    states[u] = state
        return states

    def _append_chunk(self, states: list[UserState], events: Events,
                      observer: AttentionObserver | ObservedRows | None, merge: Merge | None, renormalise: bool,
                      users: list[int] | None = None) -> list[UserState]:
        """One chunk of :meth:`append`; ``users`` are the batch indices of ``states`` (merge's user argument)."""
        device = events.items.device
        next_pos = torch.tensor([s.next_position for s in states], dtype=torch.int64, device=device)
        length = events.items.shape[1]
        valid = events.valid
        tokens = TokenBatch(
            items=events.items, actions=events.actions,
            positions=next_pos[:, None] + torch.arange(length, device=device)[None, :],
            timestamps=events.timestamps, is_history=valid, valid=valid,
        )
        hidden, blocks, processed = self._encode(tokens, self._caches(states, renormalise), observer)
        counts = processed.valid.sum(dim=1).tolist()  # new tokens per user, left-aligned (events, maybe more)
        updated = []
        for b, state in enumerate(states):
            t = int(events.lengths[b])
            if t == 0:
                updated.append(state)
                continue
            layers = []
            for index, (layer, stored, block) in enumerate(zip(self.layers, state.layers, blocks, strict=True)):
                new = layer.new_state(block, processed, b, counts[b], self.state_dtype)
                user = b if users is None else users[b]
                layers.append(layer.store(stored, new) if merge is None else merge(stored, new, index, user))
            layers = tuple(layers)
            updated.append(UserState(layers=layers, last_hidden=hidden[b, t - 1].to(self.state_dtype).clone(),
                                     next_position=state.next_position + t,
                                     last_timestamp=int(events.timestamps[b, t - 1])))
        return updated

    @torch.no_grad()
    def score(self, states: list[UserState], items: torch.Tensor, timestamps: torch.Tensor,
              chunk_size: int = 256, renormalise: bool = False) -> torch.Tensor:
        """Click logits of candidates read from the stored states; the states are left unchanged.

        Args:
            items: ``(B, c)`` candidate item ids (0 = padding, its logit is meaningless).
            timestamps: ``(B, c)`` request times.
            chunk_size: candidates per micro-batch.
            renormalise: see :meth:`_caches`.
        Returns:
            ``(B, c)`` logits.
        """
        caches = self._caches(states, renormalise)
        next_pos = torch.tensor([s.next_position for s in states], dtype=torch.int64, device=items.device)
        logits = []
        for start in range(0, items.shape[1], chunk_size):
            part = items[:, start:start + chunk_size]
            valid = part > 0
            tokens = TokenBatch(
                items=part, actions=torch.zeros_like(part),
                positions=next_pos[:, None].expand_as(part),
                timestamps=timestamps[:, start:start + chunk_size], is_history=torch.zeros_like(valid),
                valid=valid,
            )
            hidden, _ = self.encode(tokens, caches)
            logits.append(self.ctr_logits(hidden, part))
        return torch.cat(logits, dim=1)

    @torch.no_grad()
    def retrieval_logits(self, states: list[UserState]) -> torch.Tensor:
        """``(B, num_items + 1)`` next-item logits from each state's last hidden output."""
        hidden = torch.stack([s.last_hidden.to(self.item_embedding.weight.dtype) for s in states])
        return self.item_logits(hidden)
