"""Backbones: HSTU and SASRec, each with a full forward and a stateful serving path."""

from __future__ import annotations

from malloc.models.base import Events, SequentialRecommender
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTU
from malloc.models.sasrec import SASRec

BACKBONES: dict[str, type[SequentialRecommender]] = {"hstu": HSTU, "sasrec": SASRec}


def build_model(cfg: ModelConfig, num_items: int) -> SequentialRecommender:
    """The backbone named by ``cfg.backbone`` with the attention scheme ``cfg.scheme``, for ``num_items`` items.

    Raises:
        SchemeError: an unknown scheme or a bad knob.
    """
    from malloc.memory.registry import build_architecture  # the schemes build on these modules: import late

    return BACKBONES[cfg.backbone](cfg, num_items, scheme=build_architecture(cfg))


__all__ = ["BACKBONES", "HSTU", "Events", "ModelConfig", "SASRec", "SequentialRecommender", "build_model"]
