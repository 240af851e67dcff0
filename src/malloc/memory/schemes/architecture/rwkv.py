"""RWKV-v4 time-mixing in place of attention (Peng et al., Findings of EMNLP 2023, arXiv 2305.13048).

Time-mix of a token with layer input ``h = LN(x)`` and token-shift input ``h'`` (the previous event's ``h``):
``k = W_k (mu_k h + (1 - mu_k) h')``, same for ``v`` and ``r``, and with per-channel decay ``w = exp(decay) > 0``
and bonus ``u``::

    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t})
    o_t = sigmoid(r_t) * wkv_t

- SASRec: the RWKV-v4 block, ``x + W_o TimeMix(LN x)`` then ``x + ChannelMix(LN x)`` (in place of the FFN):
  ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2`` with its own token shift; SASRec's input embeddings are unchanged.
- HSTU: HSTU's layer with the pointwise attention replaced: ``u = SiLU(W_u h)``, ``y = x + f2(LN(o) * u)`` (no
  FFN). The relative position/time bias is gone: the decay orders events (a time-aware decay is not implemented).

Serving rule (exact; the same in the training forward). The time-mix width is ``W = H d_k`` (``= D`` in the
default configs). A token at position ``p`` reads the state after the history events before ``p``, its token shift
is the input of the last such event (zeros before any), and it adds its own bonus term; only history tokens advance
the state. So a candidate reads the state without advancing it: in serving that is the stored state, in the
training forward (candidates after the history, at positions ``p``) the layer computes the state after every
history token and gathers, for each query, the one at its position.

Stored per layer (:class:`RecurrentState`), independent of the history length, in the state dtype: the WKV
numerator ``aa`` ``(W,)``, denominator ``bb`` ``(W,)`` and running max exponent ``pp`` ``(W,)`` (the numerically
stable form of RWKV-LM ``RWKV-v4/src/model_run.py``: ``aa = sum_i e^{k_i - (t-1-i) w - pp} v_i``), the time-mix
token-shift input ``(D,)`` and, for SASRec, the channel-mix one ``(D,)``: ``3W + 2D`` (SASRec) / ``3W + D`` (HSTU)
values per layer, ``5D`` / ``4D`` when ``W = D``.

Training runs the same stable recurrence as serving (:class:`WKVScan`: a loop over the time steps, vectorised over
batch and channels, with a hand-written backward, as RWKV-LM's kernel; a parallel log-space form loses precision
at ``t w`` of hundreds and a chunked one was several times slower on CPU). Prefill and append run it from the
stored state, so they agree with the full forward up to rounding.

No knob: the state size is fixed; any ``memory_ratio`` is accepted and results report the measured one. Cost:
the projections only (SASRec: the backbone's plus the channel-mix receptance ``D^2`` per layer; HSTU: the
backbone's); the recurrence is element-wise (``O(W)`` per token and layer) and not counted as MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.state import LayerView, StoredLayer, tensor_nbytes
from malloc.core.tokens import TokenBatch
from malloc.memory.architecture import DTYPE_BYTES, ArchitectureScheme
from malloc.memory.complexity import Complexity
from malloc.models import macs
from malloc.models.base import AttentionLayer, Dropout
from malloc.models.config import ModelConfig

# the empty state's max exponent (RWKV-LM's -1e30): finite, so that e^(empty - x) = 0 without inf - inf
EMPTY_EXPONENT = -1e30


@dataclass
class WKV:
    """WKV states of shape ``(..., W)``: ``num`` (aa), ``den`` (bb) and their common exponent ``top`` (pp)."""

    num: torch.Tensor
    den: torch.Tensor
    top: torch.Tensor

    def read(self, bonus: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``wkv`` of tokens with bonus exponent ``u + k`` and value ``v`` (both shaped like the state)."""
        top = torch.maximum(self.top, bonus)
        past, own = torch.exp(self.top - top), torch.exp(bonus - top)
        return (past * self.num + own * v) / (past * self.den + own)

    def gather(self, index: torch.Tensor) -> WKV:
        """``(B, S, W)`` states at ``index (B, T)`` -> ``(B, T, W)``."""
        rows = index[:, :, None].expand(-1, -1, self.num.shape[-1])
        return WKV(self.num.gather(1, rows), self.den.gather(1, rows), self.top.gather(1, rows))

    def at(self, step: int) -> WKV:
        """``(B, S, W)`` states -> the ``(B, W)`` state at ``step``."""
        return WKV(self.num[:, step], self.den[:, step], self.top[:, step])

    @staticmethod
    def empty(batch: int, width: int, like: torch.Tensor) -> WKV:
        zeros = like.new_zeros(batch, width)
        return WKV(zeros, zeros, torch.full_like(zeros, EMPTY_EXPONENT))


