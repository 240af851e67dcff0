"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., ICML 2024, arXiv 2402.17152).

One layer, for new tokens ``x (B, T, D)`` against cached history keys:

    u, v, q, k = split(SiLU(f1(LayerNorm(x))))             # the paper's phi1 = SiLU on all four
    a_ij = SiLU(alpha q_i . k_j + rab(p_i - p_j, t_i - t_j)) / N   on visible (i, j), else 0
    o_i  = sum_j a_ij v_j
    y    = x + Dropout(f2(LayerNorm(o) * u))                # U-gating, no feed-forward block

``alpha = 1/sqrt(d_k)``; ``N = max_len`` is a constant normaliser, so a stored key's contribution never changes
when events are appended; ``rab`` is a learned bias on log-bucketed relative position and relative time, shared
across heads (one table per layer). Only ``k`` and ``v`` are stored; ``u`` and ``q`` are recomputed for new
tokens.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.state import StoredLayer, as_dtype, collate_rows
from malloc.core.tokens import (
    KVBlock,
    KVRows,
    TokenBatch,
    as_block,
    concat_keys,
    group_mean,
    split_heads,
    to_query_heads,
    visibility,
)
from malloc.kernels import hstu as kernel
from malloc.models.base import AttentionLayer, Dropout, LayerScheme, SequentialRecommender
from malloc.models.config import ModelConfig

# the bias of a masked (query, key) pair in the fused kernel: SiLU(-1e4 + s) is exactly 0 for any attainable score s
MASKED = -1.0e4
# (query, key) pairs of one attention tile per batch row: bounds the (T, S) bias, mask and scores held at once
TILE_PAIRS = 1 << 20


def log_bucket(values: torch.Tensor, scale: float, num_buckets: int) -> torch.Tensor:
    """Bucketise non-negative distances: ``floor(scale * log2(1 + |x|))``, clamped to ``num_buckets - 1``."""
    # in place on one float copy (the same operations, in the same order, as scale * log2(1 + |x|))
    buckets = values.to(torch.float32, copy=True).abs_().add_(1.0).log2_().mul_(scale).clamp_(0, num_buckets - 1)
    return buckets.long()  # truncation is floor for non-negative values


def bucket_thresholds(scale: float, num_buckets: int) -> torch.Tensor:
    """``(num_buckets,)`` int64: the least integer distance of each :func:`log_bucket` bucket (a binary search on
    the function itself), so that ``bucket(d)`` is the largest ``c`` with ``thresholds[c] <= d``; a bucket no
    distance below 2^62 reaches gets 2^62."""
    target = torch.arange(num_buckets)
    low, high = torch.zeros(num_buckets, dtype=torch.int64), torch.full((num_buckets,), 1 << 62)
    while bool((low < high).any()):
        middle = (low + high) // 2
        reached = log_bucket(middle, scale, num_buckets) >= target
        high, low = torch.where(reached, middle, high), torch.where(reached, low, middle + 1)
    return low


# the longest table of position buckets by integer distance (entries); past it, buckets are computed
POSITION_TABLE_MAX = 1 << 20
# the most (position, time) bucket pairs read from one joint table; past it, the two tables are read apart
JOINT_TABLE_MAX = 1 << 16


