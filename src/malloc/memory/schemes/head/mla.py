"""MLA: multi-head latent attention (DeepSeek-V2, arXiv 2405.04434).

Each event stores one latent ``c = W_DKV h`` of width ``d_c``, shared by all heads; head ``i`` reads keys
``c W_UK_i`` and values ``c W_UV_i``. The up-projections are absorbed, so attention runs in latent space and no
key or value is ever rebuilt: ``q_i . (c W_UK_i) = (q_i W_UK_i^T) . c`` and
``sum_j a_ij (c_j W_UV_i) = (sum_j a_ij c_j) W_UV_i``. Neither backbone uses RoPE, so there is no decoupled
positional key (``d_R = 0``); HSTU's relative bias is computed from the stored positions and timestamps as usual.

HSTU: ``u`` and ``q`` come from the usual projection (with SiLU), the latent is ``SiLU(W_DKV h)`` (HSTU's
``phi_1`` moved before the up-projections, which must stay linear to be absorbed). SASRec: ``c = W_DKV h``.

Stored per event and layer: ``d_c`` values plus a position and a timestamp (Native: ``H (d_k + d_v)``).
Attention costs ``2 d_c`` multiply-adds per (query head, key) instead of ``d_k + d_v``.

Training-free cache policies act on the stored latent (one stored head, as keys; the values have width 0):
evictions keep or drop whole latents, and the precision schemes (KIVI, IntactKV, INT8) quantize the latent as they
quantize keys, storing no codes and no scales for the empty values, so ``nbytes()`` stays their exact formula.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.state import LayerState, StoredLayer, collate_layers
from malloc.core.tokens import KVBlock, TokenBatch, concat_keys, group_mean, split_heads
from malloc.memory.architecture import ArchitectureScheme
from malloc.memory.complexity import Complexity
from malloc.memory.knobs import SchemeError, knob
from malloc.models import macs
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTULayer
from malloc.models.sasrec import SASRecLayer, softmax_attention


class LatentState:
    """State hooks shared by both backbones' MLA layers: the latent is stored once (as keys; values are empty)
    and read as both keys and values."""

    def collate(self, stored: list[StoredLayer], dtype: torch.dtype) -> KVBlock:
        block = collate_layers(stored, dtype)
        return replace(block, values=block.keys)

    def new_state(self, new: KVBlock, tokens: TokenBatch, user: int, count: int, dtype: torch.dtype
                  ) -> LayerState:
        latent = new.keys[user, :, :count].to(dtype)
        return LayerState(latent, latent.new_zeros(1, count, 0), tokens.positions[user, None, :count].to(torch.int32),
                          tokens.timestamps[user, None, :count])


def latent_block(latent: torch.Tensor, tokens: TokenBatch) -> KVBlock:
    """``(B, T, d_c)`` latents -> the new tokens' block (one shared head; keys and values are the latent)."""
    c = latent[:, None]
    return KVBlock(c, c, tokens.positions[:, None], tokens.timestamps[:, None], tokens.is_history[:, None])


