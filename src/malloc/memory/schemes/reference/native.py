"""Native: the full cache, the reference every memory ratio is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from malloc.memory.policy import CachePolicy, SchemeError


@dataclass(frozen=True)
class Native(CachePolicy):
    """Keeps every key and value of every stored event, per layer and head (``memory_ratio`` must be 1).

    Memory: ``L n (H (d_k + d_v) b + 12)`` bytes (keys, values, an int32 position and an int64 timestamp per event).
    """

    name: ClassVar[str] = "native"
    granularity: ClassVar[str] = "reference"
    summary: ClassVar[str] = "every key and value of every stored event (the reference)"
    keeps_everything: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_ratio != 1.0:
            raise SchemeError(f"native: memory_ratio is always 1 (it is the reference), got {self.memory_ratio}")
