"""GQA: grouped-query attention (Ainslie et al., EMNLP 2023, arXiv 2305.13245).

Each of ``G`` stored key/value heads serves ``H / G`` query heads; only the ``G`` heads are stored. HSTU projects
``[u, v, q, k]`` with one matrix: only the ``v`` and ``k`` slices shrink (``u`` and ``q`` are never stored).
Trained from scratch with the scheme (no mean-pooling of a trained MHA model).

Stored per event and layer: ``G (d_k + d_v)`` values plus a position and a timestamp (Native: ``H (d_k + d_v)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from malloc.memory.architecture import ArchitectureScheme, check_divides
from malloc.memory.complexity import NATIVE_REQUEST, Complexity
from malloc.memory.knobs import knob
from malloc.models import macs
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTULayer
from malloc.models.sasrec import SASRecLayer


def largest_divisor_at_most(whole: int, limit: float) -> int:
    """The largest divisor of ``whole`` that is ``<= max(1, limit)``."""
    return max(d for d in range(1, whole + 1) if whole % d == 0 and d <= max(1.0, limit + 1e-9))


def grouped_layer(cfg: ModelConfig, kv_heads: int) -> AttentionLayer:
    """The backbone's own layer with ``kv_heads`` stored heads."""
    layer = HSTULayer if cfg.backbone == "hstu" else SASRecLayer
    return layer(cfg, kv_heads=kv_heads)


def grouped_token_macs(cfg: ModelConfig, kv_heads: int) -> float:
    """Per-token projection MACs with ``kv_heads`` key/value heads: the K and V slices shrink by ``kv_heads / H``."""
    saved = 2 * (cfg.heads - kv_heads) * cfg.head_dim * cfg.dim
    return macs.token_macs(cfg) - cfg.layers * saved


@dataclass(frozen=True)
class GQA(ArchitectureScheme):
    """Grouped-query attention.

    Attributes:
        groups: stored key/value heads ``G`` (a divisor of the query heads ``H``); None = from the ratio:
            the largest divisor of ``H`` that is at most ``memory_ratio * H`` (at least 1, so ratios below
            ``1 / H`` reach only ``1 / H``; the measured ratio says so).
    """

    groups: int | None = knob(None, int, low=1, optional=True)

    name: ClassVar[str] = "gqa"
    granularity: ClassVar[str] = "head"
    summary: ClassVar[str] = "G key/value heads shared by groups of query heads (G = ratio x H)"
    complexity: ClassVar[Complexity] = Complexity("2 L n G (d / H) b", NATIVE_REQUEST + " (K, V projections x G / H)",
                                                  "G = mr H")

    def kv_heads(self, cfg: ModelConfig) -> int:
        """``G``: the knob, checked to divide ``H`` (a model size, so not by the declaration), or the ratio rule."""
        if self.groups is None:
            return largest_divisor_at_most(cfg.heads, self.memory_ratio * cfg.heads)
        check_divides(self.name, "groups", self.groups, cfg.heads, "model.heads")
        return self.groups

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        return grouped_layer(cfg, self.kv_heads(cfg))

    def knob_values(self, cfg: ModelConfig) -> dict[str, int]:
        return {"groups": self.kv_heads(cfg)}

    def token_macs(self, cfg: ModelConfig) -> float:
        return grouped_token_macs(cfg, self.kv_heads(cfg))
