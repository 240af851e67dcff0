"""HSTU's pointwise attention as one compiled CPU kernel, forward and backward, float32: ``hstu_attention.c``.

It computes the outputs of ``malloc.models.hstu.hstu_attention`` with its default mask (a key is seen when it is
valid and earlier, and each query sees itself) and its relative bias, reading every ``(query, key)`` pair once: no
``(T, S)`` bias, mask or score tensor exists. Its gradients recompute the scores. The reference stays the oracle
(tests/test_kernels.py) and the path for other dtypes, other masks, attention weights and GPUs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

from malloc.kernels.build import load

SOURCE = "hstu_attention.c"
# below this many (query, key, head) triples a call runs on the calling thread alone
PARALLEL_MIN_WORK = 1 << 18

_POINTER, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_TABLES = [_POINTER, _POINTER, _INT, _INT] * 2  # bias, thresholds, buckets, octave: position, then time
# the C signatures: sizes, tensors, positions and times, key metadata and scale, tables, alpha, 1 / N, outputs,
# threads
_SIGNATURES = {
    "hstu_attention": [_INT] * 9 + [_POINTER] * 3 + [_POINTER] * 6 + _TABLES + [_FLOAT, _FLOAT, _POINTER, _INT],
    "hstu_attention_backward": [_INT] * 9 + [_POINTER] * 5 + [_POINTER] * 6 + _TABLES
                               + [_FLOAT, _FLOAT] + [_POINTER] * 6 + [_INT],
}


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


def pointwise_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor,
                        query_time: torch.Tensor, key_pos: torch.Tensor, key_time: torch.Tensor,
                        key_valid: torch.Tensor, cached: int, key_scale: torch.Tensor | None, tables: BucketTables,
                        alpha: float, normaliser: float) -> torch.Tensor:
    """HSTU attention of new tokens over ``[cached; new]`` keys with the default mask, by the C kernel.

    It runs as the operator ``torch.ops.malloc.hstu_pointwise_attention`` (with its gradient), so that the
    profiler names it and :func:`malloc.models.macs.count_flops` counts it. The query rows are split over up to
    ``torch.get_num_threads()`` threads when the call is large enough (:func:`_workers`).

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
    return _Attention.apply(
        q, keys, values, query_pos, query_time, key_pos, key_time, key_valid, cached, key_scale,
        tables.position_bias, tables.position_thresholds, tables.position_octave,
        tables.time_bias, tables.time_thresholds, tables.time_octave, alpha, normaliser)