class WKVScan(torch.autograd.Function):
    """RWKV-v4's stable recurrence over the time axis, with a hand-written backward (RWKV-LM's CUDA kernel is
    the same sequential loop per channel); vectorised over batch and channels.

    For a history token ``t`` (others leave the state as it is), from the state ``(aa, bb, pp)`` before it::

        a = pp - w;  p = max(a, k_t);  aa' = e^(a - p) aa + e^(k_t - p) v_t;  bb' = e^(a - p) bb + e^(k_t - p);  pp' = p

    Inputs: ``k, v (B, T, W)``, ``decay`` ``w (W,)``, ``history (B, T)`` bool, the initial ``aa, bb, pp (B, W)``.
    Outputs: ``aa, bb, pp (B, T + 1, W)``, index ``t`` = the state after tokens ``0..t-1``. The loop stops after
    the batch's last history token (later states are copies: candidates after the history cost no steps).
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, history: torch.Tensor,  # type: ignore[override]
                num0: torch.Tensor, den0: torch.Tensor, top0: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, width = k.shape
        index = torch.arange(1, length + 1, device=k.device)
        steps = int((history * index).amax()) if length else 0  # tokens up to the last history token
        keys = k.masked_fill(~history[:, :, None], float("-inf"))  # e^(-inf - p) = 0: no contribution
        decays = history[:, :, None].to(k.dtype) * decay  # no decay across other tokens
        num, den, top = (k.new_empty(batch, length + 1, width) for _ in range(3))
        num[:, 0], den[:, 0], top[:, 0] = num0, den0, top0
        for t in range(steps):
            a = top[:, t] - decays[:, t]
            p = torch.maximum(a, keys[:, t])
            old, new = torch.exp(a - p), torch.exp(keys[:, t] - p)
            num[:, t + 1] = old * num[:, t] + new * v[:, t]
            den[:, t + 1] = old * den[:, t] + new
            top[:, t + 1] = p
        for state in (num, den, top):
            state[:, steps + 1:] = state[:, steps:steps + 1]
        ctx.steps = steps
        ctx.save_for_backward(keys, v, decays, history, num, den, top)
        return num, den, top

    @staticmethod
    def backward(ctx, g_num: torch.Tensor, g_den: torch.Tensor, g_top: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]:
        keys, v, decays, history, num, den, top = ctx.saved_tensors
        steps = ctx.steps
        g_k, g_v = torch.zeros_like(v), torch.zeros_like(v)
        g_decays = torch.zeros_like(v)
        # the states after the last step are copies of the one at `steps`
        gn, gd, gp = (g[:, steps:].sum(dim=1) for g in (g_num, g_den, g_top))
        for t in range(steps - 1, -1, -1):
            a = top[:, t] - decays[:, t]
            p = top[:, t + 1]
            old, new = torch.exp(a - p), torch.exp(keys[:, t] - p)
            g_v[:, t] = gn * new
            g_old = (gn * num[:, t] + gd * den[:, t]) * old  # d/d(a - p) of the old-state term
            g_new = (gn * v[:, t] + gd) * new  # d/d(k - p) of the new-event term
            g_p = gp - g_old - g_new
            from_old = a >= keys[:, t]  # p = max(a, k): its gradient goes to the larger
            g_a = g_old + torch.where(from_old, g_p, 0.0)
            g_k[:, t] = g_new + torch.where(from_old, 0.0, g_p)
            g_decays[:, t] = -g_a
            gn = gn * old + g_num[:, t]
            gd = gd * old + g_den[:, t]
            gp = g_a + g_top[:, t]
        g_k = g_k.masked_fill(~history[:, :, None], 0.0)
        g_decay = (g_decays * history[:, :, None]).sum(dim=(0, 1))
        return g_k, g_v, g_decay, None, gn, gd, gp


def wkv_states(k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, history: torch.Tensor, initial: WKV) -> WKV:
    """The state after each token: ``k, v (B, T, W)``, ``decay`` ``w (W,)``, ``history (B, T)`` bool (only history
    tokens enter the state, in time order), ``initial`` ``(B, W)`` -> ``(B, T + 1, W)``, index ``t`` = after
    tokens ``0..t-1`` (index 0: ``initial``)."""
    return WKV(*WKVScan.apply(k, v, decay, history, initial.num, initial.den, initial.top))


@dataclass
class ShiftPlan:
    """Which state and token-shift input each token reads.

    Attributes:
        state: ``(B, T)`` index into the states ``[initial; after token 0; ...]`` (:func:`wkv_states`): after the
            history tokens before the token's position.
        shift: ``(B, T)`` index into ``[stored shift input; token 0; ...]``: the last history token before it.
        last: ``(B,)`` the same index of the chunk's last history token (the shift input to store).
    """

    state: torch.Tensor
    shift: torch.Tensor
    last: torch.Tensor


def shift_plan(tokens: TokenBatch) -> ShiftPlan:
    """History tokens come in time order (positions increasing along the time axis)."""
    batch, length = tokens.shape
    history = tokens.is_history
    # latest history position up to each token (nondecreasing): the first token reaching p is the first whose
    # state includes an event at >= p, so every token before it holds exactly the events before p
    latest = torch.where(history, tokens.positions, -1).cummax(dim=1).values
    state = torch.searchsorted(latest.contiguous(), tokens.positions.contiguous())  # (B, T) in [0, T]
    arange = torch.arange(length, device=history.device).expand(batch, -1)
    last_before = torch.cat([torch.full_like(latest[:, :1], -1),
                             torch.where(history, arange, -1).cummax(dim=1).values], dim=1)  # (B, T + 1)
    return ShiftPlan(state, last_before.gather(1, state) + 1, last_before[:, -1] + 1)


def shifted(h: torch.Tensor, stored: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Token-shift inputs: ``h (B, T, D)``, ``stored (B, D)``, ``index (B, T)`` -> ``(B, T, D)``."""
    source = torch.cat([stored[:, None], h], dim=1)
    return source.gather(1, index[:, :, None].expand(-1, -1, h.shape[2]))