class UpProjections(nn.Module):
    """Per-head up-projections ``W_UK (H, d_c, d_k)`` and ``W_UV (H, d_c, d_v)``, used absorbed."""

    def __init__(self, heads: int, latent_dim: int, head_dim: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(heads, latent_dim, head_dim) / latent_dim ** 0.5)
        self.values = nn.Parameter(torch.randn(heads, latent_dim, head_dim) / latent_dim ** 0.5)

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, d_k)`` -> latent-space queries ``(B, H, T, d_c)``."""
        return torch.einsum("bhtd,hcd->bhtc", q, self.keys)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, d_c)`` attended latents -> ``(B, T, H d_v)``."""
        out = torch.einsum("bhtc,hcd->bhtd", attended, self.values)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class HSTUMLALayer(LatentState, HSTULayer):
    new_keys_follow_tokens = True  # latent_block: the tokens' positions, times and validity

    def __init__(self, cfg: ModelConfig, latent_dim: int) -> None:
        super().__init__(cfg)
        width = cfg.heads * cfg.head_dim
        self.kv_heads, self.key_dim, self.value_dim = 1, latent_dim, 0
        self.uvqk = nn.Linear(cfg.dim, 2 * width)  # u and q only
        self.latent = nn.Linear(cfg.dim, latent_dim)
        self.up = UpProjections(cfg.heads, latent_dim, cfg.head_dim)

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, KVBlock]:
        u, q = F.silu(self.uvqk(h)).chunk(2, dim=-1)
        return u, split_heads(q, self.heads), latent_block(F.silu(self.latent(h)), tokens)

    def attend(self, q: torch.Tensor, tokens: TokenBatch, cache: KVBlock | None, new: KVBlock,
               need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """HSTU's attention of the latent-space queries over the latents (one shared head, read as keys and as
        values: the C kernel where it applies, else tiles), then the absorbed value up-projection."""
        attended, weights = super().attend(self.up.query(q), tokens, cache, new, need_weights)  # (B, T, H d_c)
        batch, length, _ = attended.shape
        return self.up.output(attended.view(batch, length, self.heads, -1).transpose(1, 2)), weights


class SASRecMLALayer(LatentState, SASRecLayer):
    def __init__(self, cfg: ModelConfig, latent_dim: int) -> None:
        super().__init__(cfg)
        self.kv_heads, self.key_dim, self.value_dim = 1, latent_dim, 0
        self.qkv = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim)  # queries only
        self.latent = nn.Linear(cfg.dim, latent_dim)
        self.up = UpProjections(cfg.heads, latent_dim, cfg.head_dim)

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, KVBlock]:
        return split_heads(self.qkv(h), self.heads), latent_block(self.latent(h), tokens)

    def attend(self, q: torch.Tensor, tokens: TokenBatch, cache: KVBlock | None, new: KVBlock,
               need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = concat_keys(cache, new)
        latent = keys.keys.to(q.dtype).expand(-1, self.heads, -1, -1)
        attended, weights = softmax_attention(self.up.query(q), latent, latent, self.visible(tokens, cache, keys),
                                              need_weights, scale=q.shape[-1] ** -0.5)
        return self.up.output(attended), None if weights is None else group_mean(weights, 1)


@dataclass(frozen=True)
class MLA(ArchitectureScheme):
    """Multi-head latent attention.

    Attributes:
        latent_dim: stored latent width ``d_c``; None = from the ratio: ``round(memory_ratio * H (d_k + d_v))``
            (at least 1). At most ``H (d_k + d_v)``, checked against the model in :meth:`knob_values`.
    """

    latent_dim: int | None = knob(None, int, low=1, optional=True)

    name: ClassVar[str] = "mla"
    granularity: ClassVar[str] = "head"
    summary: ClassVar[str] = "one shared latent per event, up-projected (absorbed) per head when read"
    complexity: ClassVar[Complexity] = Complexity("L n d_c b", "L (t + c) [d^2 + 2 H (n + t) d_c]", "d_c = mr 2 d")

    def latent(self, cfg: ModelConfig) -> int:
        if self.latent_dim is not None:
            return self.latent_dim
        return max(1, round(self.memory_ratio * cfg.heads * 2 * cfg.head_dim))

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        layer = HSTUMLALayer if cfg.backbone == "hstu" else SASRecMLALayer
        return layer(cfg, self.latent(cfg))

    def knob_values(self, cfg: ModelConfig) -> dict[str, int]:
        latent, native = self.latent(cfg), cfg.heads * 2 * cfg.head_dim
        if latent > native:
            raise SchemeError(f"mla: knob latent_dim must be at most H (d_k + d_v) = {native} (a wider latent stores "
                              f"more than Native), got {latent}")
        return {"latent_dim": latent}

    def token_macs(self, cfg: ModelConfig) -> float:
        """The K and V projections become ``D d_c`` (the latent), plus the absorbed query and output maps
        ``H d_k d_c + H d_c d_v``."""
        width, latent = cfg.heads * cfg.head_dim, self.latent(cfg)
        per_layer = cfg.dim * latent + 2 * width * latent - 2 * width * cfg.dim
        return macs.token_macs(cfg) + cfg.layers * per_layer

    def attention_macs(self, cfg: ModelConfig, queries: float, keys: float) -> float:
        return cfg.layers * cfg.heads * queries * keys * 2 * self.latent(cfg)
