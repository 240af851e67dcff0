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

from malloc.models.base import AttentionLayer, SequentialRecommender
from malloc.models.config import ModelConfig
from malloc.tokens import KVBlock, TokenBatch, concat_keys, visibility


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked softmax attention: the reference path when the weights are needed, else PyTorch's fused kernel.

    Args:
        q: ``(B, H, T, d_k)``; k: ``(B, H, S, d_k)``; v: ``(B, H, S, d_v)``; visible: ``(B, 1 or H, T, S)`` bool
            with at least one True per row.
    Returns:
        outputs ``(B, H, T, d_v)`` and, if asked, probabilities ``(B, H, T, S)``.
    """
    if not need_weights:  # fused path; tested equal to the reference below
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible), None
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return probs @ v, probs


class SASRecLayer(AttentionLayer):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.key_dim = cfg.head_dim
        self.value_dim = cfg.head_dim
        width = cfg.heads * cfg.head_dim
        self.attention_norm = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * width)
        self.output = nn.Linear(width, cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: TokenBatch, cache: KVBlock | None, need_weights: bool = False
                ) -> tuple[torch.Tensor, KVBlock, torch.Tensor | None]:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        new = KVBlock(k, v, tokens.positions[:, None], tokens.timestamps[:, None], tokens.is_history[:, None])
        keys = concat_keys(cache, new)
        visible = visibility(tokens, cache)
        attended, weights = softmax_attention(q, keys.keys.to(q.dtype), keys.values.to(q.dtype), visible,
                                              need_weights)
        x = x + self.dropout(self.output(attended.transpose(1, 2).reshape(batch, length, -1)))
        return x + self.dropout(self.ffn(self.ffn_norm(x))), new, weights


class SASRec(SequentialRecommender):
    """SASRec backbone: scaled item embeddings + learned positions + action embeddings."""

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(cfg, num_items)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def build_layer(self) -> AttentionLayer:
        return SASRecLayer(self.cfg)

    def embed(self, tokens: TokenBatch) -> torch.Tensor:
        positions = tokens.positions.clamp(0, self.cfg.max_len - 1)
        return (self.item_embedding(tokens.items) * math.sqrt(self.cfg.dim)
                + self.position_embedding(positions) + self.action_embedding(tokens.actions))

