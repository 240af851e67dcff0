"""SASRec: self-attentive sequential recommendation (Kang and McAuley, ICDM 2018, arXiv 1808.09781).

Pre-LN blocks: ``x = x + MHA(LN(x))``, ``x = x + FFN(LN(x))`` with causal softmax attention over
``q k^T / sqrt(d_k)``; keys and values are projections of ``LN(x)`` and are what the state stores.

Positions. The original model right-aligns sequences, so the newest event always has the last position; every
cached key would change at each new event. Here positions count from the first stored event (``0, 1, 2, ...``),
so an appended event takes the next position and every stored key stays valid. The learned table has
``max_len`` rows (the training window); later positions share the last row (training never sees them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.tokens import KVBlock, TokenBatch, concat_keys, group_mean, split_heads, to_query_heads, visibility
from malloc.models.base import AttentionLayer, Dropout, LayerScheme, SequentialRecommender
from malloc.models.config import ModelConfig


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      need_weights: bool = False, scale: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked softmax attention: the reference path when the weights are needed, else PyTorch's fused kernel.

    Args:
        q: ``(B, H, T, d_k)``; k: ``(B, H, S, d_k)``; v: ``(B, H, S, d_v)``; visible: ``(B, 1 or H, T, S)`` bool
            with at least one True per row.
        scale: logit multiplier (default ``1 / sqrt(d_k)``).
    Returns:
        outputs ``(B, H, T, d_v)`` and, if asked, probabilities ``(B, H, T, S)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not need_weights:  # fused path; tested equal to the reference below
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale), None
    logits = (q @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return probs @ v, probs


class SASRecLayer(AttentionLayer):
    """One SASRec block; ``kv_heads < heads`` shares each stored key/value head among query heads (GQA).

    As for HSTU, :meth:`project`, :meth:`visible` and :meth:`attend` are the pieces a scheme may replace.
    """

    def __init__(self, cfg: ModelConfig, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.kv_heads = cfg.heads if kv_heads is None else kv_heads
        self.key_dim = cfg.head_dim
        self.value_dim = cfg.head_dim
        width, kv_width = cfg.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.split = (width, kv_width, kv_width)  # q, k, v
        self.attention_norm = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, sum(self.split))
        self.output = nn.Linear(width, cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim), nn.GELU(), Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim))
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: TokenBatch, cache: KVBlock | None, need_weights: bool = False
                ) -> tuple[torch.Tensor, KVBlock, torch.Tensor | None]:
        q, new = self.project(self.attention_norm(x), tokens)
        attended, weights = self.attend(q, tokens, cache, new, need_weights)
        x = x + self.dropout(self.output(attended))
        return x + self.dropout(self.ffn(self.ffn_norm(x))), new, weights

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, KVBlock]:
        """``h (B, T, D)`` -> queries ``(B, H, T, d_k)`` and the new keys/values."""
        q, k, v = self.qkv(h).split(self.split, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        return q, KVBlock(k, v, tokens.positions[:, None], tokens.timestamps[:, None], tokens.is_history[:, None])

    def visible(self, tokens: TokenBatch, cache: KVBlock | None, keys: KVBlock) -> torch.Tensor:
        """Which of ``keys = [cache; new]`` each new token sees: ``(B, 1 or H, T, n + T)`` bool."""
        return visibility(tokens, cache)

    def attend(self, q: torch.Tensor, tokens: TokenBatch, cache: KVBlock | None, new: KVBlock,
               need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries ``(B, H, T, d_k)`` over ``[cache; new]`` -> ``(B, T, H d_v)`` and weights per stored head."""
        batch, _, length, _ = q.shape
        keys = concat_keys(cache, new)
        attended, weights = softmax_attention(
            q, to_query_heads(keys.keys.to(q.dtype), self.heads), to_query_heads(keys.values.to(q.dtype), self.heads),
            to_query_heads(self.visible(tokens, cache, keys), self.heads), need_weights)
        attended = attended.transpose(1, 2).reshape(batch, length, -1)
        return attended, None if weights is None else group_mean(weights, self.kv_heads)


class SASRec(SequentialRecommender):
    """SASRec backbone: scaled item embeddings + learned positions + action embeddings."""

    def __init__(self, cfg: ModelConfig, num_items: int, scheme: LayerScheme | None = None) -> None:
        super().__init__(cfg, num_items, scheme)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def build_layer(self) -> AttentionLayer:
        return SASRecLayer(self.cfg)
