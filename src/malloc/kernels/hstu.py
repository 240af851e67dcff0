"""HSTU's pointwise attention as one compiled CPU kernel, forward and backward, float32: ``hstu_attention.c``.

It computes the outputs of ``malloc.models.hstu.hstu_attention`` with its default mask (a key is seen when it is
valid and earlier, and each query sees itself; optionally within Longformer's sliding window) and its relative
bias, reading every ``(query, key)`` pair once: no ``(T, S)`` bias, mask or score tensor exists. Its gradients
recompute the scores. The reference stays the oracle (tests/test_kernels.py) and the path for other dtypes, other
masks, attention weights and GPUs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from malloc.kernels.build import load

SOURCE = "hstu_attention.c"
# below this many (query, key, head) triples a call runs on the calling thread alone
PARALLEL_MIN_WORK = 1 << 18

_POINTER, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# bias, thresholds, buckets, octave: position, then time; then the sliding window and its globals
_TABLES = [_POINTER, _POINTER, _INT, _INT] * 2 + [_INT, _INT]
# the C signatures: sizes, tensors (the forward's: queries, the table of stored rows, stored metadata, new keys,
# query metadata, scale), tables, alpha, 1 / N, outputs, threads
_SIGNATURES = {
    "hstu_attention": [_INT] * 8 + [_POINTER] * 11 + _TABLES + [_FLOAT, _FLOAT, _POINTER, _INT],
    "hstu_attention_backward": [_INT] * 9 + [_POINTER] * 5 + [_POINTER] * 6 + _TABLES
                               + [_FLOAT, _FLOAT] + [_POINTER] * 6 + [_INT],
}


class StoredKeys(Protocol):
    """The stored keys a call reads ahead of the new tokens' (``malloc.core.tokens.KVBlock`` is one).

    Attributes:
        keys: ``(B, Hk, n, d_k)``; values: ``(B, Hk, n, d_v)``.
        positions, timestamps: ``(B, Hm, n)`` int64; valid: ``(B, Hm, n)`` bool.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor
    valid: torch.Tensor


class StoredRows(Protocol):
    """Stored keys held per batch row where each user's state keeps them, not padded into one block
    (``malloc.core.tokens.KVRows`` is one).

    Attributes:
        row_keys: ``B`` tensors ``(Hk, n_b, d_k)``; row_values: ``B`` tensors ``(Hk, n_b, d_v)``, ``n_b <= n``.
        positions, timestamps: ``(B, Hm, n)`` int64; valid: ``(B, Hm, n)`` bool, False past each row's ``n_b``.
    """

    row_keys: tuple[torch.Tensor, ...]
    row_values: tuple[torch.Tensor, ...]
    positions: torch.Tensor
    timestamps: torch.Tensor
    valid: torch.Tensor


# a batch row's entry in the C forward's table of stored rows is (keys' address, their head stride in floats,
# values' address, their head stride, stored keys); addresses are in bytes
_FLOAT_BYTES = 4


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
    if library is not None and library.hstu_attention.argtypes is None:
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
    return library


