"""Reformer: LSH attention with shared QK (Kitaev, Kaiser, Levskaya, ICLR 2020, arXiv 2001.04451).

Trained with the scheme. Shared QK: each head's key is its L2-normalised query, ``k_j = q_j / ||q_j||`` (the
paper; queries stay unnormalised), so the layer has no key projection. Hashing by random rotations: with fixed
rotations ``R (d_k, b/2)`` per layer, head and round, ``h(x) = argmax([x R; -x R])`` in ``b`` buckets; a query
attends to the keys it may see under the mask rule of ``malloc.core.tokens`` that share its bucket in at least one of
the ``n_hashes`` rounds, plus itself. HSTU: ``a_ij = SiLU(alpha q_i . k_j + rab_ij) / N`` on that set and 0
elsewhere (out-of-bucket events contribute nothing); SASRec: softmax over that set.

Mask form. The attention set is defined by masking, not by the paper's sort-by-bucket and chunking: this is the
paper's unchunked multi-round LSH attention (each key counted once however many rounds share it), with the same
attention set; sorting and chunking are an efficiency device (they would also drop same-bucket keys that land
outside a query's chunk and its predecessor). The hash is scale-invariant, so a token's query and key share their
codes: the codes are computed once per read from the keys (cached and new), and a query takes its own key's codes.
Candidates are hashed with the same per-layer rotations as the history. A key within float rounding of a bucket
boundary may hash differently in two computations of it (a bf16 state rounds keys): the read hashes the key as
stored, which at fp32 matches training except at such near-ties. The paper also masks a token's attention
to itself (it would dominate under shared QK); here a token always sees itself, as the repository's mask rule says
(every row must have a key; a candidate sees only the history and itself).

Rotations are a buffer ``(H, n_hashes, d_k, b/2)`` per layer, drawn at construction from torch's generator (so
seeded by the run's seed like the weights), saved in the state dict and never trained.

Stored per layer: the same :class:`LayerState` as Native: keys (the normalised queries) ``(H, n, d_k)``, values
``(H, n, d_v)``, positions ``(1, n)`` int32, timestamps ``(1, n)`` int64. Hash codes are not stored: each read
recomputes them from the stored keys (``H n_hashes d_k b/2`` MACs per stored key per read, counted in
:meth:`Reformer.attention_macs`), so the state has exactly Native's bytes. Reformer saves compute and bandwidth at
read time in a sparse implementation, not memory: ``memory_ratio`` cannot be reached and is ignored (the measured
ratio reports 1). The reference path computes every ``q k`` and ``a v`` product and masks, so its attention MACs
are Native's; the hashing MACs are added, and shared QK removes the key projection.

``plain_kv`` stays True: the state is Native's per-event keys and values, kept in full on append, so the
training-free policies compose with it (Reformer + KIVI or + an eviction policy is the only way it stores less);
a compressed key is hashed as it is read back.

Knobs (not ratio-dependent): ``n_hashes`` (default 2, 1..64) and ``buckets`` (default 8, even, 2..1024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.tokens import KVBlock, TokenBatch, split_heads
from malloc.memory.architecture import ArchitectureScheme
from malloc.memory.complexity import NATIVE_REQUEST, Complexity
from malloc.memory.knobs import knob
from malloc.models import macs
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTULayer
from malloc.models.sasrec import SASRecLayer

MAX_HASHES, MAX_BUCKETS = 64, 1024  # the paper uses 1-8 rounds; far above, hashing alone exhausts memory


class RandomRotationHash(nn.Module):
    """Random-rotation LSH with fixed rotations ``(H, n_hashes, d_k, buckets / 2)`` (a buffer, not trained)."""

    def __init__(self, heads: int, n_hashes: int, dim: int, buckets: int) -> None:
        super().__init__()
        self.register_buffer("rotations", torch.randn(heads, n_hashes, dim, buckets // 2))

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys (B, H, S, d_k)`` -> bucket codes ``(B, H, S, n_hashes)`` int64 in ``[0, buckets)``."""
        rotated = torch.einsum("bhsd,hrdc->bhsrc", keys, self.rotations.to(keys.dtype))
        return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def bucket_visible(visible: torch.Tensor, codes: torch.Tensor, length: int) -> torch.Tensor:
    """Restrict a mask to keys sharing a bucket with the query in at least one round.

    Args:
        visible: ``(B, 1 or H, T, S)`` bool, the mask rule over keys ``[cache; new]``.
        codes: ``(B, H, S, R)`` codes of the keys; the last ``T`` keys are the queries' own (shared QK), so a
            query always shares its own key's buckets and keeps itself.
        length: ``T``.
    Returns:
        ``(B, H, T, S)`` bool.
    """
    query_codes = codes[:, :, codes.shape[2] - length:]  # (B, H, T, R)
    same = torch.zeros(1, dtype=torch.bool, device=codes.device)
    for r in range(codes.shape[3]):  # a loop over rounds: no (B, H, T, S, R) tensor
        same = same | (query_codes[:, :, :, None, r] == codes[:, :, None, :, r])
    return visible & same