def _workers(count: int, work: int) -> int:
    """Threads for a call of ``count`` rows and ``work`` (query, key, head) triples: up to
    ``torch.get_num_threads()``, one per :data:`PARALLEL_MIN_WORK` of work. The C code runs them as an OpenMP team
    of PyTorch's own runtime (threads of a separate pool would compete with PyTorch's, which spin between its
    operators)."""
    return max(1, min(torch.get_num_threads(), count, work // PARALLEL_MIN_WORK or 1))


@dataclass
class _Call:
    """One call's tensors as the C code reads them (contiguous, float32 tables), and its sizes."""

    q: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    query_pos: torch.Tensor
    query_time: torch.Tensor
    key_pos: torch.Tensor
    key_time: torch.Tensor
    key_valid: torch.Tensor
    scale: torch.Tensor | None
    position_bias: torch.Tensor
    position_thresholds: torch.Tensor
    time_bias: torch.Tensor
    time_thresholds: torch.Tensor

    @classmethod
    def of(cls, *tensors: torch.Tensor | None) -> _Call:
        (q, keys, values, query_pos, query_time, key_pos, key_time, key_valid, scale, position_bias,
         position_thresholds, time_bias, time_thresholds) = tensors
        return cls(*(None if t is None else t.detach().contiguous() for t in (
            q, keys, values, query_pos, query_time, key_pos, key_time, key_valid,
            None if scale is None else scale.to(torch.float32), position_bias.to(torch.float32),
            position_thresholds, time_bias.to(torch.float32), time_thresholds)))

    def sizes(self, cached: int) -> tuple[int, ...]:
        """``B, H, Hk, Hm, T, S, n, d_k, d_v``."""
        batch, heads, length, key_dim = self.q.shape
        return (batch, heads, self.values.shape[1], self.key_pos.shape[1], length, self.keys.shape[2], cached,
                key_dim, self.values.shape[3])

    def metadata(self) -> tuple[int | None, ...]:
        """Pointers of the positions, times, key metadata and scale."""
        return (self.query_pos.data_ptr(), self.query_time.data_ptr(), self.key_pos.data_ptr(),
                self.key_time.data_ptr(), self.key_valid.data_ptr(),
                None if self.scale is None else self.scale.data_ptr())

    def tables(self, position_octave: int, time_octave: int) -> tuple[int, ...]:
        """Pointers and sizes of the bias tables and their thresholds."""
        return (self.position_bias.data_ptr(), self.position_thresholds.data_ptr(), self.position_bias.shape[0],
                position_octave, self.time_bias.data_ptr(), self.time_thresholds.data_ptr(),
                self.time_bias.shape[0], time_octave)


def _prepare(cached: int, *tensors: torch.Tensor | None) -> tuple[ctypes.CDLL, _Call, tuple[int, ...]]:
    """The loaded library, the call's tensors as the C code reads them, and its sizes (:meth:`_Call.sizes`)."""
    library = _library()
    if library is None:
        raise RuntimeError(f"the C kernel {SOURCE} is not available")
    call = _Call.of(*tensors)
    return library, call, call.sizes(cached)


# The operators, defined with torch.library's plain registration API (torch.library.custom_op would import
# torch._dynamo on the first call: seconds), so that the profiler names them and the flop counter sees them.
_ARGUMENTS = ("Tensor q, Tensor keys, Tensor values, Tensor query_pos, Tensor query_time, Tensor key_pos, "
              "Tensor key_time, Tensor key_valid, int cached, Tensor? key_scale, Tensor position_bias, "
              "Tensor position_thresholds, int position_octave, Tensor time_bias, Tensor time_thresholds, "
              "int time_octave, float alpha, float normaliser")
_LIBRARY = torch.library.Library("malloc", "DEF")
_LIBRARY.define(f"hstu_pointwise_attention({_ARGUMENTS}) -> Tensor")
_LIBRARY.define(f"hstu_pointwise_attention_backward(Tensor grad, {_ARGUMENTS}) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _forward_impl(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor,
                  query_time: torch.Tensor, key_pos: torch.Tensor, key_time: torch.Tensor, key_valid: torch.Tensor,
                  cached: int, key_scale: torch.Tensor | None, position_bias: torch.Tensor,
                  position_thresholds: torch.Tensor, position_octave: int, time_bias: torch.Tensor,
                  time_thresholds: torch.Tensor, time_octave: int, alpha: float, normaliser: float) -> torch.Tensor:
    library, call, sizes = _prepare(cached, q, keys, values, query_pos, query_time, key_pos, key_time, key_valid,
                                    key_scale, position_bias, position_thresholds, time_bias, time_thresholds)
    batch, heads, _, _, length, width, _, _, value_dim = sizes
    keys_t = call.keys.transpose(-1, -2).contiguous()
    out = torch.empty(batch, length, heads, value_dim, dtype=torch.float32)
    status = library.hstu_attention(*sizes, call.q.data_ptr(), keys_t.data_ptr(), call.values.data_ptr(),
                                    *call.metadata(), *call.tables(position_octave, time_octave), alpha,
                                    1.0 / normaliser, out.data_ptr(),
                                    _workers(batch * length, batch * length * width * heads))
    if status:
        raise RuntimeError(f"the C kernel {SOURCE} could not allocate its buffers")
    return out


def _backward_impl(grad: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   query_pos: torch.Tensor, query_time: torch.Tensor, key_pos: torch.Tensor, key_time: torch.Tensor,
                   key_valid: torch.Tensor, cached: int, key_scale: torch.Tensor | None, position_bias: torch.Tensor,
                   position_thresholds: torch.Tensor, position_octave: int, time_bias: torch.Tensor,
                   time_thresholds: torch.Tensor, time_octave: int, alpha: float, normaliser: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the forward in q, keys, values, position_bias and time_bias, given ``grad`` of its
    output. Batch rows are split over threads (each row's key and value gradients are its own); each thread sums
    the bias gradients in float64, and the threads' sums are added at the end."""
    library, call, sizes = _prepare(cached, q, keys, values, query_pos, query_time, key_pos, key_time, key_valid,
                                    key_scale, position_bias, position_thresholds, time_bias, time_thresholds)
    batch, heads, _, _, length, width, _, _, _ = sizes
    grad = grad.detach().to(torch.float32).contiguous()
    keys_t, values_t = (x.transpose(-1, -2).contiguous() for x in (call.keys, call.values))
    dq, dkeys, dvalues = torch.empty_like(call.q), torch.zeros_like(call.keys), torch.zeros_like(call.values)
    workers = _workers(batch, batch * length * width * heads)
    dposition = torch.zeros(workers, call.position_bias.shape[0], dtype=torch.float64)
    dtime = torch.zeros(workers, call.time_bias.shape[0], dtype=torch.float64)
    status = library.hstu_attention_backward(
        *sizes, call.q.data_ptr(), keys_t.data_ptr(), call.keys.data_ptr(), values_t.data_ptr(),
        call.values.data_ptr(), *call.metadata(), *call.tables(position_octave, time_octave), alpha,
        1.0 / normaliser, grad.data_ptr(), dq.data_ptr(), dkeys.data_ptr(), dvalues.data_ptr(),
        dposition.data_ptr(), dtime.data_ptr(), workers)
    if status:
        raise RuntimeError(f"the C kernel {SOURCE} could not allocate its buffers")
    return (dq, dkeys, dvalues, dposition.sum(0).to(position_bias.dtype), dtime.sum(0).to(time_bias.dtype))


_LIBRARY.impl("hstu_pointwise_attention", _forward_impl, "CPU")
_LIBRARY.impl("hstu_pointwise_attention_backward", _backward_impl, "CPU")
# the operators as the dispatcher knows them (the profiler and the flop counter key on them)
OPERATOR = torch.ops.malloc.hstu_pointwise_attention
BACKWARD = torch.ops.malloc.hstu_pointwise_attention_backward
# the inputs of the operator that have gradients, by position
_DIFFERENTIABLE = {"q": 0, "keys": 1, "values": 2, "position_bias": 10, "time_bias": 13}


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
