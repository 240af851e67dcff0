"""What every backbone shares: embeddings, the layer stack, the heads and the training forward.

A backbone is embeddings + a stack of :class:`AttentionLayer` + CTR and retrieval heads. ``forward`` is the plain
full forward training uses; :meth:`SequentialRecommender.encode` runs the stack over new tokens against what the
layers stored before (their caches), which is how the serving engine (:mod:`malloc.serving.engine`) writes,
appends and scores, and how CTR training scores its candidates. What a layer stores for a user, and how it reads
it back, are the layer's state hooks.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.state import LayerState, StoredLayer, as_dtype, collate_layers
from malloc.core.stats import AttentionObserver, ObservedRows
from malloc.core.tokens import NUM_ACTIONS, KVBlock, TokenBatch, concat_keys
from malloc.models.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
L2_EPS = 1e-6
# candidates per chunk of the training forward (:meth:`SequentialRecommender.candidate_outputs`)
CANDIDATE_CHUNK = 64


class Dropout(nn.Dropout):
    """``nn.Dropout`` that returns its input untouched when not training (or at ``p = 0``), without calling
    PyTorch's dropout at all: in eval mode that call changes nothing, yet it is a dispatch plus a lookup through
    ``torch._VF`` on every call, and a serving request passes through several."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.training and self.p > 0 else x


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
        return LayerState(as_dtype(new.keys[user, :, :count], dtype), as_dtype(new.values[user, :, :count], dtype),
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
        # learned absolute positions, set by a backbone that has them (SASRec; HSTU under model.absolute_positions)
        self.position_embedding: nn.Embedding | None = None
        self.input_dropout = Dropout(cfg.dropout)
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
        """Input embeddings ``(B, T, D)``: item + action; with a position table, the item scaled by ``sqrt(D)`` plus
        the position's row (positions past ``max_len - 1`` share the last row)."""
        items, actions = self.item_inputs(tokens), self.action_embedding(tokens.actions)
        if self.position_embedding is None:
            return items + actions
        positions = tokens.positions.clamp(0, self.cfg.max_len - 1)
        return items * math.sqrt(self.cfg.dim) + self.position_embedding(positions) + actions

    def item_inputs(self, tokens: TokenBatch) -> torch.Tensor:
        """``(B, T, D)`` what each token shows of its item: the item embedding, except for candidates under
        ``candidate = "query"`` (the shared query embedding)."""
        items = self.item_embedding(tokens.items)
        if self.candidate_query is None:
            return items
        candidate = (tokens.valid & ~tokens.is_history)[:, :, None]
        return torch.where(candidate, self.candidate_query.to(items.dtype), items)

    @property
    def item_blind_candidates(self) -> bool:
        """Whether the layers see no candidate's item (``candidate = "query"``): a user's candidates at one time
        are then one token to them (:mod:`malloc.serving.candidates`)."""
        return self.candidate_query is not None

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
        hidden, blocks, _ = self.encode_tokens(tokens, caches, observer)
        return hidden, blocks

    def encode_tokens(self, tokens: TokenBatch, caches: list[Any] | None,
                observer: AttentionObserver | ObservedRows | None) -> tuple[torch.Tensor, list[Any], TokenBatch]:
        """:meth:`encode`, also returning the tokens the layers processed (a scheme may add its own): what the
        serving engine needs to store each layer's new state."""
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

    @property
    def device(self) -> torch.device:
        return self.item_embedding.weight.device
