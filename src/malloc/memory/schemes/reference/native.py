"""Native: the full cache, the reference every memory ratio is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from malloc.memory.complexity import NATIVE_REQUEST, Complexity
from malloc.memory.knobs import knob
from malloc.memory.policy import CachePolicy


@dataclass(frozen=True)
class Native(CachePolicy):
    """Keeps every key and value of every stored event, per layer and head (``memory_ratio`` must be 1).

    Memory: ``L n (H (d_k + d_v) b + 12)`` bytes (keys, values, an int32 position and an int64 timestamp per event).
    """

    memory_ratio: float = knob(1.0, float, choices=(1.0,), why="it is the reference")

    name: ClassVar[str] = "native"
    granularity: ClassVar[str] = "reference"
    summary: ClassVar[str] = "every key and value of every stored event (the reference)"
    complexity: ClassVar[Complexity] = Complexity("2 L n d b", NATIVE_REQUEST, "none (mr = 1)")
    keeps_everything: ClassVar[bool] = True
