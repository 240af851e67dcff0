"""Linformer: low rank along the sequence axis (Wang et al. 2020, arXiv 2006.04768), made causal and cacheable.

Each layer learns ``E, F`` of shape ``(k, P)`` (``P = max_len`` columns, shared by the heads; one pair per layer)
that project keys and values onto ``k`` virtual rows. Column ``c`` belongs to the event at absolute position
``c`` counted from the start of the history (positions never change on append, ``malloc.core.tokens``); events at
positions ``>= P`` use column ``P - 1``, the same clamping SASRec applies to its position table. So the projections
are sums over events and appending event ``j`` adds the rank-1 terms ``E[:, pos_j] k_j^T`` and ``F[:, pos_j] v_j^T``:
the state stays exact however long the history (no truncation to the last ``P`` events).

Serving rule (the same in the training forward; exact under caching). A query at position ``p`` reads the
projections of the history events before ``p`` (for an appended event or a candidate: every stored event)
plus its own key and value (the mask rule of ``malloc.core.tokens``: every token sees itself):

- ``K~_p = sum_{j: pos_j < p} E[:, pos_j] k_j^T`` ``(k, d_k)``; ``V~_p = sum_{j: pos_j < p} F[:, pos_j] v_j^T``
  ``(k, d_v)``; per head;
- HSTU: ``o_i = (1/N) [sum_r silu(alpha q_i . K~_r) V~_r + silu(alpha q_i . k_i + rab(0, 0)) v_i]``; the
  projected rows get no relative bias, since a row mixes events at many positions and times (a relative position
  or time is defined between two events, not between an event and a mixture);
  only the self term keeps the bias of distance 0 (position bucket 0 + time bucket 0 of the layer's table);
- SASRec: softmax over the ``k`` projected rows and the self key (logits scaled by ``1/sqrt(d_k)``); the rows are
  always there (all zero before any event, as Linformer's projection of a short sequence).

Differences from the paper: the paper projects the whole (padded) sequence, so every position sees the future (a
causal model trained that way leaks the next events into each query); here a query sees only the projection of
earlier events, which is what makes the
incremental update exact. The training forward computes every query's own causal projection without a loop over
time: with ``M`` the visibility of history keys (``M_ij = 1`` iff ``j`` is history and ``pos_j < pos_i``),
``S = ((Q K^T) * M) E_pos^T`` gives ``q_i . K~_i`` and the output is ``((f(S) F_pos) * M) V`` (``O(T^2 k)``,
all matrix products).

Stored per layer (:class:`ProjectionState`): projected keys ``(H, k, d_k)`` and values ``(H, k, d_v)``, nothing per
event (the event counter that indexes ``E`` is the state's ``next_position``, kept for every scheme).

Knob: ``rows`` ``k``; None = ``max(1, round(memory_ratio x max_len))``. The state is constant in the history length
``n``, so the rule takes Native's bytes at ``n_ref = max_len`` (the training window) as the reference: the
measured ratio ``k H (d_k + d_v) b / (n (H (d_k + d_v) b + 12))`` is about the target at ``n = max_len``, above it
for shorter histories and falls as histories grow.

Cost of a forward of ``T`` new tokens (the reference path masks, it does not skip): per layer and head, the
chunk's own projection ``T k (d_k + d_v)`` (masked to history tokens, so zero for candidates), reading the stored
projections ``T k (d_k + d_v)``, and the causal products over the chunk ``T^2 (d_k + d_v + 2k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.state import LayerView, StoredLayer, tensor_nbytes
from malloc.core.tokens import TokenBatch, split_heads
from malloc.memory.architecture import DTYPE_BYTES, ArchitectureScheme
from malloc.memory.complexity import Complexity
from malloc.memory.knobs import knob
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTULayer
from malloc.models.sasrec import SASRecLayer


@dataclass(frozen=True)
class ProjectionState:
    """One user's stored layer: the projections of every stored event.

    Attributes:
        keys: ``(H, k, d_k)`` ``sum_j E[:, pos_j] k_j^T`` per head; values: ``(H, k, d_v)`` ``sum_j F[:, pos_j] v_j^T``.
    """

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return tensor_nbytes(self.keys) + tensor_nbytes(self.values)

    def read(self) -> LayerView:
        raise TypeError("linformer: the stored layer holds projections of all events, not per-event keys and values")


@dataclass
class Projections:
    """Projections for a batch of users.

    Attributes:
        keys: ``(B, H, k, d_k)``; values: ``(B, H, k, d_v)``.
    """

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class ChunkBlock:
    """What a forward computes for its ``T`` new tokens.

    Attributes:
        keys: ``(B, H, T, d_k)``; values: ``(B, H, T, d_v)``.
        key_columns: ``(B, 1, T, k)`` ``E[:, pos_t]^T``; value_columns: ``(B, 1, T, k)`` ``F[:, pos_t]^T``.
        added: the projections of the chunk's history tokens (what an append adds to the state).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_columns: torch.Tensor
    value_columns: torch.Tensor
    added: Projections


