"""Padded token batches for training and for the serving replay.

Training batches put a window's history events first and, for CTR, the window's target rows after them as
candidate tokens (positions = their history length within the window), so one full forward scores every target
with exactly the history the serving path would show it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from malloc.core.tokens import ACTION_UNKNOWN, Events, TokenBatch, label_to_action
from malloc.data.sequences import CTRRows, Sequences
from malloc.data.tasks import Window


def pad(arrays: list[np.ndarray], fill: int = 0) -> torch.Tensor:
    """Left-aligned ``(B, max_len)`` int64 tensor of 1-D int arrays."""
    width = max((len(a) for a in arrays), default=0)
    out = np.full((len(arrays), width), fill, dtype=np.int64)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out)


def events(seqs: Sequences, users: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> Events:
    """Events ``starts[b]:stops[b]`` of ``users[b]`` as a padded :class:`Events` batch."""
    items, labels, times = [], [], []
    for user, start, stop in zip(users.tolist(), starts.tolist(), stops.tolist(), strict=True):
        base = int(seqs.offsets[user])
        part = slice(base + start, base + stop)
        items.append(seqs.items[part])
        labels.append(seqs.labels[part].astype(np.int64))
        times.append(seqs.timestamps[part])
    return Events(items=pad(items), actions=label_to_action(pad(labels, fill=-1)), timestamps=pad(times),
                  lengths=torch.as_tensor(stops - starts, dtype=torch.int64))


@dataclass
class TrainingBatch:
    """Tokens for one full forward, with what the loss needs.

    Attributes:
        tokens: ``(B, T)`` history events then candidates.
        target_mask: ``(B, T)`` bool, tokens that carry a loss.
        targets: ``(B, T)`` CTR labels (float) or next-item ids (int64) at the masked tokens.
        candidates_from: CTR: the index along ``T`` where the candidate tokens start (the history's padded
            width); retrieval: ``T`` (no candidates).
    """

    tokens: TokenBatch
    target_mask: torch.Tensor
    targets: torch.Tensor
    candidates_from: int = -1

    def __post_init__(self) -> None:
        if self.candidates_from < 0:
            self.candidates_from = self.tokens.items.shape[1]

    def to(self, device: torch.device | str) -> TrainingBatch:
        return TrainingBatch(self.tokens.to(device), self.target_mask.to(device), self.targets.to(device),
                             self.candidates_from)


def history_tokens(seqs: Sequences, batch: list[Window]) -> TokenBatch:
    """The windows' events as history tokens at positions ``0..len-1``."""
    ev = events(seqs, np.array([w.user for w in batch]), np.array([w.start for w in batch]),
                np.array([w.stop for w in batch]))
    length = ev.items.shape[1]
    valid = ev.valid
    return TokenBatch(items=ev.items, actions=ev.actions,
                      positions=torch.arange(length)[None, :].expand(len(batch), length).clone(),
                      timestamps=ev.timestamps, is_history=valid, valid=valid)


def concat_tokens(first: TokenBatch, second: TokenBatch) -> TokenBatch:
    fields = ("items", "actions", "positions", "timestamps", "is_history", "valid")
    return TokenBatch(*(torch.cat([getattr(first, f), getattr(second, f)], dim=1) for f in fields))


class CTRWindowRows:
    """Finds, for a training window, the rows it scores: rows of its user with history length in (start, stop]."""

    def __init__(self, rows: CTRRows) -> None:
        order = np.lexsort((rows.history_len, rows.user))
        self.rows = rows.select(order)
        self.key = self.rows.user.astype(np.int64) * (1 << 32) + self.rows.history_len

    def for_window(self, window: Window) -> np.ndarray:
        base = window.user * (1 << 32)
        lo, hi = np.searchsorted(self.key, [base + window.start + 1, base + window.stop + 1])
        return np.arange(lo, hi)


def ctr_training_batch(seqs: Sequences, batch: list[Window], index: CTRWindowRows,
                       blind_from: np.ndarray | None = None) -> TrainingBatch:
    """History windows followed by their target rows (history length in ``(start, stop]``) as candidate tokens.

    ``blind_from`` ``(B,)``: window ``b``'s events from index ``blind_from[b]`` on carry the "unknown" action (their
    labels hidden, as the blind CTR protocol appends a scored window); None (or the window's length) hides none.
    """
    return ctr_batch(seqs, batch, index.rows, [index.for_window(w) for w in batch], blind_from)


def ctr_batch(seqs: Sequences, batch: list[Window], rows: CTRRows, picked: list[np.ndarray],
              blind_from: np.ndarray | None = None) -> TrainingBatch:
    """History windows followed by candidate tokens: window ``b`` scores ``rows`` ``picked[b]`` (each at position
    ``history_len - start``, so it sees exactly the window's events before it); ``blind_from`` as in
    :func:`ctr_training_batch`. Candidates appear in ``picked`` order, so ``target_mask`` selects them in the order
    of ``np.concatenate(picked)``."""
    history = history_tokens(seqs, batch)
    if blind_from is not None:
        hidden = torch.arange(history.items.shape[1])[None, :] >= torch.as_tensor(blind_from)[:, None]
        history.actions = history.actions.masked_fill(hidden, ACTION_UNKNOWN)
    items = pad([rows.item[p] for p in picked])
    positions = pad([rows.history_len[p] - w.start for p, w in zip(picked, batch, strict=True)])
    times = pad([rows.timestamp[p] for p in picked])
    labels = pad([rows.label[p].astype(np.int64) for p in picked])
    valid = items > 0
    candidates = TokenBatch(items=items, actions=torch.full_like(items, ACTION_UNKNOWN), positions=positions,
                            timestamps=times, is_history=torch.zeros_like(valid), valid=valid)
    tokens = concat_tokens(history, candidates)
    target_mask = torch.cat([torch.zeros_like(history.valid), valid], dim=1)
    targets = torch.cat([torch.zeros_like(history.items), labels], dim=1).float()
    return TrainingBatch(tokens, target_mask, targets, history.items.shape[1])


def retrieval_training_batch(seqs: Sequences, batch: list[Window]) -> TrainingBatch:
    """History windows; the output at event ``i`` predicts the item of event ``i + 1`` in the window."""
    tokens = history_tokens(seqs, batch)
    next_items = torch.zeros_like(tokens.items)
    next_items[:, :-1] = tokens.items[:, 1:]
    return TrainingBatch(tokens, next_items > 0, next_items)
