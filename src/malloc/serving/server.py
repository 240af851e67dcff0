"""The request protocol (DESIGN.md section 3.5) for one model: write, append, read.

Every accuracy figure MALLOC reports goes through a :class:`Server`: histories are written into stored states,
new events are appended against the stored states, and predictions are read from them.
"""

from __future__ import annotations

import torch

from malloc.memory.state import UserState
from malloc.models.base import Events, SequentialRecommender


class Server:
    """Serves one trained model.

    Args:
        model: a backbone; switched to eval mode (dropout off), since serving must be deterministic.
        prefill_chunk: events encoded per chunk when writing a history.
        candidate_chunk: candidates scored per micro-batch.
    """

    def __init__(self, model: SequentialRecommender, prefill_chunk: int = 1024, candidate_chunk: int = 256) -> None:
        self.model = model.eval()
        self.prefill_chunk = prefill_chunk
        self.candidate_chunk = candidate_chunk

    def write(self, events: Events) -> list[UserState]:
        """Encode stored histories ``(B, n)`` and return one state per user (on the model's device)."""
        return self.model.prefill(events.to(self.model.device), chunk_size=self.prefill_chunk)

    def append(self, states: list[UserState], events: Events) -> list[UserState]:
        """Compute new events ``(B, t)`` against the stored states; returns the new states."""
        return self.model.append(states, events.to(self.model.device), chunk_size=self.prefill_chunk)

    def score(self, states: list[UserState], items: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """``(B, c)`` candidate click logits read from the states (left unchanged)."""
        device = self.model.device
        return self.model.score(states, items.to(device), timestamps.to(device), chunk_size=self.candidate_chunk)

    def retrieve(self, states: list[UserState]) -> torch.Tensor:
        """``(B, num_items + 1)`` next-item logits read from the states."""
        return self.model.retrieval_logits(states)