def pointwise_attention(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                        query_pos: torch.Tensor, query_time: torch.Tensor, is_history: torch.Tensor,
                        tables: BucketTables, alpha: float, normaliser: float, *,
                        cached: StoredKeys | StoredRows | None = None,
                        key_scale: torch.Tensor | None = None, window: int = -1, num_globals: int = 0
                        ) -> torch.Tensor:
    """HSTU attention of ``T`` new tokens over ``[cached; new]`` keys with the default mask, or that mask within a
    sliding window (Longformer's), by the C kernel.

    The stored keys and the new tokens' are read where they are: no joined ``[cached; new]`` or transposed copy is
    made here (the C code lays out one batch row at a time). It runs as the operator
    ``torch.ops.malloc.hstu_pointwise_attention`` (with its gradient when one is recorded), so that the profiler
    names it and :func:`malloc.models.macs.count_flops` counts it. The query rows are split over up to
    ``torch.get_num_threads()`` threads when the call is large enough (:func:`_workers`).

    Args:
        q: ``(B, H, T, d_k)`` queries of the new tokens.
        new_keys: ``(B, Hk, T, d_k)``; new_values: ``(B, Hk, T, d_v)``.
        query_pos, query_time: ``(B, T)`` int64, the new tokens' (as queries and as keys).
        is_history: ``(B, T)`` bool, which new tokens later tokens may see (valid history events).
        tables: the layer's relative bias. ``Hk`` and the stored metadata's ``Hm`` divide ``H``.
        cached: the ``n`` stored keys (:class:`StoredKeys`), or each row's own (:class:`StoredRows`: read where
            they are, serving only), or None (none).
        key_scale: ``(B,)`` multiplier of the stored keys' weights, or None.
        window, num_globals: with ``window >= 0``, a query sees besides itself only the keys at positions from its
            own minus ``window`` and those below ``num_globals`` (``malloc.memory.schemes.token_merge.longformer``);
            ``window < 0``: every earlier key.
    Returns:
        ``(B, T, H, d_v)`` float32 outputs: the reference's, transposed.
    Raises:
        ValueError: an argument's dtype, device or shape is not what the kernel reads.
        RuntimeError: the kernel is not available (check :func:`available` first), or could not allocate.
    """
    if cached is None:
        batch, key_heads, _, key_dim = new_keys.shape
        cached = _NoKeys(new_keys.new_empty(batch, key_heads, 0, key_dim),
                         new_values.new_empty(batch, key_heads, 0, new_values.shape[3]),
                         query_pos.new_empty(batch, 1, 0), query_time.new_empty(batch, 1, 0),
                         is_history.new_empty(batch, 1, 0))
    row_keys = getattr(cached, "row_keys", None)
    rows = None
    if row_keys is not None:  # each row where it is: a table of addresses, and a (B, Hk, n, d) shape for the op
        # the rows as the C code reads them, held (with any copy made here) until the call returns
        held = [(_rows_readable(k), _rows_readable(v)) for k, v in zip(row_keys, cached.row_values, strict=True)]
        _check_rows(held, q.shape[0], new_keys, new_values, cached.positions.shape[-1])
        rows = torch.tensor([[k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k.shape[1]] for k, v in held],
                            dtype=torch.int64)
        stored = cached.positions.shape[-1]
        cached = _NoKeys(q.new_zeros(()).expand(q.shape[0], new_keys.shape[1], stored, new_keys.shape[3]),
                         q.new_zeros(()).expand(q.shape[0], new_keys.shape[1], stored, new_values.shape[3]),
                         cached.positions, cached.timestamps, cached.valid)
    _check(q, cached, new_keys, new_values, query_pos, query_time, is_history, tables, key_scale)
    inputs = (q, cached.keys, cached.values, cached.positions, cached.timestamps, cached.valid, new_keys,
              new_values, query_pos, query_time, is_history, key_scale, tables.position_bias,
              tables.position_thresholds, tables.position_octave, tables.time_bias, tables.time_thresholds,
              tables.time_octave, alpha, normaliser, window, num_globals, rows)
    if torch.is_grad_enabled() and any(inputs[index].requires_grad for index in _DIFFERENTIABLE.values()):
        if rows is not None:
            raise ValueError("stored rows (StoredRows) are read for serving only: pass a StoredKeys block to train")
        return _Attention.apply(*inputs)
    return OPERATOR(*inputs)  # serving: no graph to record (the autograd wrapper costs more than a small call)