class SequenceProjection(nn.Module):
    """The learned ``E`` and ``F`` ``(k, P)`` of one layer, indexed by absolute event position (clamped to
    ``P - 1``)."""

    def __init__(self, rows: int, max_len: int) -> None:
        super().__init__()
        # std 1/sqrt(P): a projection of P events has about the scale of one key
        self.keys = nn.Parameter(torch.randn(rows, max_len) / math.sqrt(max_len))
        self.values = nn.Parameter(torch.randn(rows, max_len) / math.sqrt(max_len))

    def block(self, k: torch.Tensor, v: torch.Tensor, tokens: TokenBatch) -> ChunkBlock:
        """New keys ``(B, H, T, d_k)`` and values ``(B, H, T, d_v)`` -> the chunk's block."""
        index = tokens.positions.clamp(0, self.keys.shape[1] - 1)
        key_columns, value_columns = self.keys.T[index][:, None], self.values.T[index][:, None]  # (B, 1, T, k)
        history = tokens.is_history[:, None, :, None].to(k.dtype)  # (B, 1, T, 1)
        added = Projections((key_columns * history).transpose(-1, -2) @ k,
                            (value_columns * history).transpose(-1, -2) @ v)
        return ChunkBlock(k, v, key_columns, value_columns, added)


def history_mask(tokens: TokenBatch, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, T, T)`` ``M_ij = 1`` iff token ``j`` is history and ``pos_j < pos_i`` (never the diagonal)."""
    earlier = tokens.positions[:, None, None, :] < tokens.positions[:, None, :, None]
    return (tokens.is_history[:, None, None, :] & earlier).to(dtype)


def projected_scores(q: torch.Tensor, block: ChunkBlock, mask: torch.Tensor, cache: Projections | None
                     ) -> torch.Tensor:
    """``q_i . K~_i`` for every query: ``(B, H, T, d_k)`` -> ``(B, H, T, k)``; ``K~_i`` holds the stored events and
    the chunk's history tokens visible to ``i``."""
    scores = ((q @ block.keys.transpose(-1, -2)) * mask) @ block.key_columns
    return scores if cache is None else scores + q @ cache.keys.to(q.dtype).transpose(-1, -2)


def projected_read(weights: torch.Tensor, block: ChunkBlock, mask: torch.Tensor, cache: Projections | None
                   ) -> torch.Tensor:
    """``sum_r weights_ir V~_i,r``: ``(B, H, T, k)`` -> ``(B, H, T, d_v)``."""
    read = ((weights @ block.value_columns.transpose(-1, -2)) * mask) @ block.values
    return read if cache is None else read + weights @ cache.values.to(weights.dtype)


def self_dot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q_i . k_i`` ``(B, H, T, 1)`` (element-wise: not a matrix product)."""
    return (q * k).sum(dim=-1, keepdim=True)


class ProjectionHooks:
    """State hooks shared by both backbones' Linformer layers (a mixin before the backbone layer)."""

    heads: int
    key_dim: int
    value_dim: int
    rows: int
    projection: SequenceProjection
    plain_kv = False

    def empty_state(self, dtype: torch.dtype, device: torch.device) -> ProjectionState:
        return ProjectionState(torch.zeros(self.heads, self.rows, self.key_dim, dtype=dtype, device=device),
                               torch.zeros(self.heads, self.rows, self.value_dim, dtype=dtype, device=device))

    def collate(self, stored: list[StoredLayer], dtype: torch.dtype) -> Projections:
        assert all(isinstance(s, ProjectionState) for s in stored)
        return Projections(torch.stack([s.keys for s in stored]).to(dtype),  # type: ignore[attr-defined]
                           torch.stack([s.values for s in stored]).to(dtype))  # type: ignore[attr-defined]

    def new_state(self, new: ChunkBlock, tokens: TokenBatch, user: int, count: int, dtype: torch.dtype
                  ) -> ProjectionState:
        return ProjectionState(new.added.keys[user].to(dtype), new.added.values[user].to(dtype))

    def store(self, stored: StoredLayer, new: StoredLayer) -> ProjectionState:
        """The projections are sums over events: appending adds the new events' terms."""
        assert isinstance(stored, ProjectionState) and isinstance(new, ProjectionState)
        return ProjectionState(stored.keys + new.keys, stored.values + new.values)


