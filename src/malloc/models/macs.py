"""Analytic multiply-accumulates (MACs) of one request, as the pure-PyTorch reference path computes them.

Counted: every matrix product (linear layers, ``q k^T`` and ``a v``, the CTR head and the dot readout's ``W h``,
the retrieval read); not counted: element-wise work, normalisation, softmax/SiLU, bias lookups, embedding gathers,
dequantization. So
``FLOPs = 2 x MACs`` for what :class:`torch.utils.flop_counter.FlopCounterMode` counts (tested within 5%).

Per layer (``D`` = dim, ``H`` heads, ``d`` = head_dim, ``W = H d``):

- per token: HSTU ``D 4W + W D``; SASRec ``D 3W + W D + 2 m D^2`` (``m`` = ffn_mult);
- per query against ``S`` keys: ``H S (d_k + d_v)``.

A request appends ``t`` new events to ``n`` stored events (each new event's query is computed against all
``n + t`` keys: the reference path masks, it does not skip) and scores ``c`` candidates in micro-batches of
``k`` (each against ``n + t`` stored keys plus its own micro-batch, masked to itself: the M-FALCON mask is
applied by masking); under ``candidate = "query"`` the candidates requested at one time are one token to the
layers, and each candidate adds its readout only. Eviction and precision schemes read ``n`` = the stored events
(a dequantized read costs the same products); Native reads every event. Recomputing the whole history instead
prefills ``n + t`` events in chunks (each chunk against all earlier events and itself), then scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from malloc.kernels import hstu as kernel
from malloc.models.config import ModelConfig


def token_macs(cfg: ModelConfig) -> int:
    """Projection (and feed-forward) MACs of one token through all layers."""
    width = cfg.heads * cfg.head_dim
    if cfg.backbone == "hstu":
        per_layer = cfg.dim * 4 * width + width * cfg.dim
    else:
        per_layer = cfg.dim * 3 * width + width * cfg.dim + 2 * cfg.ffn_mult * cfg.dim * cfg.dim
    return cfg.layers * per_layer


def attention_macs(cfg: ModelConfig, queries: float, keys: float) -> float:
    """``q k^T`` and ``a v`` MACs of ``queries`` queries against ``keys`` keys, all layers and heads."""
    return cfg.layers * cfg.heads * queries * keys * 2 * cfg.head_dim


def _chunks(total: int, chunk: int | None) -> list[int]:
    if total <= 0:
        return []
    size = total if chunk is None else max(1, min(chunk, total))
    return [size] * (total // size) + ([total % size] if total % size else [])


def request_macs(cfg: ModelConfig, stored_tokens: float, new_events: int, candidates: int,
                 candidate_chunk: int | None = None, catalogue: int = 0, scheme: Any = None,
                 history_len: int | None = None, candidate_times: float | None = None) -> float:
    """MACs of one cached request: append ``new_events`` to ``stored_tokens`` stored events, then read.

    Args:
        cfg: the backbone.
        stored_tokens: events stored per layer and head before the request (a mean is fine: the result is linear
            in it).
        new_events: ``t`` events appended by the request.
        candidates: ``c`` candidates scored (CTR); 0 for none.
        candidate_chunk: candidates per micro-batch (None: all at once).
        catalogue: items scored by the retrieval read (``num_items + 1``; 0 for none).
        scheme: a trained-in architecture scheme (its own per-token and attention costs), or None (Native).
        history_len: events stored before the request; with a scheme, the append processes
            ``scheme.append_tokens`` tokens (events plus any tokens of its own) and candidates read
            ``scheme.stored_keys(history_len + t)`` keys. None: the append processes its ``t`` events and adds
            ``t`` keys.
        candidate_times: distinct request times among the candidates (a mean is fine). Under
            ``candidate = "query"`` the layers compute one token per time (:mod:`malloc.serving.candidates`), and
            each candidate pays its readout only. None: one token per candidate.
    """
    per_token = token_macs(cfg) if scheme is None else scheme.token_macs(cfg)
    attend = partial(attention_macs, cfg) if scheme is None else partial(scheme.attention_macs, cfg)
    t, after = new_events, stored_tokens + new_events  # tokens the append processes, keys stored after it
    if scheme is not None and history_len is not None:
        t = scheme.append_tokens(cfg, history_len, new_events)
        after = scheme.stored_keys(cfg, history_len + new_events)
    macs = t * per_token + attend(t, stored_tokens + t)
    readout = cfg.dim + (cfg.dim * cfg.dim if cfg.ctr_readout == "dot" else 0)  # the head (+ the dot's W h)
    tokens = candidates
    if candidate_times is not None and cfg.candidate == "query":
        tokens = min(candidates, max(1, math.ceil(candidate_times)))
    for size in _chunks(tokens, candidate_chunk):
        macs += size * per_token + attend(size, after + size)
    return float(macs + candidates * readout + catalogue * cfg.dim)


def recompute_macs(cfg: ModelConfig, history_len: int, new_events: int, candidates: int,
                   prefill_chunk: int | None = None, candidate_chunk: int | None = None, catalogue: int = 0,
                   candidate_times: float | None = None) -> float:
    """MACs of serving the same request with no stored state (Native): prefill all ``history_len + new_events``
    events (in chunks of ``prefill_chunk``; None: one chunk), then read as :func:`request_macs` with nothing
    appended."""
    total, done, macs = int(history_len) + new_events, 0, 0.0
    for size in _chunks(total, prefill_chunk):
        macs += size * token_macs(cfg) + attention_macs(cfg, size, done + size)
        done += size
    return macs + request_macs(cfg, total, 0, candidates, candidate_chunk, catalogue, candidate_times=candidate_times)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """PyTorch's CPU flash attention (SASRec's fused path), which the counter has no formula for, counted as
    ``q k^T`` + ``a v``."""
    batch, heads, queries, key_dim = query_shape
    keys, value_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * queries * keys * (key_dim + value_dim)


def _kernel_flops(query_shape, cached_key_shape, cached_value_shape, *args, out_shape=None, **kwargs) -> int:
    """HSTU's C kernel (:mod:`malloc.kernels.hstu`), counted as the reference's ``q k^T`` + ``a v`` over its
    stored and new keys (its seventh argument holds the new keys)."""
    batch, heads, _, key_dim = cached_key_shape
    return _attention_flops(query_shape, (batch, heads, cached_key_shape[2] + args[3][2], key_dim),
                            cached_value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` as :class:`torch.utils.flop_counter.FlopCounterMode` counts them (matrix products;
    the CPU fused attention kernel and HSTU's C kernel included), to cross-check the analytic MACs
    (``FLOPs = 2 MACs``)."""
    mapping = {kernel.OPERATOR: _kernel_flops}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def format_macs(macs: float) -> str:
    """``1.23 MMAC``-style short form."""
    if macs <= 0:
        return "0 MAC"
    unit = min(int(math.log10(macs) // 3), 4)
    return f"{macs / 10 ** (3 * unit):.3g} {['', 'k', 'M', 'G', 'T'][unit]}MAC"