@dataclass
class _NoKeys:
    """No stored keys (empty tensors), or stand-ins of :class:`StoredKeys`' shapes: a :class:`StoredKeys`."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor
    valid: torch.Tensor


def _workers(count: int, work: int) -> int:
    """Threads for a call of ``count`` rows and ``work`` (query, key, head) triples: up to
    ``torch.get_num_threads()``, one per :data:`PARALLEL_MIN_WORK` of work. The C code runs them as an OpenMP team
    of PyTorch's own runtime (threads of a separate pool would compete with PyTorch's, which spin between its
    operators)."""
    return max(1, min(torch.get_num_threads(), count, work // PARALLEL_MIN_WORK or 1))


def _readable(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` as the C code reads it: contiguous, outside any autograd graph (itself when it already is; each
    skipped call is a dispatch saved, and a request makes dozens)."""
    if tensor is None:
        return None
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _rows_readable(tensor: torch.Tensor) -> torch.Tensor:
    """Stored keys or values ``(..., H, n, d)`` as the C code reads them: each row of ``d`` contiguous, and each
    head its ``n`` rows one after the other, while heads and batch rows may lie further apart (a stored layer with
    spare rows, read in place); a copy otherwise."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    rows_in_place = tensor.stride(-1) == 1 and tensor.stride(-2) == tensor.shape[-1]
    return tensor if rows_in_place or tensor.is_contiguous() else tensor.contiguous()


def _row_table(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The C forward's table of stored rows for a ``(B, Hk, n, d)`` block read in place: row ``b`` at the block's
    address plus ``b`` batch strides, every row holding all ``n`` keys."""
    batch, _, stored, _ = keys.shape
    step_k, step_v = keys.stride(0) * _FLOAT_BYTES, values.stride(0) * _FLOAT_BYTES
    return torch.tensor([[keys.data_ptr() + b * step_k, keys.stride(1), values.data_ptr() + b * step_v,
                          values.stride(1), stored] for b in range(batch)], dtype=torch.int64)


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 (itself when it is: a skipped ``Tensor.to`` is a dispatch saved per call)."""
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


def _pointers(*tensors: torch.Tensor | None) -> list[int | None]:
    return [None if t is None else t.data_ptr() for t in tensors]


def _tables(position_bias: torch.Tensor, position_thresholds: torch.Tensor, position_octave: int,
            time_bias: torch.Tensor, time_thresholds: torch.Tensor, time_octave: int) -> tuple[list, list]:
    """The bias tables as the C code reads them (float32, contiguous), and its table arguments."""
    held = [_readable(_float32(position_bias)), _readable(position_thresholds), _readable(_float32(time_bias)),
            _readable(time_thresholds)]
    return held, [held[0].data_ptr(), held[1].data_ptr(), held[0].shape[0], position_octave,
                  held[2].data_ptr(), held[3].data_ptr(), held[2].shape[0], time_octave]


def _library_or_raise() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError(f"the C kernel {SOURCE} is not available")
    return library


# The operators, defined with torch.library's plain registration API (torch.library.custom_op would import
# torch._dynamo on the first call: seconds), so that the profiler names them and the flop counter sees them.
_ARGUMENTS = ("Tensor q, Tensor cached_keys, Tensor cached_values, Tensor cached_pos, Tensor cached_time, "
              "Tensor cached_valid, Tensor new_keys, Tensor new_values, Tensor query_pos, Tensor query_time, "
              "Tensor is_history, Tensor? key_scale, Tensor position_bias, Tensor position_thresholds, "
              "int position_octave, Tensor time_bias, Tensor time_thresholds, int time_octave, float alpha, "
              "float normaliser, int window, int num_globals, Tensor? cached_rows")
_LIBRARY = torch.library.Library("malloc", "DEF")
_LIBRARY.define(f"hstu_pointwise_attention({_ARGUMENTS}) -> Tensor")
_LIBRARY.define(f"hstu_pointwise_attention_backward(Tensor grad, {_ARGUMENTS}) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _forward_impl(q: torch.Tensor, cached_keys: torch.Tensor, cached_values: torch.Tensor,
                  cached_pos: torch.Tensor, cached_time: torch.Tensor, cached_valid: torch.Tensor,
                  new_keys: torch.Tensor, new_values: torch.Tensor, query_pos: torch.Tensor,
                  query_time: torch.Tensor, is_history: torch.Tensor, key_scale: torch.Tensor | None,
                  *table_args: Any) -> torch.Tensor:
    *tables, alpha, normaliser, window, num_globals, cached_rows = table_args
    library = _library_or_raise()
    if cached_rows is None:  # one block: its rows are read where they are
        stored_keys, stored_values = _rows_readable(cached_keys), _rows_readable(cached_values)
        cached_rows = _row_table(stored_keys, stored_values)
    held = [_readable(q), _readable(cached_rows),
            *(_readable(t) for t in (cached_pos, cached_time, cached_valid, new_keys, new_values, query_pos,
                                     query_time, is_history))]
    scale = _readable(None if key_scale is None else _float32(key_scale))
    _tables_alive, table_pointers = _tables(*tables)  # the tensors behind the pointers, held through the call
    batch, heads, length, key_dim = q.shape
    key_heads, stored, value_dim = new_keys.shape[1], cached_keys.shape[2], new_values.shape[3]
    out = torch.empty(batch, length, heads, value_dim, dtype=torch.float32)
    status = library.hstu_attention(
        batch, heads, key_heads, cached_pos.shape[1], length, stored, key_dim, value_dim, *_pointers(*held, scale),
        *table_pointers, window, num_globals, alpha, 1.0 / normaliser, out.data_ptr(),
        _workers(batch * length, batch * length * (stored + length) * heads))
    if status:
        raise RuntimeError(f"the C kernel {SOURCE} could not allocate its buffers")
    return out


def _backward_impl(grad: torch.Tensor, q: torch.Tensor, cached_keys: torch.Tensor, cached_values: torch.Tensor,
                   cached_pos: torch.Tensor, cached_time: torch.Tensor, cached_valid: torch.Tensor,
                   new_keys: torch.Tensor, new_values: torch.Tensor, query_pos: torch.Tensor,
                   query_time: torch.Tensor, is_history: torch.Tensor, key_scale: torch.Tensor | None,
                   position_bias: torch.Tensor, position_thresholds: torch.Tensor, position_octave: int,
                   time_bias: torch.Tensor, time_thresholds: torch.Tensor, time_octave: int, alpha: float,
                   normaliser: float, window: int, num_globals: int, cached_rows: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """The gradients of the forward in q, the stored keys and values, the new keys and values, position_bias and
    time_bias, given ``grad`` of its output. The C backward reads ``[cached; new]`` joined, in both layouts (it
    runs in training only, where these copies are small beside the work). Batch rows are split over threads (each
    row's key and value gradients are its own); each thread sums the bias gradients in float64, and the threads'
    sums are added at the end."""
    library = _library_or_raise()
    batch, heads, length, _ = q.shape
    stored, meta_heads = cached_keys.shape[2], cached_pos.shape[1]

    def joined(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # [cached; new] along the keys
        return torch.cat([cached.detach(), new.detach()], dim=2) if stored else new.detach()

    keys, values = _readable(joined(cached_keys, new_keys)), _readable(joined(cached_values, new_values))
    key_pos, key_time, key_valid = (joined(c, x[:, None].expand(-1, meta_heads, -1)) for c, x in (
        (cached_pos, query_pos), (cached_time, query_time), (cached_valid, is_history)))
    width = keys.shape[2]  # the gradients take the joined keys' layout
    held = [_readable(t) for t in (q, keys.transpose(-1, -2), keys, values.transpose(-1, -2), values, query_pos,
                                   query_time, key_pos, key_time, key_valid)]
    scale = _readable(None if key_scale is None else _float32(key_scale))
    table_held, table_pointers = _tables(position_bias, position_thresholds, position_octave, time_bias,
                                         time_thresholds, time_octave)
    grad = _readable(grad.to(torch.float32))
    dq, dkeys, dvalues = torch.empty_like(held[0]), torch.zeros_like(keys), torch.zeros_like(values)
    workers = _workers(batch, batch * length * width * heads)
    dposition = torch.zeros(workers, table_held[0].shape[0], dtype=torch.float64)
    dtime = torch.zeros(workers, table_held[2].shape[0], dtype=torch.float64)
    status = library.hstu_attention_backward(
        batch, heads, keys.shape[1], meta_heads, length, width, stored, keys.shape[3], values.shape[3],
        *_pointers(*held, scale), *table_pointers, window, num_globals, alpha, 1.0 / normaliser, grad.data_ptr(),
        dq.data_ptr(), dkeys.data_ptr(), dvalues.data_ptr(), dposition.data_ptr(), dtime.data_ptr(), workers)
    if status:
        raise RuntimeError(f"the C kernel {SOURCE} could not allocate its buffers")
    return (dq, dkeys[:, :, :stored], dvalues[:, :, :stored], dkeys[:, :, stored:], dvalues[:, :, stored:],
            dposition.sum(0).to(position_bias.dtype), dtime.sum(0).to(time_bias.dtype))


_LIBRARY.impl("hstu_pointwise_attention", _forward_impl, "CPU")
_LIBRARY.impl("hstu_pointwise_attention_backward", _backward_impl, "CPU")
# the operators as the dispatcher knows them (the profiler and the flop counter key on them)
OPERATOR = torch.ops.malloc.hstu_pointwise_attention
BACKWARD = torch.ops.malloc.hstu_pointwise_attention_backward
# the inputs of the operator that have gradients, by position
_DIFFERENTIABLE = {"q": 0, "cached_keys": 1, "cached_values": 2, "new_keys": 6, "new_values": 7,
                   "position_bias": 12, "time_bias": 15}


class _Attention(torch.autograd.Function):
    """The operator with its gradient: the backward operator recomputes the scores from the saved inputs, so
    nothing of ``(T, S)`` size is kept between the two."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> torch.Tensor:
        ctx.save_for_backward(*(x if isinstance(x, torch.Tensor) else None for x in inputs))
        ctx.numbers = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        return OPERATOR(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = [number if tensor is None else tensor
                  for tensor, number in zip(ctx.saved_tensors, ctx.numbers, strict=True)]
        grads = dict(zip(_DIFFERENTIABLE.values(), BACKWARD(grad, *inputs), strict=True))
        return tuple(grads.get(index) for index in range(len(inputs)))


def _check_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], batch: int, new_keys: torch.Tensor,
                new_values: torch.Tensor, stored: int) -> None:
    """Raise ValueError unless each of the ``batch`` stored rows is a CPU float32 ``(Hk, n_b, d_k)`` keys and
    ``(Hk, n_b, d_v)`` values pair with ``n_b <= stored``."""
    if len(rows) != batch:
        raise ValueError(f"row_keys: expected {batch} rows (one per batch row), got {len(rows)}")
    key_heads, key_dim, value_dim = new_keys.shape[1], new_keys.shape[3], new_values.shape[3]
    for b, (keys, values) in enumerate(rows):
        count = keys.shape[1] if keys.dim() == 3 else -1
        for name, tensor, dim in (("row_keys", keys, key_dim), ("row_values", values, value_dim)):
            if (tensor.dtype != torch.float32 or not tensor.is_cpu or tensor.dim() != 3 or tensor.shape[0] != key_heads
                    or tensor.shape[1] != count or not 0 <= count <= stored or tensor.shape[2] != dim):
                raise ValueError(f"{name}[{b}]: expected a CPU float32 tensor of shape ({key_heads}, n <= {stored}, "
                                 f"{dim}) with as many keys as row_keys[{b}], got {tensor.dtype} "
                                 f"{tuple(tensor.shape)} on {tensor.device}")


