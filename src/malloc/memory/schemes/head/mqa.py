"""MQA: multi-query attention (Shazeer 2019, arXiv 1911.02150): one key/value head shared by all query heads.

GQA with ``G = 1``; its ratio is fixed near ``1 / H`` whatever ``memory_ratio`` asks (the measured ratio is
reported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from malloc.memory.architecture import ArchitectureScheme
from malloc.memory.complexity import NATIVE_REQUEST, Complexity
from malloc.memory.schemes.head.gqa import grouped_layer, grouped_token_macs
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig


@dataclass(frozen=True)
class MQA(ArchitectureScheme):
    """Multi-query attention (no knob: one stored head)."""

    name: ClassVar[str] = "mqa"
    granularity: ClassVar[str] = "head"
    summary: ClassVar[str] = "one key/value head shared by every query head (fixed ratio ~ 1/H)"
    complexity: ClassVar[Complexity] = Complexity("2 L n (d / H) b", NATIVE_REQUEST + " (K, V projections / H)",
                                                  "fixed (mr = 1 / H)")
    ratio_knob: ClassVar[bool] = False

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        return grouped_layer(cfg, 1)

    def token_macs(self, cfg: ModelConfig) -> float:
        return grouped_token_macs(cfg, 1)