def shared_qk_block(q: torch.Tensor, v: torch.Tensor, tokens: TokenBatch) -> KVBlock:
    """Queries ``(B, H, T, d_k)`` and values -> the new tokens' block, keys the normalised queries."""
    return KVBlock(F.normalize(q, dim=-1), v, tokens.positions[:, None], tokens.timestamps[:, None],
                   tokens.is_history[:, None])


class BucketMask:
    """The LSH restriction of the mask, shared by both backbones' layers (a mixin before the backbone layer)."""

    hash: RandomRotationHash

    def visible(self, tokens: TokenBatch, cache: KVBlock | None, keys: KVBlock) -> torch.Tensor:
        """The mask rule restricted to keys sharing a bucket with the query: ``(B, H, T, n + T)`` bool."""
        codes = self.hash(keys.keys.to(self.hash.rotations.dtype))
        return bucket_visible(super().visible(tokens, cache, keys), codes, tokens.shape[1])


class HSTUReformerLayer(BucketMask, HSTULayer):
    def __init__(self, cfg: ModelConfig, n_hashes: int, buckets: int) -> None:
        super().__init__(cfg)
        width = cfg.heads * cfg.head_dim
        self.split = (width, width, width)  # u, v, q (shared QK: no key projection)
        self.uvqk = nn.Linear(cfg.dim, 3 * width)
        self.hash = RandomRotationHash(cfg.heads, n_hashes, cfg.head_dim, buckets)

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, KVBlock]:
        u, v, q = F.silu(self.uvqk(h)).split(self.split, dim=-1)
        q = split_heads(q, self.heads)
        return u, q, shared_qk_block(q, split_heads(v, self.heads), tokens)


class SASRecReformerLayer(BucketMask, SASRecLayer):
    def __init__(self, cfg: ModelConfig, n_hashes: int, buckets: int) -> None:
        super().__init__(cfg)
        width = cfg.heads * cfg.head_dim
        self.split = (width, width)  # q, v (shared QK: no key projection)
        self.qkv = nn.Linear(cfg.dim, 2 * width)
        self.hash = RandomRotationHash(cfg.heads, n_hashes, cfg.head_dim, buckets)

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, KVBlock]:
        q, v = self.qkv(h).split(self.split, dim=-1)
        q = split_heads(q, self.heads)
        return q, shared_qk_block(q, split_heads(v, self.heads), tokens)


@dataclass(frozen=True)
class Reformer(ArchitectureScheme):
    """LSH attention with shared QK; stores what Native stores (``memory_ratio`` is ignored: ratio 1).

    Attributes:
        n_hashes: hashing rounds (>= 1); a query sees the keys sharing its bucket in any round.
        buckets: buckets per round (even, >= 2; the rotations have ``buckets / 2`` columns).
    """

    n_hashes: int = knob(2, int, low=1, high=MAX_HASHES)
    buckets: int = knob(8, int, low=2, high=MAX_BUCKETS, even=True)

    name: ClassVar[str] = "reformer"
    granularity: ClassVar[str] = "sequence"
    summary: ClassVar[str] = "LSH attention, shared QK, n_hashes rounds (stores every key: ratio 1)"
    complexity: ClassVar[Complexity] = Complexity("2 L n d b (ratio 1)",
                                                  NATIVE_REQUEST + " + L H r (n + t) d_h b_k / 2 (hashing)",
                                                  "none (n_hashes r, buckets b_k: compute only)")
    ratio_knob: ClassVar[bool] = False

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        layer = HSTUReformerLayer if cfg.backbone == "hstu" else SASRecReformerLayer
        return layer(cfg, self.n_hashes, self.buckets)

    def hash_macs(self, cfg: ModelConfig) -> int:
        """MACs of hashing one key in all layers, heads and rounds: ``L H n_hashes d_k b/2``."""
        return cfg.layers * cfg.heads * self.n_hashes * cfg.head_dim * (self.buckets // 2)

    def token_macs(self, cfg: ModelConfig) -> float:
        """The backbone's, less the key projection ``D H d_k`` (shared QK), plus hashing the token's key."""
        return macs.token_macs(cfg) - cfg.layers * cfg.dim * cfg.heads * cfg.head_dim + self.hash_macs(cfg)

    def attention_macs(self, cfg: ModelConfig, queries: float, keys: float) -> float:
        """Native's (the reference computes every product and masks), plus re-hashing the ``keys - queries``
        stored keys that the read takes from the state (the new tokens' hashing is in :meth:`token_macs`)."""
        return macs.attention_macs(cfg, queries, keys) + (keys - queries) * self.hash_macs(cfg)
