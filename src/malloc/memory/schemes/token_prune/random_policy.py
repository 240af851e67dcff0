"""Random eviction: keep a uniformly random subset of events, the sanity floor every scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc.core.state import LayerState
from malloc.core.stats import LayerStats
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.knobs import knob
from malloc.memory.policy import EvictionPolicy, LayerContext

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 increment
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # splitmix64 finaliser multipliers


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores (arithmetic wraps modulo 2^64)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, elementwise on int64 (a bijection that scrambles every bit)."""
    x = (x ^ _shift(x, 30)) * _int64(_MIX[0])
    x = (x ^ _shift(x, 27)) * _int64(_MIX[1])
    return x ^ _shift(x, 31)


def event_uniforms(seed: int, layer: int, positions: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
    """A fixed uniform in ``[0, 1)`` per event: a hash of (seed, layer, position, timestamp).

    Args:
        positions: ``(S, n)`` int; timestamps: ``(S, n)`` int64.
    Returns:
        ``(S, n)`` float64, the same for the same event whatever the batch, the chunking or the other events.
    """
    key = _mix(torch.full_like(timestamps, _int64(seed * _GOLDEN + layer)) + _int64(_GOLDEN))
    key = _mix(key ^ positions.long())
    key = _mix(key ^ timestamps)
    return _shift(key, 11).double() / float(1 << 53)


@dataclass(frozen=True)
class Random(EvictionPolicy):
    """Keeps ``B`` events chosen at random, the same for every head of a layer; the sanity floor.

    Every event gets a fixed uniform score, a hash of ``(seed, layer, original position, timestamp)`` (so users
    with different histories get different draws, and nothing depends on the batch, its order or the chunking);
    the top ``B`` are kept. At write that is a uniform random subset; on append the survivors keep their scores,
    so the kept set at any time is the top ``B`` of one random ranking of the events seen (no re-draw per append).
    One seed is one draw: average several seeds before comparing a scheme with it.

    Knobs:
        memory_ratio: ``B = floor(memory_ratio * n * native_token_bytes / kept_token_bytes)`` events (shared
            selection, so ``B = floor(memory_ratio * n)``).
        seed: integer seed of the draws (default 0).
    Shapes: keys ``(H, B, d_k)``, values ``(H, B, d_v)``, positions/timestamps ``(1, B)``.
    Reference: kvpress ``kvpress/presses/random_press.py``.
    """

    seed: int = knob(0, int)

    name: ClassVar[str] = "random"
    granularity: ClassVar[str] = "token-prune"
    summary: ClassVar[str] = "a random subset of events (the sanity floor)"
    complexity: ClassVar[Complexity] = Complexity("2 L B d b", kept_request("B"), "B = mr n")

    def score(self, layer: LayerState, stats: LayerStats | None, ctx: LayerContext) -> torch.Tensor:
        return event_uniforms(self.seed, ctx.layer, layer.positions[:1], layer.timestamps[:1])