class RelativeBias(nn.Module):
    """Learned bias on relative position (4 buckets per octave) and relative time (2 buckets per octave).

    Position distances are integers, so their buckets are read from a table of every distance up to the one where
    the last bucket starts (55,109 entries for 64 buckets), built with :func:`log_bucket` itself: the same buckets
    as computing them, in one gather instead of a logarithm per (query, key) pair. Time distances are not bounded
    that way and are bucketed as they come. A (query, key) pair's bias ``position_bias[p] + time_bias[t]`` is then
    read with one gather from the joint table of every such sum, at index ``p * time_buckets + t`` (the same float
    addition, so the same values; the index is what other layers reuse), unless the joint table would pass
    :data:`JOINT_TABLE_MAX` entries.
    """

    POSITION_SCALE = 4  # buckets per octave of distance
    TIME_SCALE = 2

    def __init__(self, pos_buckets: int, time_buckets: int) -> None:
        super().__init__()
        self.pos_buckets = pos_buckets
        self.time_buckets = time_buckets
        self.position_bias = nn.Parameter(torch.zeros(pos_buckets))
        self.time_bias = nn.Parameter(torch.zeros(time_buckets))
        self.joint = pos_buckets * time_buckets <= JOINT_TABLE_MAX
        # log_bucket(d) == pos_buckets - 1 from here on
        saturated = math.ceil(2.0 ** ((pos_buckets - 1) / self.POSITION_SCALE))
        table = (log_bucket(torch.arange(saturated + 1), self.POSITION_SCALE, pos_buckets)
                 if saturated < POSITION_TABLE_MAX else None)
        self.position_table: torch.Tensor | None
        self.register_buffer("position_table", table, persistent=False)
        # the C kernel reads buckets from their thresholds
        self.register_buffer("position_thresholds", bucket_thresholds(self.POSITION_SCALE, pos_buckets),
                             persistent=False)
        self.register_buffer("time_thresholds", bucket_thresholds(self.TIME_SCALE, time_buckets), persistent=False)

    def tables(self) -> kernel.BucketTables:
        """This bias as the C kernel reads it."""
        return kernel.BucketTables(self.position_bias, self.position_thresholds, self.POSITION_SCALE,
                                   self.time_bias, self.time_thresholds, self.TIME_SCALE)

    def position_buckets(self, distances: torch.Tensor) -> torch.Tensor:
        """``log_bucket(distances, 4, pos_buckets)`` of int64 ``distances`` (a table read where there is a table)."""
        table = self.position_table
        if table is None:
            return log_bucket(distances, self.POSITION_SCALE, self.pos_buckets)
        return torch.take(table, distances.abs_().clamp_(max=table.shape[0] - 1))

    def buckets(self, q_pos: torch.Tensor, q_time: torch.Tensor, k_pos: torch.Tensor, k_time: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """The bucket indices of every (query, key) pair, each ``(B, 1 or H, T, S)`` int64: the joint index
        ``(p * time_buckets + t,)``, or ``(p, t)`` without a joint table."""
        pos = self.position_buckets(q_pos[:, None, :, None] - k_pos[:, :, None, :])
        time = log_bucket(q_time[:, None, :, None] - k_time[:, :, None, :], self.TIME_SCALE, self.time_buckets)
        return (pos.mul_(self.time_buckets).add_(time),) if self.joint else (pos, time)

    def forward(self, q_pos: torch.Tensor, q_time: torch.Tensor, k_pos: torch.Tensor, k_time: torch.Tensor,
                memo: dict | None = None) -> torch.Tensor:
        """``q_* (B, T)``, ``k_* (B, 1 or H, S)`` -> bias ``(B, 1 or H, T, S)``.

        Queries in runs of equal (position, time) in every batch row (a request's candidates: one position, one
        time) share one row of buckets, computed once (:func:`repeated_queries`) and copied to the run's rows.

        ``memo``: where the bucket indices are kept for the other layers of one forward (they depend on positions
        and times only; every layer has its own tables), or None.
        """
        inputs = (q_pos, q_time, k_pos, k_time)
        kept = None if memo is None else memo.get("buckets")
        if kept is not None and kept[2] == (self.pos_buckets, self.time_buckets) and all(
                a is b or (a.shape == b.shape and torch.equal(a, b)) for a, b in zip(kept[0], inputs, strict=True)):
            index, runs = kept[1], kept[3]
        else:
            runs = repeated_queries(q_pos, q_time)
            firsts = (q_pos, q_time) if runs is None else (q_pos[:, runs[0]], q_time[:, runs[0]])
            index = self.buckets(*firsts, k_pos, k_time)
            if memo is not None:
                memo["buckets"] = inputs, index, (self.pos_buckets, self.time_buckets), runs
        # one index_select from the joint table: 2.5-5x faster than two torch.take, which are 1.5-2x faster than
        # plain indexing (benchmarks/attention_tiles.py --gathers); the values are the same
        shape = index[0].shape
        if self.joint:
            table = (self.position_bias[:, None] + self.time_bias[None, :]).reshape(-1)
            bias = table.index_select(0, index[0].reshape(-1)).view(shape)
        else:
            pos, time = index
            bias = (self.position_bias.index_select(0, pos.reshape(-1))
                    + self.time_bias.index_select(0, time.reshape(-1))).view(shape)
        return bias if runs is None else bias.index_select(2, runs[1])


def repeated_queries(q_pos: torch.Tensor, q_time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Runs of consecutive queries whose (position, time) are equal in every batch row, or None if there are none.

    Args:
        q_pos, q_time: ``(B, T)``.
    Returns:
        ``(firsts (U,), run (T,))`` int64: the first query of each of the ``U`` runs, and the run of each query
        (``q_pos[:, firsts[run]] == q_pos``, the same for times); None when no query repeats the one before it.
    """
    if q_pos.shape[1] < 2:
        return None
    repeats = ((q_pos[:, 1:] == q_pos[:, :-1]) & (q_time[:, 1:] == q_time[:, :-1])).all(dim=0)  # (T - 1,)
    if not bool(repeats.any()):
        return None
    starts = torch.cat([repeats.new_ones(1), ~repeats])
    return starts.nonzero().flatten(), starts.cumsum(0) - 1


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                   visible: torch.Tensor, alpha: float, normaliser: float, key_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference pointwise attention.

    Args:
        q: ``(B, H, T, d_k)``; k: ``(B, H, S, d_k)``; v: ``(B, H, S, d_v)``.
        bias: ``(B, 1 or H, T, S)``; visible: ``(B, 1 or H, T, S)`` bool.
        key_scale: ``(B, 1, 1, S)`` per-key multiplier of the weights, or None.
    Returns:
        outputs ``(B, H, T, d_v)`` and weights ``a_ij`` ``(B, H, T, S)`` (0 where not visible).
    """
    weights = F.silu(alpha * (q @ k.transpose(-1, -2)) + bias) / normaliser
    weights = torch.where(visible, weights, torch.zeros_like(weights))
    if key_scale is not None:
        weights = weights * key_scale
    return weights @ v, weights


def hstu_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         visible: torch.Tensor, alpha: float, normaliser: float,
                         key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`hstu_attention`'s outputs (not its weights) in fewer passes over the ``(T, S)`` scores.

    The mask enters as a bias of :data:`MASKED` (``SiLU`` of it is exactly 0 in float32 and float64), added once per
    head group; ``alpha`` scales the queries and ``1 / N`` the outputs, and a per-key scale multiplies the values,
    instead of each multiplying the ``(T, S)`` weights. Equal to the reference up to rounding (tested to 1e-5).

    Args: as :func:`hstu_attention`. Returns: outputs ``(B, H, T, d_v)``.
    """
    masked = bias.masked_fill(~visible, MASKED)
    if key_scale is not None:  # (B, 1, 1, S) per key -> (B, 1, S, 1) per value row
        v = v * key_scale.transpose(-1, -2)
    scores = torch.matmul(q * alpha, k.transpose(-1, -2))
    scores += masked  # in place: one (H, T, S) tensor per tile, not three (matmul's input needs no copy of it)
    weights = F.silu(scores, inplace=not torch.is_grad_enabled())  # SiLU's backward needs its input
    return torch.matmul(weights, v) / normaliser


def stored_scale(cache: KVBlock | None, keys: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, 1, 1, keys)`` multiplier of the weights: the cache's ``scale`` on stored keys, 1 on new ones; None
    when the cache has no scale (the original normaliser)."""
    if cache is None or cache.scale is None:
        return None
    scale = torch.ones(cache.keys.shape[0], 1, 1, keys, dtype=dtype, device=cache.keys.device)
    scale[:, :, :, : cache.keys.shape[2]] = cache.scale[:, :, None, None]
    return scale


class HSTULayer(AttentionLayer):
    """One HSTU layer; ``kv_heads < heads`` shares each stored key/value head among a group of query heads (GQA).

    The pieces are methods so that architecture schemes can replace one of them: :meth:`project` (what the new
    tokens produce), :meth:`visible` (the mask) and :meth:`attend` (how queries read ``[cache; new]``).
    """

    # True in a subclass whose :meth:`project` gives the new keys the tokens' own positions, times and validity (as
    # this class's does), so that the C kernel, which reads those from the tokens, still applies
    new_keys_follow_tokens: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.kv_heads = cfg.heads if kv_heads is None else kv_heads
        self.key_dim = cfg.head_dim
        self.value_dim = cfg.head_dim
        self.alpha = 1.0 / math.sqrt(cfg.head_dim)
        self.normaliser = float(cfg.max_len)
        width, kv_width = cfg.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.split = (width, kv_width, width, kv_width)  # u, v, q, k
        self.input_norm = nn.LayerNorm(cfg.dim)
        self.uvqk = nn.Linear(cfg.dim, sum(self.split))
        self.output_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, cfg.dim)
        self.dropout = Dropout(cfg.dropout)
        self.bias = RelativeBias(cfg.pos_buckets, cfg.time_buckets)
        self.tile_pairs = TILE_PAIRS  # (query, key) pairs per attention tile and batch row
        self.use_kernel = True  # the C kernel where it applies (:meth:`kernel_applies`); False: PyTorch alone

    def forward(self, x: torch.Tensor, tokens: TokenBatch, cache: KVBlock | None, need_weights: bool = False
                ) -> tuple[torch.Tensor, KVBlock, torch.Tensor | None]:
        u, q, new = self.project(self.input_norm(x), tokens)
        attended, weights = self.attend(q, tokens, cache, new, need_weights)
        y = x + self.dropout(self.output(self.output_norm(attended) * u))
        return y, new, weights

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, KVBlock]:
        """``h (B, T, D)`` -> gate ``u (B, T, H d_v)``, queries ``(B, H, T, d_k)``, new keys/values."""
        # in place without autograd (SiLU's backward needs its input): the projection's output is this call's own
        u, v, q, k = F.silu(self.uvqk(h), inplace=not torch.is_grad_enabled()).split(self.split, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        return u, q, KVBlock(k, v, tokens.positions[:, None], tokens.timestamps[:, None], tokens.is_history[:, None])

    def visible(self, tokens: TokenBatch, cache: KVBlock | None, keys: KVBlock) -> torch.Tensor:
        """Which of ``keys = [cache; new]`` each new token sees: ``(B, 1 or H, T, n + T)`` bool."""
        return visibility(tokens, cache)

    def kernel_window(self) -> tuple[int, int] | None:
        """:meth:`visible` as the C kernel applies it: ``(window, globals)``, the default mask within a sliding
        window (``window < 0``: none; see ``malloc.kernels.hstu.pointwise_attention``), or None where the kernel
        cannot apply it. This class's mask is ``(-1, 0)``; a scheme that changes :meth:`visible` gets None unless it
        overrides this too (Longformer does)."""
        return (-1, 0) if type(self).visible is HSTULayer.visible else None

    def kernel_applies(self, q: torch.Tensor, tokens: TokenBatch, need_weights: bool) -> bool:
        """Whether :meth:`attend` runs the C kernel (``malloc.kernels.hstu``, forward and backward): no weights
        asked for, float32 on the CPU, integer times, and a layer the kernel serves (:meth:`kernel_layer`)."""
        return (not need_weights and q.device.type == "cpu" and q.dtype == torch.float32
                and tokens.timestamps.dtype == torch.int64 and self.kernel_layer())

    def kernel_layer(self) -> bool:
        """Whether the kernel may run this layer: turned on, a mask it applies (:meth:`kernel_window`), this class's
        new keys (a scheme that changes :meth:`project` keeps the PyTorch path, unless its new keys follow the
        tokens: the kernel reads the new keys' positions, times and validity from the tokens), and built."""
        return (self.use_kernel and self.kernel_window() is not None
                and (type(self).project is HSTULayer.project or self.new_keys_follow_tokens)
                and kernel.available())

    def collate(self, stored: list[StoredLayer], dtype: torch.dtype) -> KVBlock | KVRows:
        """Several users' stored layers as :class:`KVRows` (each read where its state keeps it, no padded copy)
        where this class's :meth:`attend` may run the kernel on float32 CPU keys; one padded block otherwise (and
        for one user, whose block is a view)."""
        if (len(stored) > 1 and dtype == torch.float32 and type(self).attend is HSTULayer.attend
                and self.uvqk.weight.device.type == "cpu" and self.kernel_layer()):
            rows = collate_rows(stored, dtype)
            if rows is not None:
                return rows
        return super().collate(stored, dtype)

    def attend(self, q: torch.Tensor, tokens: TokenBatch, cache: KVBlock | KVRows | None, new: KVBlock,
               need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries ``(B, H, T, d_k)`` over ``[cache; new]`` -> ``(B, T, H d_v)`` and weights per stored head.

        Where :meth:`kernel_applies`, the C kernel reads each (query, key) pair once. Otherwise, without weights,
        queries are taken in tiles of at most ``tile_pairs`` (query, key) pairs per batch row: the bias, the mask
        and the scores of one tile exist at a time, never the whole ``(T, S)``. Pointwise attention has no
        normalisation across keys, so a tile's outputs are final.
        """
        batch, _, length, _ = q.shape
        if self.kernel_applies(q, tokens, need_weights):
            window, num_globals = self.kernel_window() or (-1, 0)
            scale = None if cache is None or cache.scale is None else cache.scale.reshape(batch)
            if isinstance(cache, KVBlock) and cache.keys.dtype != q.dtype:
                cache = replace(cache, keys=cache.keys.to(q.dtype), values=cache.values.to(q.dtype))
            attended = kernel.pointwise_attention(
                q, as_dtype(new.keys, q.dtype), as_dtype(new.values, q.dtype), tokens.positions, tokens.timestamps,
                tokens.is_history, self.bias.tables(), self.alpha, self.normaliser, cached=cache, key_scale=scale,
                window=window, num_globals=num_globals)
            return attended.view(batch, length, -1), None
        cache = as_block(cache)
        keys = concat_keys(cache, new)
        visible = self.visible(tokens, cache, keys)
        k, v = (to_query_heads(x.to(q.dtype), self.heads) for x in (keys.keys, keys.values))
        scale = stored_scale(cache, keys.keys.shape[2], q.dtype)
        tile = max(1, self.tile_pairs // keys.keys.shape[2])

        def bias(rows: slice) -> torch.Tensor:
            memo = tokens.memo if tile >= length else None  # one tile: the next layer may reuse the buckets
            return to_query_heads(self.bias(tokens.positions[:, rows], tokens.timestamps[:, rows], keys.positions,
                                            keys.timestamps, memo=memo), self.heads)

        if need_weights:  # the observers read the weights: the reference path
            every = slice(None)
            attended, weights = hstu_attention(q, k, v, bias(every), to_query_heads(visible, self.heads),
                                               self.alpha, self.normaliser, scale)
        else:
            tiles = [slice(start, start + tile) for start in range(0, length, tile)] or [slice(0, 0)]  # T = 0
            attended = torch.cat([hstu_attention_fused(q[:, :, rows], k, v, bias(rows),
                                                       to_query_heads(visible[:, :, rows], self.heads), self.alpha,
                                                       self.normaliser, scale) for rows in tiles], dim=2)
            weights = None
        attended = attended.transpose(1, 2).reshape(batch, length, -1)
        return attended, group_mean(weights, self.kv_heads) if need_weights else None


def use_kernels(model: nn.Module, enabled: bool) -> int:
    """Let every HSTU layer of ``model`` run the C kernel where it applies (``enabled``), or PyTorch alone;
    returns how many layers were set."""
    layers = [module for module in model.modules() if isinstance(module, HSTULayer)]
    for layer in layers:
        layer.use_kernel = enabled
    return len(layers)


class HSTU(SequentialRecommender):
    """HSTU backbone: item + action embeddings, order from the relative bias; under ``model.absolute_positions``
    the item embedding is scaled by ``sqrt(D)`` and a learned absolute-position embedding is added, as in
    generative-recommenders' input."""

    def __init__(self, cfg: ModelConfig, num_items: int, scheme: LayerScheme | None = None) -> None:
        super().__init__(cfg, num_items, scheme)
        if cfg.absolute_positions:
            self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
            nn.init.normal_(self.position_embedding.weight, std=math.sqrt(1.0 / cfg.dim))

    def build_layer(self) -> AttentionLayer:
        return HSTULayer(self.cfg)
