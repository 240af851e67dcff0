"""Candidates that are the same token to the layers, computed once.

Under ``model.candidate = "query"`` the layers see no candidate's item: every candidate shows the shared query
embedding and the "unknown" action at its user's next position, so two candidates of one user requested at the
same time are the same token, and their outputs are equal; the item acts through the readout only
(:meth:`~malloc.models.base.SequentialRecommender.ctr_logits`). A request that scores 100 candidates at one time
then runs one candidate token through the layers, not 100 (the user vector of a two-tower read), and reads the
100 logits from its output. Under ``candidate = "item"`` every candidate is its own token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MergedCandidates:
    """Each user's distinct candidate tokens, and which one every candidate reads.

    Attributes:
        items: ``(B, K)`` int64, an item of each token's candidates (the layers do not read it; 0 for a token of
            padding only).
        timestamps: ``(B, K)`` int64 request time of each token.
        token: ``(B, c)`` int64, the token of each candidate (``0 <= token < K``).
    """

    items: torch.Tensor
    timestamps: torch.Tensor
    token: torch.Tensor

    def spread(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, K, D)`` outputs of the tokens -> ``(B, c, D)`` outputs of the candidates."""
        return hidden.gather(1, self.token[:, :, None].expand(-1, -1, hidden.shape[2]))


def merge_candidates(items: torch.Tensor, timestamps: torch.Tensor) -> MergedCandidates | None:
    """Merge each user's candidates requested at the same time into one token.

    Args:
        items: ``(B, c)`` int64 candidates (0 = padding); timestamps: ``(B, c)`` int64.
    Returns:
        the merged tokens, or None when no two candidates of a user share a time (nothing to save).
    """
    batch, count = items.shape
    if count < 2:
        return None
    valid = items > 0
    if bool(((timestamps == timestamps[:, :1]) & valid).all()):  # one request time per user, no padding: one token
        return MergedCandidates(items[:, :1], timestamps[:, :1], torch.zeros_like(items))
    # padding sorts below every real time, so that it never joins a real candidate's token
    lowest = float("-inf") if timestamps.is_floating_point() else torch.iinfo(timestamps.dtype).min
    keyed = timestamps.masked_fill(~valid, lowest)
    ordered, order = keyed.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = starts.cumsum(dim=1) - 1  # (B, c) token of each candidate, in sorted order
    width = int(rank[:, -1].max()) + 1
    if width == count:
        return None
    token = torch.empty_like(rank).scatter_(1, order, rank)
    merged_items = items.new_zeros(batch, width).scatter_reduce_(1, token, items.clamp(min=0), "amax")
    merged_times = timestamps.new_zeros(batch, width).scatter_reduce_(1, token, timestamps, "amax")
    return MergedCandidates(merged_items, merged_times, token)
