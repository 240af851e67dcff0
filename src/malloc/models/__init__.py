"""Backbones: HSTU and SASRec, each with a full forward and a stateful serving path."""

from __future__ import annotations

from malloc.models.base import LayerScheme, SequentialRecommender
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTU
from malloc.models.sasrec import SASRec

BACKBONES: dict[str, type[SequentialRecommender]] = {"hstu": HSTU, "sasrec": SASRec}


def build_model(cfg: ModelConfig, num_items: int, scheme: LayerScheme | None = None) -> SequentialRecommender:
    """The backbone named by ``cfg.backbone`` for ``num_items`` items, its layers built by ``scheme`` (a trained-in
    architecture scheme, :mod:`malloc.memory.architecture`) or its own plain layers (None, Native).

    The scheme is built by the caller (``malloc.memory.registry.build_model_for`` builds both from a config), so
    that models import no memory scheme.

    Raises:
        ValueError: ``cfg`` names a trained-in scheme but none was given.
    """
    if scheme is None and cfg.scheme != "native":
        raise ValueError(f"model.scheme is {cfg.scheme!r}: pass its scheme (malloc.memory.registry.build_model_for)")
    return BACKBONES[cfg.backbone](cfg, num_items, scheme=scheme)


__all__ = ["BACKBONES", "HSTU", "ModelConfig", "SASRec", "SequentialRecommender", "build_model"]