def mix_init(dim: int, power: float, offset: float = 0.0) -> nn.Parameter:
    """RWKV-v4's token-shift mix ``(i / D)^power + offset`` per channel (the layer-independent middle setting)."""
    return nn.Parameter((torch.arange(dim) / dim) ** power + offset)


class TimeMix(nn.Module):
    """RWKV-v4 time-mixing before its output map: ``h (B, T, D)`` -> ``sigmoid(r) * wkv`` ``(B, T, W)``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.mix_k, self.mix_v, self.mix_r = mix_init(dim, 0.5), mix_init(dim, 0.5, 0.15), mix_init(dim, 0.25)
        channel = torch.arange(width) / max(width - 1, 1)
        self.decay = nn.Parameter(-5.0 + 8.0 * channel ** 1.35)  # w = exp(decay): slow to fast forgetting
        self.bonus = nn.Parameter(math.log(0.3) + ((torch.arange(width) + 1) % 3 - 1) * 0.5)  # u
        self.key = nn.Linear(dim, width, bias=False)
        self.value = nn.Linear(dim, width, bias=False)
        self.receptance = nn.Linear(dim, width, bias=False)

    def forward(self, h: torch.Tensor, previous: torch.Tensor, tokens: TokenBatch, plan: ShiftPlan,
                initial: WKV) -> tuple[torch.Tensor, WKV]:
        """Returns ``sigmoid(r) * wkv`` ``(B, T, W)`` and the state after the chunk's history ``(B, W)``."""
        k = self.key(h * self.mix_k + previous * (1 - self.mix_k))
        v = self.value(h * self.mix_v + previous * (1 - self.mix_v))
        r = self.receptance(h * self.mix_r + previous * (1 - self.mix_r))
        states = wkv_states(k, v, torch.exp(self.decay), tokens.is_history, initial)
        wkv = states.gather(plan.state).read(self.bonus + k, v)
        return torch.sigmoid(r) * wkv, states.at(-1)


