"""Trained-in architecture schemes: they change the attention layer, so the stored state changes with it.

An :class:`ArchitectureScheme` is a frozen dataclass registered by name in
``malloc.memory.schemes.ARCHITECTURES``. It turns the one budget vocabulary, ``memory_ratio`` (target stored
bytes / Native stored bytes for the same history), into its own knob by a rule its docstring states, and builds
the layer of either backbone (HSTU or SASRec). The model is trained with the scheme (``malloc train --scheme``),
and its own prefill + append + score equals its own full forward (tested), unless the docstring says why not.

Schemes whose layers store plain per-event keys and values (``plain_kv``: MQA, GQA, MLA) can be combined with
the training-free cache policies (e.g. GQA + KIVI, MLA + H2O); the others keep a state of their own.

Knobs are declared on the dataclass fields (:mod:`malloc.memory.knobs`) and checked once, in
:meth:`ArchitectureScheme.__post_init__`; checks against the model's sizes stay in the scheme (``knob_values``).
Each scheme states its complexity formulas on its own class (``complexity``, :mod:`malloc.memory.complexity`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from malloc.core.tokens import TokenBatch
from malloc.memory.complexity import Complexity
from malloc.memory.knobs import SchemeError, check_knobs, knob
from malloc.models import macs
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig

TRAINED_IN = "trained-in"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def native_event_bytes(cfg: ModelConfig) -> int:
    """Bytes a Native layer of ``cfg``'s size stores per event: every head's key and value in the state dtype,
    an int32 position and an int64 timestamp."""
    return cfg.heads * 2 * cfg.head_dim * DTYPE_BYTES[cfg.state_dtype] + 4 + 8


@dataclass(frozen=True)
class ArchitectureScheme:
    """Base of the trained-in schemes.

    Attributes:
        memory_ratio: target stored bytes / Native stored bytes, in (0, 1].
    """

    memory_ratio: float = knob(1.0, float, low=0.0, high=1.0, open_low=True)

    name: ClassVar[str] = ""
    granularity: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    complexity: ClassVar[Complexity | None] = None  # each registered scheme states its own
    backbones: ClassVar[tuple[str, ...]] = ("hstu", "sasrec")
    # False for schemes whose state size no knob sets (MQA, RWKV, ...): sweeps train them once, not per ratio
    ratio_knob: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_knobs(self)

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        """The attention layer of ``cfg.backbone`` with this scheme."""
        raise NotImplementedError

    def expand(self, tokens: TokenBatch) -> tuple[TokenBatch, torch.Tensor | None]:
        """Tokens the layers process, and the index ``(B, T)`` of the given tokens among them (None: the same).

        Schemes that add tokens of their own (beacons) override this; the others process the tokens as given.
        """
        return tokens, None

    def knob_values(self, cfg: ModelConfig) -> dict[str, Any]:
        """The knobs in force for ``cfg`` after the ratio rule (what results report)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "memory_ratio"}

    # -- analytic cost: what the tests check against nbytes() and the FLOP counter ------------------------------
    def state_bytes(self, cfg: ModelConfig, history_len: int) -> int:
        """Bytes all layers store for a user after ``history_len`` events (without the last hidden state and
        the scalar bookkeeping that every state has). Default: ``L n (kv_heads (d_k + d_v) b + 12)``."""
        layer = self.build_layer(cfg)
        per_event = layer.kv_heads * (layer.key_dim + layer.value_dim) * DTYPE_BYTES[cfg.state_dtype] + 4 + 8
        return cfg.layers * history_len * per_event

    def stored_keys(self, cfg: ModelConfig, history_len: int) -> float:
        """Stored keys a query reads after ``history_len`` events (default: all of them)."""
        return float(history_len)

    def append_tokens(self, cfg: ModelConfig, history_len: int, new_events: int) -> float:
        """Tokens the layers process when ``new_events`` events are appended after ``history_len`` (default: the
        events; a scheme that adds tokens of its own, such as beacons when a chunk closes, counts them)."""
        return float(new_events)

    def token_macs(self, cfg: ModelConfig) -> float:
        """Projection (and feed-forward) MACs of one token through all layers (default: the backbone's)."""
        return macs.token_macs(cfg)

    def attention_macs(self, cfg: ModelConfig, queries: float, keys: float) -> float:
        """MACs of ``queries`` queries reading ``keys`` keys, all layers (default: the backbone's)."""
        return macs.attention_macs(cfg, queries, keys)


def check_divides(scheme: str, name: str, value: int, whole: int, what: str) -> None:
    """A knob that must divide a model size (checked against the model, so not by the declaration).

    Raises:
        SchemeError: naming the scheme, the knob, the size and the value.
    """
    if value < 1 or whole % value:
        raise SchemeError(f"{scheme}: knob {name}={value} must be a positive divisor of {what} ({whole})")
