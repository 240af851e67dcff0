"""The stored per-user state: what a serving fleet keeps for every user between requests.

A :class:`UserState` holds, for each layer, the keys and values of the user's stored history events together with
their original positions and timestamps (the relative-position and time biases need them), plus the final hidden
state of the last event (the retrieval read). ``nbytes()`` counts every byte that would be stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malloc.tokens import KVBlock

# Bytes of the scalar bookkeeping kept per user: next position (int64) and last timestamp (int64).
SCALAR_BYTES = 16


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class LayerState:
    """One user's stored history for one layer (dense: every head keeps every token).

    Attributes:
        keys: ``(H, n, d_k)``.
        values: ``(H, n, d_v)``.
        positions: ``(n,)`` int32 original event positions.
        timestamps: ``(n,)`` int64 event times.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    timestamps: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in (self.keys, self.values, self.positions, self.timestamps))

    def extend(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               timestamps: torch.Tensor) -> LayerState:
        """A new state with ``t`` more tokens: keys ``(H, t, d_k)``, values ``(H, t, d_v)``, ``(t,)`` metadata."""
        return LayerState(
            keys=torch.cat([self.keys, keys.to(self.keys.dtype)], dim=1),
            values=torch.cat([self.values, values.to(self.values.dtype)], dim=1),
            positions=torch.cat([self.positions, positions.to(torch.int32)]),
            timestamps=torch.cat([self.timestamps, timestamps.to(torch.int64)]),
        )

    @staticmethod
    def empty(heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"
              ) -> LayerState:
        return LayerState(
            keys=torch.zeros(heads, 0, key_dim, dtype=dtype, device=device),
            values=torch.zeros(heads, 0, value_dim, dtype=dtype, device=device),
            positions=torch.zeros(0, dtype=torch.int32, device=device),
            timestamps=torch.zeros(0, dtype=torch.int64, device=device),
        )


@dataclass(frozen=True)
class UserState:
    """Everything stored for one user.

    Attributes:
        layers: one :class:`LayerState` per attention layer.
        last_hidden: ``(D,)`` final-layer output of the last stored event (the retrieval query); empty
            ``(0,)`` before any event.
        next_position: position the next event will take (= number of events seen).
        last_timestamp: time of the last event seen (0 before any event).
    """

    layers: tuple[LayerState, ...]
    last_hidden: torch.Tensor
    next_position: int
    last_timestamp: int

    def nbytes(self) -> int:
        """Exact stored bytes: every tensor at its element size plus the scalar bookkeeping."""
        return sum(layer.nbytes() for layer in self.layers) + tensor_nbytes(self.last_hidden) + SCALAR_BYTES

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens if self.layers else 0


def collate_layer(states: list[UserState], layer: int, compute_dtype: torch.dtype) -> KVBlock:
    """Pad one layer of several users' states into the block attention reads.

    Returns:
        KVBlock with ``(B, H, n_max, d)`` keys/values in ``compute_dtype`` and ``(B, 1, n_max)`` metadata.
    """
    parts = [s.layers[layer] for s in states]
    heads, _, key_dim = parts[0].keys.shape
    value_dim = parts[0].values.shape[2]
    n_max = max(p.num_tokens for p in parts)
    batch, device = len(parts), parts[0].keys.device
    keys = torch.zeros(batch, heads, n_max, key_dim, dtype=compute_dtype, device=device)
    values = torch.zeros(batch, heads, n_max, value_dim, dtype=compute_dtype, device=device)
    positions = torch.zeros(batch, n_max, dtype=torch.int64, device=device)
    timestamps = torch.zeros(batch, n_max, dtype=torch.int64, device=device)
    valid = torch.zeros(batch, n_max, dtype=torch.bool, device=device)
    for b, part in enumerate(parts):
        n = part.num_tokens
        keys[b, :, :n] = part.keys
        values[b, :, :n] = part.values
        positions[b, :n] = part.positions
        timestamps[b, :n] = part.timestamps
        valid[b, :n] = True
    return KVBlock(keys, values, positions[:, None], timestamps[:, None], valid[:, None])