class ChannelMix(nn.Module):
    """RWKV-v4 channel-mixing: ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mix_k, self.mix_r = mix_init(dim, 0.5), mix_init(dim, 0.5)
        self.key = nn.Linear(dim, hidden, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(self, h: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        k = torch.relu(self.key(h * self.mix_k + previous * (1 - self.mix_k))) ** 2
        return torch.sigmoid(self.receptance(h * self.mix_r + previous * (1 - self.mix_r))) * self.value(k)


def owned_row(batch: torch.Tensor, user: int, dtype: torch.dtype) -> torch.Tensor:
    """Row ``user`` of a ``(B, X)`` batch tensor as a compact ``(X,)`` copy in ``dtype``.

    The batch's WKV states are views into the scan's ``(B, T + 1, W)`` buffers (:meth:`WKV.at`), and
    :meth:`RecurrentHooks.store` keeps the new state as it is: a view would keep the whole batch's buffer alive
    for every user (eight users reported 18.5 KB and kept 557 KB), so the stored row is always a copy.
    """
    return batch[user].to(dtype, copy=True, memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class RecurrentState:
    """One user's stored layer.

    Attributes:
        num, den, top: ``(W,)`` WKV numerator ``aa``, denominator ``bb``, max exponent ``pp``.
        time_shift: ``(D,)`` the last event's time-mix input; channel_shift: ``(D,)`` its channel-mix input
            (SASRec), or None (HSTU).
    """

    num: torch.Tensor
    den: torch.Tensor
    top: torch.Tensor
    time_shift: torch.Tensor
    channel_shift: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return 1  # one recurrent state, whatever the history

    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in (self.num, self.den, self.top, self.time_shift, self.channel_shift))

    def read(self) -> LayerView:
        raise TypeError("rwkv: the stored layer is a recurrent state, not per-event keys and values")


@dataclass
class RecurrentBatch:
    """Recurrent states of a batch of users (``(B, W)`` WKV, ``(B, D)`` shift inputs): what a layer reads from
    the store, and what a chunk's history leaves (the state to store)."""

    wkv: WKV
    time_shift: torch.Tensor
    channel_shift: torch.Tensor | None


class RecurrentHooks:
    """State hooks shared by both backbones' RWKV layers."""

    dim: int
    width: int
    channel_mix_state: bool
    plain_kv = False

    def empty_state(self, dtype: torch.dtype, device: torch.device) -> RecurrentState:
        zeros = torch.zeros(self.width, dtype=dtype, device=device)
        shift = torch.zeros(self.dim, dtype=dtype, device=device)
        return RecurrentState(zeros, zeros.clone(), torch.full_like(zeros, EMPTY_EXPONENT), shift,
                              shift.clone() if self.channel_mix_state else None)

    def collate(self, stored: list[StoredLayer], dtype: torch.dtype) -> RecurrentBatch:
        assert all(isinstance(s, RecurrentState) for s in stored)

        def stack(field: str) -> torch.Tensor:
            return torch.stack([getattr(s, field) for s in stored]).to(dtype)

        # clamp: a low-precision state dtype may have stored the empty exponent as -inf
        wkv = WKV(stack("num"), stack("den"), stack("top").clamp(min=EMPTY_EXPONENT))
        return RecurrentBatch(wkv, stack("time_shift"), stack("channel_shift") if self.channel_mix_state else None)

    def new_state(self, new: RecurrentBatch, tokens: TokenBatch, user: int, count: int, dtype: torch.dtype
                  ) -> RecurrentState:
        """User ``user``'s row of the batch's states, each a compact copy of its own (:func:`owned_row`)."""
        return RecurrentState(owned_row(new.wkv.num, user, dtype), owned_row(new.wkv.den, user, dtype),
                              owned_row(new.wkv.top, user, dtype), owned_row(new.time_shift, user, dtype),
                              None if new.channel_shift is None else owned_row(new.channel_shift, user, dtype))

    def store(self, stored: StoredLayer, new: StoredLayer) -> StoredLayer:
        """The state after the new events replaces the stored one."""
        return new

    def start(self, h: torch.Tensor, cache: RecurrentBatch | None) -> RecurrentBatch:
        """The stored states, or the empty state (training)."""
        if cache is not None:
            return cache
        batch = h.shape[0]
        zeros = h.new_zeros(batch, self.dim)
        return RecurrentBatch(WKV.empty(batch, self.width, h), zeros, zeros if self.channel_mix_state else None)


