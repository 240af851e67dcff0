"""Activation Beacon (Zhang et al., arXiv 2401.03462): chunks of events condensed into a few learned beacon tokens.

Trained with the scheme. The history is cut by position into chunks of ``w`` events (chunk ``c`` = positions
``[c w, (c + 1) w)``). When a chunk is complete, ``m = ceil(w / alpha)`` beacon tokens follow it in the token
stream (:meth:`Beacon.expand`, in training and serving alike). A beacon takes the timestamp of its chunk's last
event (a beacon stands for the chunk as of its end: the time it was closed) and a position inside its chunk: the
chunk's last one for every beacon (``placement="end"``, the default), or the last of its own ``k``-th of ``m``
equal segments (``"spread"``: ``c w + ceil((k + 1) w / m) - 1``), which lets the relative-position bias tell a
chunk's beacons apart; the last beacon sits at the chunk's end either way. It enters the first layer as an empty
item (item 0, action "unknown", and in SASRec the position embedding), and every layer adds a learned embedding
of the beacon's index ``k < m`` to its input and projects it with its own Q/K/V (HSTU: U/V/Q/K) weights; the
output projection, norms and SASRec's feed-forward block are shared with the events.

Serving rule (exact under caching; the same mask in the full forward), query at position ``p``:

- an event or a candidate sees the beacons of complete chunks (chunk end ``<= p``, i.e. beacon chunk ``< p // w``),
  the earlier events of its own chunk, and itself;
- a beacon of chunk ``c`` sees every event of chunk ``c``, the beacons of earlier chunks, the earlier beacons of
  chunk ``c``, and itself.

No token after a chunk's beacons sees that chunk's events, so the stored state after each append is exactly the
beacons of the closed chunks plus the events of the open chunk, and prefill + appends + score equal the full
forward. Beacons are recognised in the stored state by position alone, so no flag is kept: the open chunk is
``(max stored position + 1) // w`` (the last beacon of a closed chunk sits at its end) and a stored token of an
earlier chunk is a beacon (:func:`stored_beacons`).

Differences from the paper: beacons are appended after their chunk (the paper's "segmentation" placement, not
interleaved every ``alpha`` events); the beacons' output projection (and SASRec's feed-forward block) is shared;
each layer adds its own beacon embedding (the paper embeds once at the input); one ``alpha`` per model (the paper
samples it in training so one model serves many ratios). Under HSTU's SiLU attention a beacon is a learned
weighted pooling of its chunk (the weights need not sum to 1); its value projection is free to fold in the chunk
size, and ``N`` is kept.

Stored per layer, after ``n`` events: a :class:`LayerState` of ``s = m floor(n / w) + (n mod w)`` tokens: keys
``(H, s, d_k)``, values ``(H, s, d_v)``, positions ``(1, s)`` int32, timestamps ``(1, s)`` int64.

Knobs: ``alpha`` the condensing ratio (>= 1; None = ``1 / memory_ratio``) and ``chunk`` ``w`` (>= 1; default 32
events: a session or a few in recsys logs, so that with ``alpha`` in 4..16 a chunk keeps 2..8 beacons and the raw
open chunk stays small next to histories of 200..1000 events), and ``placement`` (above; ``"end"`` by default).
The measured ratio is about ``1 / alpha`` plus the
open chunk's ``(n mod w) / n``.

Cost: a request that closes a chunk also runs its ``m`` beacons through every layer (against the state, as events
do): :meth:`Beacon.append_tokens`; ``request_macs(..., history_len=n)`` counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from malloc.core.state import LayerState, StoredLayer
from malloc.core.tokens import ACTION_UNKNOWN, KVBlock, TokenBatch, split_heads
from malloc.memory.architecture import ArchitectureScheme, native_event_bytes
from malloc.memory.complexity import Complexity, kept_request
from malloc.memory.knobs import SchemeError, knob
from malloc.models.base import AttentionLayer
from malloc.models.config import ModelConfig
from malloc.models.hstu import HSTULayer
from malloc.models.sasrec import SASRecLayer

PLACEMENTS = ("end", "spread")


def beacon_offsets(chunk: int, beacons: int, placement: str) -> torch.Tensor:
    """``(m,)`` position of each beacon within its chunk: ``w - 1`` for every beacon (``"end"``), or the last
    position of its ``k``-th of ``m`` segments, ``ceil((k + 1) w / m) - 1`` (``"spread"``). The last beacon sits at
    the chunk's end either way."""
    if placement == "end":
        return torch.full((beacons,), chunk - 1)
    return torch.tensor([-(-(k + 1) * chunk // beacons) - 1 for k in range(beacons)])


def insert_beacons(tokens: TokenBatch, chunk: int, beacons: int, placement: str = "end"
                   ) -> tuple[TokenBatch, torch.Tensor | None]:
    """Insert ``beacons`` beacon tokens after every history event that completes a chunk.

    Args:
        tokens: ``(B, T)`` tokens without beacons (history events and/or candidates).
        placement: the beacons' positions within their chunk (:func:`beacon_offsets`); each takes the timestamp of
            the chunk's last event.
    Returns:
        ``(B, T')`` tokens with ``beacon`` set (the given tokens keep their order; valid tokens stay left-aligned
        if they were), and the index ``(B, T)`` of each given token among them; ``tokens, None`` if no chunk
        completes.
    """
    assert tokens.beacon is None, "tokens already carry beacons"
    closes = tokens.is_history & ((tokens.positions + 1) % chunk == 0)  # (B, T)
    per_row = closes.sum(dim=1)
    if not bool(per_row.any()):
        return tokens, None
    batch, length = tokens.shape
    device = tokens.items.device
    index = torch.arange(length, device=device)[None, :] + beacons * (closes.cumsum(dim=1) - closes.long())
    total = length + beacons * int(per_row.max())
    rows, cols = closes.nonzero(as_tuple=True)  # (K,) closing events
    slots = index[rows, cols][:, None] + 1 + torch.arange(beacons, device=device)  # (K, m)
    slot_rows = rows[:, None].expand_as(slots)

    def place(values: torch.Tensor, beacon_values: Any) -> torch.Tensor:
        out = values.new_zeros(batch, total)
        out.scatter_(1, index, values)
        out[slot_rows, slots] = beacon_values
        return out

    expanded = TokenBatch(
        items=place(tokens.items, 0),
        actions=place(tokens.actions, ACTION_UNKNOWN),
        positions=place(tokens.positions, tokens.positions[rows, cols][:, None] - (chunk - 1)
                        + beacon_offsets(chunk, beacons, placement).to(device)[None, :]),
        timestamps=place(tokens.timestamps, tokens.timestamps[rows, cols][:, None]),
        is_history=place(tokens.is_history, True),
        valid=place(tokens.valid, True),
        beacon=place(torch.zeros_like(tokens.valid), True),
    )
    return expanded, index


def stored_beacons(positions: torch.Tensor, valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Which stored tokens are beacons, from positions alone: ``positions, valid (..., n)`` -> ``(..., n)`` bool.

    A stored state is the beacons of the closed chunks followed by the events of the open chunk, and the last
    beacon of a chunk sits at the chunk's end. So the open chunk is ``(max position + 1) // w`` (a state that ends
    on a closed chunk has no open events), and a stored token is a beacon iff its chunk is below it.
    """
    if positions.shape[-1] == 0:
        return torch.zeros_like(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1, keepdim=True)
    return positions // chunk < (last + 1) // chunk


def beacon_visibility(tokens: TokenBatch, cache: KVBlock | None, chunk: int) -> torch.Tensor:
    """The serving rule's mask (module docstring) for keys ``[cache; new tokens]``.

    Args:
        tokens: the ``T`` new tokens (queries and new keys); ``beacon`` None means no beacons.
        cache: the stored beacons of closed chunks and events of the open chunk (``n`` keys), or None.
    Returns:
        ``(B, 1 or H, T, n + T)`` bool.
    """
    length = tokens.shape[1]
    device = tokens.items.device
    beacon = torch.zeros_like(tokens.valid) if tokens.beacon is None else tokens.beacon
    q_pos = tokens.positions[:, None, :, None]  # (B, 1, T, 1)
    q_chunk, q_beacon = q_pos // chunk, beacon[:, None, :, None]
    k_pos = tokens.positions[:, None, None, :]  # (B, 1, 1, T)
    k_beacon = beacon[:, None, None, :]
    k_event = (tokens.is_history & ~beacon)[:, None, None, :]
    k_chunk = k_pos // chunk
    own_chunk = (k_chunk == q_chunk) & ((k_pos < q_pos) | q_beacon)
    in_order = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # key j <= query i
    same_chunk_beacon = q_beacon & (k_chunk == q_chunk) & in_order
    new_part = ((k_event & own_chunk) | (k_beacon & ((k_chunk < q_chunk) | same_chunk_beacon))
                | torch.eye(length, dtype=torch.bool, device=device))
    if cache is None:
        return new_part
    c_pos = cache.positions[:, :, None, :]  # (B, 1|H, 1, n)
    c_chunk = c_pos // chunk
    c_own_chunk = (c_chunk == q_chunk) & ((c_pos < q_pos) | q_beacon)
    c_beacon = stored_beacons(cache.positions, cache.valid, chunk)[:, :, None, :]
    cached_part = cache.valid[:, :, None, :] & torch.where(c_beacon, c_chunk < q_chunk, c_own_chunk)
    return torch.cat([cached_part, new_part.expand(-1, cached_part.shape[1], -1, -1)], dim=-1)


def routed_linear(h: torch.Tensor, beacon: torch.Tensor | None, linear: nn.Linear, beacon_linear: nn.Linear
                  ) -> torch.Tensor:
    """``h (B, T, D)`` through ``linear``, except beacon rows (``beacon (B, T)`` bool) through ``beacon_linear``
    (each row is projected once)."""
    if beacon is None:
        return linear(h)
    events = linear(h[~beacon])
    out = events.new_empty(*h.shape[:-1], linear.out_features)
    out[~beacon] = events
    out[beacon] = beacon_linear(h[beacon]).to(events.dtype)
    return out


class BeaconState:
    """Beacon embedding, mask and state hooks shared by both backbones' layers (a mixin before the layer)."""

    chunk: int
    beacons: int
    beacon_embedding: nn.Parameter  # (m, D)
    plain_kv = False

    def init_beacons(self, cfg: ModelConfig, chunk: int, beacons: int) -> None:
        self.chunk, self.beacons = chunk, beacons
        self.beacon_embedding = nn.Parameter(torch.randn(beacons, cfg.dim) * 0.02)

    def forward(self, x: torch.Tensor, tokens: TokenBatch, cache: Any, need_weights: bool = False
                ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        if tokens.beacon is not None:  # beacons come in complete runs of m: index k = ordinal mod m
            k = (tokens.beacon.long().cumsum(dim=1) - 1).clamp(min=0) % self.beacons  # (B, T)
            x = torch.where(tokens.beacon[:, :, None], x + self.beacon_embedding[k], x)
        return super().forward(x, tokens, cache, need_weights)

    def visible(self, tokens: TokenBatch, cache: KVBlock | None, keys: KVBlock) -> torch.Tensor:
        return beacon_visibility(tokens, cache, self.chunk)

    def new_state(self, new: KVBlock, tokens: TokenBatch, user: int, count: int, dtype: torch.dtype
                  ) -> LayerState:
        """The new beacons and the new events of the open chunk (events of chunks closed here are dropped)."""
        state = super().new_state(new, tokens, user, count, dtype)
        positions = tokens.positions[user, :count]
        beacon = torch.zeros_like(positions, dtype=torch.bool) if tokens.beacon is None else tokens.beacon[user, :count]
        closed_end = (positions.max() + 1) // self.chunk * self.chunk  # first position of the open chunk
        keep = beacon | (positions >= closed_end)
        return state if bool(keep.all()) else state.select(keep.nonzero()[:, 0][None])

    def store(self, stored: StoredLayer, new: StoredLayer) -> StoredLayer:
        """``stored`` without the events of chunks that ``new`` closed, followed by ``new``."""
        assert isinstance(stored, LayerState) and isinstance(new, LayerState)
        if not new.num_tokens:  # nothing new kept: the append closed the open chunk and added no beacon (a model
            return new          # without beacons, benchmarks/beacon_learning.py's floor), so nothing stays
        if stored.num_tokens:
            positions = stored.positions[0]
            closed_end = (int(new.positions.max()) + 1) // self.chunk * self.chunk
            beacon = stored_beacons(positions, torch.ones_like(positions, dtype=torch.bool), self.chunk)
            keep = beacon | (positions >= closed_end)
            if not bool(keep.all()):
                stored = stored.select(keep.nonzero()[:, 0][None])
        return stored.extend(new)


class HSTUBeaconLayer(BeaconState, HSTULayer):
    def __init__(self, cfg: ModelConfig, chunk: int, beacons: int) -> None:
        super().__init__(cfg)
        self.init_beacons(cfg, chunk, beacons)
        self.beacon_uvqk = nn.Linear(cfg.dim, sum(self.split))

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, KVBlock]:
        u, v, q, k = F.silu(routed_linear(h, tokens.beacon, self.uvqk, self.beacon_uvqk)).split(self.split, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        return u, q, KVBlock(k, v, tokens.positions[:, None], tokens.timestamps[:, None], tokens.is_history[:, None])


class SASRecBeaconLayer(BeaconState, SASRecLayer):
    def __init__(self, cfg: ModelConfig, chunk: int, beacons: int) -> None:
        super().__init__(cfg)
        self.init_beacons(cfg, chunk, beacons)
        self.beacon_qkv = nn.Linear(cfg.dim, sum(self.split))

    def project(self, h: torch.Tensor, tokens: TokenBatch) -> tuple[torch.Tensor, KVBlock]:
        q, k, v = routed_linear(h, tokens.beacon, self.qkv, self.beacon_qkv).split(self.split, dim=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        return q, KVBlock(k, v, tokens.positions[:, None], tokens.timestamps[:, None], tokens.is_history[:, None])


@dataclass(frozen=True)
class Beacon(ArchitectureScheme):
    """Activation Beacon: every complete chunk of ``chunk`` events is kept as ``ceil(chunk / alpha)`` beacons.

    Attributes:
        chunk: ``w``, events per chunk (>= 1; default 32).
        alpha: condensing ratio (>= 1); None = from the ratio: ``1 / memory_ratio``. Beacons per chunk
            ``m = ceil(w / alpha)``.
        placement: ``"end"`` (default): every beacon at its chunk's last position; ``"spread"``: beacon ``k`` at
            the last position of the ``k``-th of ``m`` equal segments of the chunk, so the relative-position bias
            tells a chunk's beacons apart (:func:`beacon_offsets`).
    """

    chunk: int = knob(32, int, low=1)
    alpha: float | None = knob(None, float, low=1.0, optional=True, why="the condensing ratio")
    placement: str = knob("end", str, choices=PLACEMENTS)

    name: ClassVar[str] = "beacon"
    granularity: ClassVar[str] = "token-merge"
    summary: ClassVar[str] = "each chunk of w events condensed into ceil(w / alpha) learned beacons (alpha = 1/ratio)"
    complexity: ClassVar[Complexity] = Complexity("2 L (n / a + r) d b",
                                                  kept_request("(n / a + r)") + " + beacon tokens t / a",
                                                  "condensing ratio a ~ 1 / mr; open chunk r < w")

    def __post_init__(self) -> None:
        super().__post_init__()
        # alpha against chunk: a relation between two knobs, so not a declaration
        if not 1 <= self.beacons_per_chunk() <= self.chunk:
            raise SchemeError(f"{self.name}: knob alpha={self.condensing_ratio()} gives "
                              f"{self.beacons_per_chunk()} beacons per chunk of {self.chunk}; need 1..chunk")

    def condensing_ratio(self) -> float:
        return float(self.alpha) if self.alpha is not None else 1.0 / self.memory_ratio

    def beacons_per_chunk(self) -> int:
        """``m = ceil(w / alpha)`` (a hair of slack so that ``w * ratio`` exact in decimals is not rounded up)."""
        return max(1, math.ceil(self.chunk / self.condensing_ratio() - 1e-9))

    def build_layer(self, cfg: ModelConfig) -> AttentionLayer:
        layer = HSTUBeaconLayer if cfg.backbone == "hstu" else SASRecBeaconLayer
        return layer(cfg, self.chunk, self.beacons_per_chunk())

    def expand(self, tokens: TokenBatch) -> tuple[TokenBatch, torch.Tensor | None]:
        return insert_beacons(tokens, self.chunk, self.beacons_per_chunk(), self.placement)

    def knob_values(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"chunk": self.chunk, "alpha": self.condensing_ratio(), "placement": self.placement}

    def stored_keys(self, cfg: ModelConfig, history_len: int) -> float:
        """``m floor(n / w) + (n mod w)``: beacons of the closed chunks and events of the open one."""
        return float(self.beacons_per_chunk() * (history_len // self.chunk) + history_len % self.chunk)

    def state_bytes(self, cfg: ModelConfig, history_len: int) -> int:
        """``L s (H (d_k + d_v) b + 12)`` with ``s`` = :meth:`stored_keys`: keys, values, positions, timestamps."""
        per_token = native_event_bytes(cfg)
        return cfg.layers * int(self.stored_keys(cfg, history_len)) * per_token

    def append_tokens(self, cfg: ModelConfig, history_len: int, new_events: int) -> float:
        """The events plus ``m`` beacons per chunk they close (beacons cost what events cost: own projections of
        the same shapes, shared output and feed-forward)."""
        closed = (history_len + new_events) // self.chunk - history_len // self.chunk
        return float(new_events + self.beacons_per_chunk() * closed)
