"""HSTU's pointwise attention as one compiled CPU kernel (forward only, float32): ``hstu_attention.c``.

It computes the outputs of ``malloc.models.hstu.hstu_attention`` with its default mask (a key is seen when it is
valid and earlier, and each query sees itself) and its relative bias, reading every ``(query, key)`` pair once: no
``(T, S)`` bias, mask or score tensor exists. The reference stays the oracle (tests/test_kernels.py) and the path
for gradients, other dtypes, other masks and attention weights.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from malloc.kernels.build import load

SOURCE = "hstu_attention.c"
# below this many (query, key, head) triples a call runs on the calling thread alone
PARALLEL_MIN_WORK = 1 << 21

_ARGTYPES = ([ctypes.c_int64] * 9 + [ctypes.c_void_p] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_void_p] * 4
             + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2
             + [ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64])


@dataclass(frozen=True)
class BucketTables:
    """One layer's relative bias as the kernel reads it.

    Attributes:
        position_bias: ``(P,)`` float32 bias per position bucket.
        position_thresholds: ``(P,)`` int64, the least distance of each position bucket (non-decreasing, first 0).
        position_octave: position buckets per octave of distance (the reference's integer log scale).
        time_bias, time_thresholds, time_octave: the same for time distances.
    """

    position_bias: torch.Tensor
    position_thresholds: torch.Tensor
    position_octave: int
    time_bias: torch.Tensor
    time_thresholds: torch.Tensor
    time_octave: int


def available() -> bool:
    """Whether the kernel is built and loaded (it is built on the first call)."""
    return _library() is not None


def _library() -> ctypes.CDLL | None:
    library = load(SOURCE)
    if library is not None and library.hstu_attention_rows.argtypes is None:
        library.hstu_attention_rows.argtypes = _ARGTYPES
        library.hstu_attention_rows.restype = ctypes.c_int
    return library


def pointwise_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor,
                        query_time: torch.Tensor, key_pos: torch.Tensor, key_time: torch.Tensor,
                        key_valid: torch.Tensor, cached: int, key_scale: torch.Tensor | None, tables: BucketTables,
                        alpha: float, normaliser: float) -> torch.Tensor:
    """HSTU attention of new tokens over ``[cached; new]`` keys with the default mask, by the C kernel.

    It runs as the operator ``torch.ops.malloc.hstu_pointwise_attention``, so that the profiler names it and
    :func:`malloc.models.macs.count_flops` counts it. The query rows are split over ``torch.get_num_threads()``
    threads when the call is large enough.

    Args:
        q: ``(B, H, T, d_k)`` queries of the ``T`` new tokens.
        keys: ``(B, Hk, S, d_k)``; values: ``(B, Hk, S, d_v)``; ``S = cached + T``, the new tokens last.
        query_pos, query_time: ``(B, T)`` int64.
        key_pos, key_time: ``(B, Hm, S)`` int64; key_valid: ``(B, Hm, S)`` bool (for new keys: is history).
        cached: the ``n`` stored keys ahead of the new ones.
        key_scale: ``(B,)`` multiplier of the stored keys' weights, or None.
        tables: the layer's relative bias. ``Hk`` and ``Hm`` divide ``H``.
    Returns:
        ``(B, T, H, d_v)`` float32 outputs: the reference's, transposed.
    Raises:
        ValueError: an argument's dtype, device or shape is not what the kernel reads.
        RuntimeError: the kernel is not available (check :func:`available` first), or could not allocate.
    """
    _check(q, keys, values, query_pos, query_time, key_pos, key_time, key_valid, cached, tables)
    return OPERATOR(
        q, keys, values, query_pos, query_time, key_pos, key_time, key_valid, cached, key_scale,
        tables.position_bias.detach(), tables.position_thresholds, tables.position_octave,
        tables.time_bias.detach(), tables.time_thresholds, tables.time_octave, alpha, normaliser)


@torch.library.custom_op("malloc::hstu_pointwise_attention", mutates_args=())
def _operator(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor,
              query_time: torch.Tensor, key_pos: torch.Tensor, key_time: torch.Tensor, key_valid: torch.Tensor,
              cached: int, key_scale: torch.Tensor | None, position_bias: torch.Tensor,
              position_thresholds: torch.Tensor, position_octave: int, time_bias: torch.Tensor,
              time_thresholds: torch.Tensor, time_octave: int, alpha: float, normaliser: float) -> torch.Tensor:
    library = _library()
    if library is None:
        raise RuntimeError(f"the C kernel {SOURCE} is not available")
    batch, heads, length, key_dim = q.shape
    key_heads, width, value_dim = values.shape[1], keys.shape[2], values.shape[3]
    meta_heads = key_pos.shape[1]
    q, values = q.contiguous(), values.contiguous()
    keys_t = keys.transpose(-1, -2).contiguous()
    query_pos, query_time = query_pos.contiguous(), query_time.contiguous()
    key_pos, key_time, key_valid = key_pos.contiguous(), key_time.contiguous(), key_valid.contiguous()
    scale = None if key_scale is None else key_scale.to(torch.float32).contiguous()
    position_bias, time_bias = (t.to(torch.float32).contiguous() for t in (position_bias, time_bias))
    position_thresholds, time_thresholds = position_thresholds.contiguous(), time_thresholds.contiguous()
    out = torch.empty(batch, length, heads, value_dim, dtype=torch.float32)

    def rows(begin: int, end: int) -> int:
        return library.hstu_attention_rows(
            batch, heads, key_heads, meta_heads, length, width, cached, key_dim, value_dim,
            q.data_ptr(), keys_t.data_ptr(), values.data_ptr(), query_pos.data_ptr(), query_time.data_ptr(),
            key_pos.data_ptr(), key_time.data_ptr(), key_valid.data_ptr(), None if scale is None else scale.data_ptr(),
            position_bias.data_ptr(), position_thresholds.data_ptr(), position_bias.shape[0], position_octave,
            time_bias.data_ptr(), time_thresholds.data_ptr(), time_bias.shape[0], time_octave, alpha,
            1.0 / normaliser, out.data_ptr(), begin, end)

    total = batch * length
    workers = max(1, min(torch.get_num_threads(), total, (total * width * heads) // PARALLEL_MIN_WORK or 1))
    bounds = [total * w // workers for w in range(workers + 1)]
    statuses = [0] * workers

    def run(w: int) -> None:
        statuses[w] = rows(bounds[w], bounds[w + 1])

    pool = [threading.Thread(target=run, args=(w,)) for w in range(1, workers)]
    for thread in pool:
        thread.start()
    run(0)  # the calling thread takes the first range
    for thread in pool:
        thread.join()
    if any(statuses):
        raise RuntimeError(f"the C kernel {SOURCE} could not allocate its buffers")
    return out


# the operator as the dispatcher knows it (profiler and flop counter key on it)
OPERATOR = torch.ops.malloc.hstu_pointwise_attention


@_operator.register_fake
def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *args: object) -> torch.Tensor:
    batch, heads, length, _ = q.shape
    return q.new_empty(batch, length, heads, values.shape[3])


def _check(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor,
           query_time: torch.Tensor, key_pos: torch.Tensor, key_time: torch.Tensor, key_valid: torch.Tensor,
           cached: int, tables: BucketTables) -> None:
    """Raise ValueError unless the arguments have the dtypes, device and shapes the C code reads blindly."""
    batch, heads, length, key_dim = q.shape
    key_heads, width = keys.shape[1], cached + length
    expected = {
        "q": (q, torch.float32, (batch, heads, length, key_dim)),
        "keys": (keys, torch.float32, (batch, key_heads, width, key_dim)),
        "values": (values, torch.float32, (batch, key_heads, width, values.shape[3])),
        "query_pos": (query_pos, torch.int64, (batch, length)),
        "query_time": (query_time, torch.int64, (batch, length)),
        "key_pos": (key_pos, torch.int64, (batch, key_pos.shape[1], width)),
        "key_time": (key_time, torch.int64, key_pos.shape),
        "key_valid": (key_valid, torch.bool, key_pos.shape),
        "position_thresholds": (tables.position_thresholds, torch.int64, tables.position_bias.shape),
        "time_thresholds": (tables.time_thresholds, torch.int64, tables.time_bias.shape),
    }
    for name, (tensor, dtype, shape) in expected.items():
        if tensor.dtype != dtype or tensor.device.type != "cpu" or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: expected a CPU {dtype} tensor of shape {tuple(shape)}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    if heads % key_heads or heads % key_pos.shape[1]:
        raise ValueError(f"heads: {heads} query heads are not a multiple of {key_heads} key heads "
                         f"and {key_pos.shape[1]} metadata heads")
    if not (tables.position_thresholds.is_contiguous() and tables.time_thresholds.is_contiguous()):
        raise ValueError("tables: the thresholds must be contiguous")