def _check(q: torch.Tensor, cached: StoredKeys, new_keys: torch.Tensor, new_values: torch.Tensor,
           query_pos: torch.Tensor, query_time: torch.Tensor, is_history: torch.Tensor, tables: BucketTables,
           key_scale: torch.Tensor | None) -> None:
    """Raise ValueError unless the arguments have the dtypes, device and shapes the C code reads blindly."""
    batch, heads, length, key_dim = q.shape
    key_heads, value_dim = new_keys.shape[1], new_values.shape[3]
    stored, meta = cached.positions.shape[-1], (batch, cached.positions.shape[1])
    expected = (
        ("q", q, torch.float32, (batch, heads, length, key_dim)),
        ("new_keys", new_keys, torch.float32, (batch, key_heads, length, key_dim)),
        ("new_values", new_values, torch.float32, (batch, key_heads, length, value_dim)),
        ("query_pos", query_pos, torch.int64, (batch, length)),
        ("query_time", query_time, torch.int64, (batch, length)),
        ("is_history", is_history, torch.bool, (batch, length)),
        ("cached.keys", cached.keys, torch.float32, (batch, key_heads, stored, key_dim)),
        ("cached.values", cached.values, torch.float32, (batch, key_heads, stored, value_dim)),
        ("cached.positions", cached.positions, torch.int64, (*meta, stored)),
        ("cached.timestamps", cached.timestamps, torch.int64, (*meta, stored)),
        ("cached.valid", cached.valid, torch.bool, (*meta, stored)),
        ("position_thresholds", tables.position_thresholds, torch.int64, tuple(tables.position_bias.shape)),
        ("time_thresholds", tables.time_thresholds, torch.int64, tuple(tables.time_bias.shape)),
    )
    for name, tensor, dtype, shape in expected:
        if tensor.dtype != dtype or not tensor.is_cpu or tensor.shape != shape:
            raise ValueError(f"{name}: expected a CPU {dtype} tensor of shape {shape}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    if key_scale is not None and (not key_scale.is_floating_point() or not key_scale.is_cpu
                                  or key_scale.shape != (batch,)):
        raise ValueError(f"key_scale: expected a CPU floating tensor of shape ({batch},), got {key_scale.dtype} "
                         f"{tuple(key_scale.shape)} on {key_scale.device}")
    if heads % key_heads or heads % meta[1]:
        raise ValueError(f"heads: {heads} query heads are not a multiple of {key_heads} key heads "
                         f"and {meta[1]} metadata heads")