class HSTULinformerLayer(ProjectionHooks, HSTULayer):
    def __init__(self, cfg: ModelConfig, rows: int) -> None:
        super().__init__(cfg)
        self.rows = rows
        self.projection = SequenceProjection(rows, cfg.max_len)

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, ChunkBlock]:
        u, v, q, k = F.silu(self.uvqk(h)).split(self.split, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        return u, q, self.projection.block(k, v, tokens)

    def attend(self, q: torch.Tensor, tokens: TokenBatch, cache: Projections | None, new: ChunkBlock,
               need_weights: bool) -> tuple[torch.Tensor, None]:
        batch, _, length, _ = q.shape
        mask = history_mask(tokens, q.dtype)
        weights = F.silu(self.alpha * projected_scores(q, new, mask, cache)) / self.normaliser
        self_bias = self.bias.position_bias[0] + self.bias.time_bias[0]  # rab at distance 0 and time 0
        self_weight = F.silu(self.alpha * self_dot(q, new.keys) + self_bias) / self.normaliser
        attended = projected_read(weights, new, mask, cache) + self_weight * new.values
        return attended.transpose(1, 2).reshape(batch, length, -1), None


class SASRecLinformerLayer(ProjectionHooks, SASRecLayer):
    def __init__(self, cfg: ModelConfig, rows: int) -> None:
        super().__init__(cfg)
        self.rows = rows
        self.projection = SequenceProjection(rows, cfg.max_len)

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, ChunkBlock]:
        q, k, v = self.qkv(h).split(self.split, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        return q, self.projection.block(k, v, tokens)

    def attend(self, q: torch.Tensor, tokens: TokenBatch, cache: Projections | None, new: ChunkBlock,
               need_weights: bool) -> tuple[torch.Tensor, None]:
        batch, _, length, _ = q.shape
        scale = 1.0 / math.sqrt(q.shape[-1])
        mask = history_mask(tokens, q.dtype)
        logits = torch.cat([projected_scores(q, new, mask, cache), self_dot(q, new.keys)], dim=-1) * scale
        probs = torch.softmax(logits, dim=-1)  # (B, H, T, k + 1): the projected rows, then the self key
        attended = projected_read(probs[..., :-1], new, mask, cache) + probs[..., -1:] * new.values
        return attended.transpose(1, 2).reshape(batch, length, -1), None


@dataclass(frozen=True)
class Linformer(ArchitectureScheme):
    """Causal Linformer with exact incremental projections.

    Attributes:
        rows: projected rows ``k`` per layer and head; None = from the ratio: ``max(1, round(memory_ratio x
            max_len))`` (the state is constant in ``n``; see the module docstring).
    """

    rows: int | None = knob(None, int, low=1, optional=True)

    name: ClassVar[str] = "linformer"
    granularity: ClassVar[str] = "sequence"
    summary: ClassVar[str] = "k learned projections of all past keys/values along the sequence (k = ratio x max_len)"
    complexity: ClassVar[Complexity] = Complexity("2 L k d b (+ a length counter)",
                                                  "L (t + c) [d^2 + 2 k d] + 2 L t k d (update)", "k = mr n_max")

    def num_rows(self, cfg: ModelConfig) -> int:
        return self.rows if self.rows is not None else max(1, round(self.memory_ratio * cfg.max_len))

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        layer = HSTULinformerLayer if cfg.backbone == "hstu" else SASRecLinformerLayer
        return layer(cfg, self.num_rows(cfg))

    def knob_values(self, cfg: ModelConfig) -> dict[str, int]:
        return {"rows": self.num_rows(cfg)}

    def state_bytes(self, cfg: ModelConfig, history_len: int) -> int:
        """``L H k (d_k + d_v) b``, whatever the history length."""
        return cfg.layers * cfg.heads * self.num_rows(cfg) * 2 * cfg.head_dim * DTYPE_BYTES[cfg.state_dtype]

    def stored_keys(self, cfg: ModelConfig, history_len: int) -> float:
        """A query reads ``k`` projected rows, whatever the history length."""
        return float(self.num_rows(cfg))

    def attention_macs(self, cfg: ModelConfig, queries: float, keys: float) -> float:
        """A forward of ``T = queries`` tokens: per layer and head ``T (2 k (d_k + d_v) + T (d_k + d_v + 2 k))``
        (the chunk's projection, the read of the stored one, the causal products over the chunk; see the module
        docstring). It reads ``k`` rows and the chunk whatever the history, so ``keys`` is not used."""
        rows, width = self.num_rows(cfg), 2 * cfg.head_dim
        return cfg.layers * cfg.heads * queries * (2 * rows * width + queries * (width + 2 * rows))