class HSTURWKVLayer(RecurrentHooks, AttentionLayer):
    """HSTU's layer with RWKV time-mixing: ``y = x + f2(LN(sigmoid(r) * wkv) * SiLU(W_u LN(x)))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = self.kv_heads = cfg.heads
        self.key_dim = self.value_dim = cfg.head_dim
        self.dim, self.width, self.channel_mix_state = cfg.dim, cfg.heads * cfg.head_dim, False
        self.input_norm = nn.LayerNorm(cfg.dim)
        self.gate = nn.Linear(cfg.dim, self.width)
        self.time_mix = TimeMix(cfg.dim, self.width)
        self.output_norm = nn.LayerNorm(self.width)
        self.output = nn.Linear(self.width, cfg.dim)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: TokenBatch, cache: RecurrentBatch | None, need_weights: bool = False
                ) -> tuple[torch.Tensor, RecurrentBatch, None]:
        plan, before = shift_plan(tokens), self.start(x, cache)
        h = self.input_norm(x)
        mixed, wkv = self.time_mix(h, shifted(h, before.time_shift, plan.shift), tokens, plan, before.wkv)
        y = x + self.dropout(self.output(self.output_norm(mixed) * F.silu(self.gate(h))))
        return y, RecurrentBatch(wkv, shifted(h, before.time_shift, plan.last[:, None])[:, 0], None), None


class SASRecRWKVLayer(RecurrentHooks, AttentionLayer):
    """The RWKV-v4 block: ``x + W_o TimeMix(LN x)``, then ``x + ChannelMix(LN x)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = self.kv_heads = cfg.heads
        self.key_dim = self.value_dim = cfg.head_dim
        self.dim, self.width, self.channel_mix_state = cfg.dim, cfg.heads * cfg.head_dim, True
        self.attention_norm = nn.LayerNorm(cfg.dim)
        self.time_mix = TimeMix(cfg.dim, self.width)
        self.output = nn.Linear(self.width, cfg.dim, bias=False)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.channel_mix = ChannelMix(cfg.dim, cfg.ffn_mult * cfg.dim)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, tokens: TokenBatch, cache: RecurrentBatch | None, need_weights: bool = False
                ) -> tuple[torch.Tensor, RecurrentBatch, None]:
        plan, before = shift_plan(tokens), self.start(x, cache)
        assert before.channel_shift is not None
        h = self.attention_norm(x)
        mixed, wkv = self.time_mix(h, shifted(h, before.time_shift, plan.shift), tokens, plan, before.wkv)
        x = x + self.dropout(self.output(mixed))
        g = self.ffn_norm(x)
        x = x + self.dropout(self.channel_mix(g, shifted(g, before.channel_shift, plan.shift)))
        last = plan.last[:, None]
        after = RecurrentBatch(wkv, shifted(h, before.time_shift, last)[:, 0],
                               shifted(g, before.channel_shift, last)[:, 0])
        return x, after, None


@dataclass(frozen=True)
class RWKV(ArchitectureScheme):
    """RWKV-v4 time-mixing (and, for SASRec, channel-mixing) in place of attention; no knob (fixed state)."""

    name: ClassVar[str] = "rwkv"
    granularity: ClassVar[str] = "architecture"
    summary: ClassVar[str] = "RWKV-v4 recurrence in place of attention: a constant 4D-5D floats per layer"
    complexity: ClassVar[Complexity] = Complexity("5 L d b (fixed)", "L (t + c) d^2 (no attention)",
                                                  "none (fixed state)")
    ratio_knob: ClassVar[bool] = False

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        return HSTURWKVLayer(cfg) if cfg.backbone == "hstu" else SASRecRWKVLayer(cfg)

    def knob_values(self, cfg: ModelConfig) -> dict[str, int]:
        return {}

    def state_bytes(self, cfg: ModelConfig, history_len: int) -> int:
        """``L (3W + D) b`` (HSTU) or ``L (3W + 2D) b`` (SASRec), whatever the history length."""
        shifts = 1 if cfg.backbone == "hstu" else 2
        return cfg.layers * (3 * cfg.heads * cfg.head_dim + shifts * cfg.dim) * DTYPE_BYTES[cfg.state_dtype]

    def stored_keys(self, cfg: ModelConfig, history_len: int) -> float:
        return 0.0  # nothing is read key by key

    def token_macs(self, cfg: ModelConfig) -> float:
        """HSTU: the backbone's (``u, k, v, r`` then ``f2``); SASRec: the backbone's plus the channel-mix
        receptance ``D^2`` per layer."""
        extra = 0 if cfg.backbone == "hstu" else cfg.layers * cfg.dim * cfg.dim
        return macs.token_macs(cfg) + extra

    def attention_macs(self, cfg: ModelConfig, queries: float, keys: float) -> float:
        return 0.0  # the WKV recurrence is element-wise
