"""Longformer: causal sliding window plus global tokens (Beltagy, Peters, Cohan 2020, arXiv 2004.05150).

Trained with the scheme. Serving rule (exact under caching, and the same mask in training): the ``g`` globals are
the user's first ``g`` events (positions ``0 .. g-1``), visible to every later token; a query at position ``p``
sees the keys at positions ``[p - w, p)`` and ``< g``, plus itself (the mask rule of ``malloc.core.tokens``), in every
layer. Candidates, placed at ``p = n``, read the same set. Since no later query can see an event that has left the
window, the stored state after each append is exactly the globals plus the last ``w`` events, and prefill +
appends + score equal the full forward.

Differences from the paper: the globals are ordinary history events, not extra task tokens, and in a causal model
their queries see only earlier events (all of them: every key ``< g`` is visible to all), so no global has to be
refreshed on append (a global that sees later events, as in the paper, would change every time an event
arrives, so its stored key and value could not be kept); no dilation. Older events still reach later tokens through the
deeper layers' window states (receptive field about ``L w``): the "implicit merge" MALLOC files it under.

Stored per layer: a :class:`LayerState` of ``m = min(n, w + g)`` events: keys ``(H, m, d_k)``, values
``(H, m, d_v)``, positions ``(1, m)`` int32 (the window and HSTU's bias need them), timestamps ``(1, m)`` int64.

Knobs: ``globals`` ``g`` (default 2) and ``window`` ``w``; the ratio rule is ``w + g = floor(memory_ratio x
max_len)`` (``w`` at least 1), with ``max_len`` the model's training window: the trained mask cannot depend on each
user's history length ``n``. So the measured ratio ``min(n, w + g) / n`` depends on ``n``: equal to the target at
``n = max_len``, 1 for histories shorter than ``w + g`` and below the target for longer ones.

``plain_kv`` is False: the stored events are plain keys and values, but the window rule lives in :meth:`store`,
which a training-free policy's ``merge`` replaces on append; composed with a policy the window would not be kept
(a policy would store events no query can see, or quantize a state that grows without bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from malloc.core.state import LayerState, StoredLayer
from malloc.core.tokens import KVBlock, TokenBatch, visibility
from malloc.memory.architecture import ArchitectureScheme, native_event_bytes
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.knobs import knob
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTULayer
from malloc.models.sasrec import SASRecLayer


def window_mask(tokens: TokenBatch, cache: KVBlock | None, window: int, num_globals: int) -> torch.Tensor:
    """Which keys ``[cache; new]`` fall in each query's window or among the globals.

    Args:
        tokens: the ``T`` new tokens (queries and new keys).
        cache: the cached block (``n`` keys, metadata ``(B, 1 or H, n)``), or None.
    Returns:
        ``(B, 1 or H, T, n + T)`` bool: key position at least ``p - window`` or below ``num_globals``, for a query
        at position ``p``; :func:`malloc.core.tokens.visibility` adds the causal part (``< p``, or the query itself).
    """
    key_pos = tokens.positions[:, None]  # (B, 1, T)
    if cache is not None:
        key_pos = torch.cat([cache.positions, key_pos.expand(-1, cache.positions.shape[1], -1)], dim=-1)
    key_pos = key_pos[:, :, None, :]  # (B, 1|H, 1, S)
    q_pos = tokens.positions[:, None, :, None]  # (B, 1, T, 1)
    return (key_pos >= q_pos - window) | (key_pos < num_globals)


class SlidingWindowState:
    """Mask and state hooks shared by both backbones' Longformer layers (a mixin before the backbone layer)."""

    window: int
    num_globals: int
    plain_kv = False

    def visible(self, tokens: TokenBatch, cache: KVBlock | None, keys: KVBlock) -> torch.Tensor:
        return visibility(tokens, cache) & window_mask(tokens, cache, self.window, self.num_globals)

    def store(self, stored: StoredLayer, new: StoredLayer) -> StoredLayer:
        """The globals and the last ``window`` events of ``stored`` followed by ``new``."""
        assert isinstance(stored, LayerState) and isinstance(new, LayerState)
        kept = stored.extend(new)
        positions = kept.positions[0]  # (m,) ascending: events are appended in order
        keep = (positions < self.num_globals) | (positions > positions[-1] - self.window)
        if bool(keep.all()):
            return kept
        return kept.select(keep.nonzero()[:, 0][None])


class HSTULongformerLayer(SlidingWindowState, HSTULayer):
    def __init__(self, cfg: ModelConfig, window: int, num_globals: int) -> None:
        super().__init__(cfg)
        self.window, self.num_globals = window, num_globals

    def kernel_window(self) -> tuple[int, int]:
        """The C kernel applies this mask itself (so training and serving run the kernel)."""
        return self.window, self.num_globals


class SASRecLongformerLayer(SlidingWindowState, SASRecLayer):
    def __init__(self, cfg: ModelConfig, window: int, num_globals: int) -> None:
        super().__init__(cfg)
        self.window, self.num_globals = window, num_globals


@dataclass(frozen=True)
class Longformer(ArchitectureScheme):
    """Causal sliding window of the previous ``window`` events plus the first ``globals`` events.

    Attributes:
        window: ``w``, earlier events each token sees besides the globals (>= 1); None = from the ratio:
            ``max(1, floor(memory_ratio * max_len) - globals)``.
        globals: ``g``, the first events of the history, seen by every later token (>= 0; default 2).
    """

    window: int | None = knob(None, int, low=1, optional=True)
    globals: int = knob(2, int, low=0)

    name: ClassVar[str] = "longformer"
    granularity: ClassVar[str] = "token-merge"
    summary: ClassVar[str] = "sliding window of w events + the first g events (w + g = ratio x max_len)"
    complexity: ClassVar[Complexity] = Complexity("2 L (w + g) d b", kept_request("(w + g)"), "w + g = mr n_max")

    def window_size(self, cfg: ModelConfig) -> int:
        if self.window is not None:
            return self.window
        return max(1, int(self.memory_ratio * cfg.max_len + 1e-9) - self.globals)

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        layer = HSTULongformerLayer if cfg.backbone == "hstu" else SASRecLongformerLayer
        return layer(cfg, self.window_size(cfg), self.globals)

    def knob_values(self, cfg: ModelConfig) -> dict[str, int]:
        return {"window": self.window_size(cfg), "globals": self.globals}

    def stored_keys(self, cfg: ModelConfig, history_len: int) -> float:
        return float(min(history_len, self.window_size(cfg) + self.globals))

    def state_bytes(self, cfg: ModelConfig, history_len: int) -> int:
        """``L min(n, w + g) (H (d_k + d_v) b + 12)``: the kept events' keys, values, positions, timestamps."""
        return cfg.layers * int(self.stored_keys(cfg, history_len)) * native_event_bytes(cfg)
