"""Replays a split's requests through a :class:`~malloc.serving.engine.Engine`: the evaluation protocol of both tasks.

CTR. For each user, the split's rows (the user's *window*) are taken in order of history length
``s_0 < s_1 < ...``. The engine writes the user's stored history (the ``max_len`` events before ``s_0``, with their
labels), scores the rows at ``s_0``, then for each later step appends the events between the two steps and scores
that step's rows. So a user with 70 test events is one write and 69 appends, as a serving fleet would see them, and
every prediction is read from the stored state. Two protocols differ in what the appended window events carry:

- ``blind`` (the default): the window's events are appended *without their labels* (the "unknown" action, as a
  candidate carries). Every row is then scored from the labels before the window, so GAUC, which ranks rows within
  a user's window, is not biased by the window's own labels: within a finite window labels are negatively
  correlated (leave one row out and the others' mean moves the other way), so a score that follows the labels just
  appended ranks each later row toward the earlier rows' labels, below chance (a user's running positive rate
  scores a within-user AUC well below 0.5 on MovieLens, ``tests/test_anchors.py``; constant within the window,
  exactly 0.5);
- ``feedback``: the window's events are appended with their labels, as a live system learns each click before the
  next request. Kept as a secondary protocol; its GAUC carries the bias above.

Retrieval. For each user, the ``max_len`` events before the target are the history; all but the last
``append_events`` are written, those are appended as the request, and the next-item logits are read from the
state. History items can be masked from the ranking.

Requests of different users are batched (one step of many users at a time); the meters record the time of each
batched step divided by the users it served.

Both replays take ``keep_last``, which truncates the *written* history to its most recent events (the memory
sensitivity curve, :mod:`malloc.sensitivity`): it maps the ``(B,)`` lengths the engine would write to the
``(B,)`` lengths it writes instead; appended events and scored candidates are unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from malloc.core.state import UserState
from malloc.data.batching import events, pad
from malloc.data.sequences import CTRRows, Sequences
from malloc.device import synchronize
from malloc.eval.metrics import history_exclusion, target_ranks
from malloc.results import atomic_file
from malloc.serving.engine import Engine

KeepLast = Callable[[np.ndarray], np.ndarray]
PROTOCOLS = ("blind", "feedback")


def _truncate(starts: np.ndarray, stops: np.ndarray, keep_last: KeepLast | None) -> np.ndarray:
    """New ``(B,)`` starts of the written histories ``starts:stops`` when only ``keep_last(stops - starts)`` stay."""
    if keep_last is None:
        return starts
    written = stops - starts
    kept = np.asarray(keep_last(written), dtype=np.int64)
    assert kept.shape == written.shape and np.all((kept >= 0) & (kept <= written)), "keep_last out of range"
    return stops - kept


def progress(batches: range, desc: str) -> tqdm:
    """A progress bar over user batches, shown on a terminal only (no carriage-return noise in logs)."""
    return tqdm(batches, desc=desc, unit="batch", disable=None, leave=False)


@dataclass
class ReplayMeters:
    """Resource measurements of one replay.

    Attributes:
        state_bytes: ``(U,)`` stored bytes of each served user's final state.
        state_tokens: ``(U,)`` stored tokens (layer 0) of each served user's final state.
        request_seconds: seconds per request (append + read), one entry per batched step; the summary leaves
            out the first step (warm-up).
        users: ``(U,)`` the user id of each entry of the per-user lists (serving order).
        layer_bytes: ``(U,)`` bytes of the stored layers only (what a cache policy compresses).
        layer_tokens: ``(U,)`` stored tokens per layer, averaged over layers (per-layer budgets differ).
        history_events: ``(U,)`` events each user's final state has seen (what Native would store).
        requests: requests served (one per user and step), to average per-request quantities.
    """

    state_bytes: list[int] = field(default_factory=list)
    state_tokens: list[int] = field(default_factory=list)
    request_seconds: list[float] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    layer_bytes: list[int] = field(default_factory=list)
    layer_tokens: list[float] = field(default_factory=list)
    history_events: list[int] = field(default_factory=list)
    requests: int = 0

    def record(self, users: np.ndarray, states: list[UserState]) -> None:
        """Record the final states of ``users`` (same order)."""
        self.users.extend(int(u) for u in users)
        self.state_bytes.extend(s.nbytes() for s in states)
        self.state_tokens.extend(s.num_tokens for s in states)
        self.layer_bytes.extend(sum(layer.nbytes() for layer in s.layers) for s in states)
        self.layer_tokens.extend(float(np.mean([layer.num_tokens for layer in s.layers])) if s.layers else 0.0
                                 for s in states)
        self.history_events.extend(s.next_position for s in states)

    def summary(self) -> dict:
        b = np.asarray(self.state_bytes, dtype=np.float64)
        lat = np.asarray(self.request_seconds, dtype=np.float64) * 1e3
        if len(lat) > 1:  # the first batched step is the warm-up (first calls of each kernel, allocations)
            lat = lat[1:]
        return {
            "users": len(b),
            "state_bytes_mean": float(b.mean()) if len(b) else 0.0,
            "state_bytes_p50": float(np.percentile(b, 50)) if len(b) else 0.0,
            "state_bytes_p99": float(np.percentile(b, 99)) if len(b) else 0.0,
            "state_tokens_mean": float(np.mean(self.state_tokens)) if self.state_tokens else 0.0,
            "batched_request_ms_p50": float(np.percentile(lat, 50)) if len(lat) else 0.0,
            "batched_request_ms_p99": float(np.percentile(lat, 99)) if len(lat) else 0.0,
        }


def _user_groups(rows: CTRRows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (user, history length).

    Returns the row order, the users, each user's row bounds (``bounds[u]:bounds[u + 1]`` of the order), and the
    users' serving order: by longest history, so that a batch pads little.
    """
    order = np.lexsort((rows.history_len, rows.user))
    users, starts = np.unique(rows.user[order], return_index=True)
    bounds = np.append(starts, len(order))
    longest = rows.history_len[order[bounds[1:] - 1]]
    return order, users, bounds, np.argsort(longest, kind="stable")


def replay_ctr(engine: Engine, seqs: Sequences, rows: CTRRows, max_len: int, user_batch: int = 256,
               keep_last: KeepLast | None = None, protocol: str = "blind") -> tuple[np.ndarray, ReplayMeters]:
    """Click logits of every row, read from stored states.

    ``keep_last`` (see the module docstring) truncates each user's written history before the first step;
    ``protocol`` is ``blind`` (window events appended without their labels) or ``feedback`` (with them).

    Returns:
        ``(R,)`` float64 logits aligned with ``rows``, and the meters.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    logits = np.zeros(len(rows), dtype=np.float64)
    meters = ReplayMeters()
    order, users, bounds, serving_order = _user_groups(rows)
    for first in progress(range(0, len(users), user_batch), "replay ctr"):
        batch = serving_order[first:first + user_batch]
        # per user: row indices (in original order) grouped by distinct history length
        steps = []
        for u in batch.tolist():
            idx = order[bounds[u]:bounds[u + 1]]
            lens = rows.history_len[idx]
            cuts = np.flatnonzero(np.diff(lens)) + 1
            steps.append((np.unique(lens), np.split(idx, cuts)))
        batch_users = users[batch]
        first_len = np.array([s[0][0] for s in steps])
        written_from = _truncate(np.maximum(0, first_len - max_len), first_len, keep_last)
        states = engine.write(events(seqs, batch_users, written_from, first_len))
        num_steps = max(len(s[0]) for s in steps)
        for k in range(num_steps):
            active = [b for b, s in enumerate(steps) if k < len(s[0])]
            tic = time.perf_counter()
            picked = [steps[b][1][k] for b in active]
            items, times = pad([rows.item[p] for p in picked]), pad([rows.timestamp[p] for p in picked])
            if k > 0:  # one request: append the events since the last step, then score (one pass where exact)
                prev = np.array([steps[b][0][k - 1] for b in active])
                cur = np.array([steps[b][0][k] for b in active])
                window = events(seqs, batch_users[active], prev, cur)
                if protocol == "blind":
                    window = window.without_labels()
                appended, scores = engine.request([states[b] for b in active], window, items, times)
                for b, state in zip(active, appended, strict=True):
                    states[b] = state
            else:
                scores = engine.score([states[b] for b in active], items, times)
            synchronize()
            meters.request_seconds.append((time.perf_counter() - tic) / len(active))
            meters.requests += len(active)
            for j, p in enumerate(picked):
                logits[p] = scores[j, : len(p)].double().cpu().numpy()
        meters.record(batch_users, states)
    return logits, meters


def replay_retrieval(engine: Engine, seqs: Sequences, target_index: np.ndarray, max_len: int,
                     append_events: int = 1, user_batch: int = 256, mask_history: bool = True, top_k: int = 0,
                     keep_last: KeepLast | None = None
                     ) -> tuple[np.ndarray, ReplayMeters] | tuple[np.ndarray, ReplayMeters, np.ndarray]:
    """1-based rank of each user's target item in the full catalogue, read from stored states.

    Args:
        target_index: ``(U,)`` index within each user of the event to predict (>= 1).
        top_k: if > 0, also return each user's ``top_k`` highest-scoring items (masked items excluded), e.g. 10
            for the top-10 overlap of fidelity; 0 (default) keeps the two-value return.
        keep_last: truncates the written history (module docstring); the history mask still covers every
            earlier event, as a serving fleet filters consumed items from its log, not from the model's memory.
    Returns:
        ``(U,)`` int64 ranks and the meters; with ``top_k > 0`` also ``(U, top_k)`` int64 item ids, best first.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    top_k = min(top_k, seqs.num_items)  # a catalogue smaller than k: its whole ranking
    ranks = np.zeros(seqs.num_users, dtype=np.int64)
    top = np.zeros((seqs.num_users, top_k), dtype=np.int64)
    meters = ReplayMeters()
    serving_order = np.argsort(target_index, kind="stable")  # similar lengths together: little padding
    for first in progress(range(0, seqs.num_users, user_batch), "replay retrieval"):
        users = serving_order[first:first + user_batch]
        stop = target_index[users]
        start = np.maximum(0, stop - max_len)
        split = np.maximum(start, stop - append_events)
        states = engine.write(events(seqs, users, _truncate(start, split, keep_last), split))
        tic = time.perf_counter()
        states = engine.append(states, events(seqs, users, split, stop))
        scores = engine.retrieve(states)
        synchronize()
        meters.request_seconds.append((time.perf_counter() - tic) / len(users))
        targets = torch.as_tensor(seqs.items[seqs.offsets[users] + stop], device=scores.device)
        exclude = history_exclusion(seqs, users, stop, scores.shape[1], scores.device) if mask_history else None
        ranks[users] = target_ranks(scores, targets, exclude)
        meters.requests += len(users)
        if top_k:
            masked = scores if exclude is None else scores.masked_fill(exclude, float("-inf"))
            top[users] = masked.topk(top_k, dim=1).indices.cpu().numpy()
        meters.record(users, states)
    return (ranks, meters, top) if top_k else (ranks, meters)


@dataclass
class Replay:
    """One replay of a split: metrics, meters and what fidelity compares, per user.

    Attributes:
        metrics, meters: as :func:`evaluate` returns them.
        users: ``(U,)`` served user ids, sorted; layer_bytes, state_bytes: ``(U,)``; layer_tokens: ``(U,)`` mean over
            layers of stored tokens, all of the final states.
        logits: CTR ``(R,)`` row logits (rows in split order), else None.
        ranks: retrieval ``(num_users,)`` 1-based target ranks; top: ``(num_users, FIDELITY_TOP_K)`` item ids.
        requests: requests served.
    """

    metrics: dict[str, Any]
    meters: dict[str, Any]
    users: np.ndarray
    layer_bytes: np.ndarray
    state_bytes: np.ndarray
    layer_tokens: np.ndarray
    history_events: np.ndarray
    logits: np.ndarray | None = None
    ranks: np.ndarray | None = None
    top: np.ndarray | None = None
    requests: int = 0

    _ARRAYS = ("users", "layer_bytes", "state_bytes", "layer_tokens", "history_events", "logits", "ranks", "top")

    def save(self, path: Path, identity: dict[str, Any]) -> None:
        """Write as ``.npz`` atomically."""
        arrays = {k: getattr(self, k) for k in self._ARRAYS if getattr(self, k) is not None}
        header = json.dumps({"identity": identity, "metrics": self.metrics, "meters": self.meters,
                             "requests": self.requests}, sort_keys=True, default=float)
        with atomic_file(path, "wb") as handle:
            np.savez(handle, header=np.array(header), **arrays)

    @classmethod
    def load(cls, path: Path, identity: dict[str, Any]) -> Replay | None:
        """The replay saved at ``path`` for this ``identity``, or None (missing, unreadable or stale)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if header["identity"] != json.loads(json.dumps(identity, sort_keys=True, default=float)):
                    return None
                arrays = {k: data[k] for k in cls._ARRAYS if k in data.files}
        except (OSError, ValueError, KeyError):
            return None
        if not {"users", "layer_bytes", "state_bytes", "layer_tokens", "history_events"} <= set(arrays):
            return None  # written by an older version
        return cls(metrics=header["metrics"], meters=header["meters"], requests=header["requests"], **arrays)


def per_user_arrays(meters: ReplayMeters) -> dict[str, np.ndarray]:
    """The per-user meters as ``(U,)`` arrays sorted by user id (the fields of :class:`Replay`)."""
    order = np.argsort(np.asarray(meters.users, dtype=np.int64), kind="stable")
    return {"users": np.asarray(meters.users, dtype=np.int64)[order],
            "layer_bytes": np.asarray(meters.layer_bytes, dtype=np.int64)[order],
            "state_bytes": np.asarray(meters.state_bytes, dtype=np.int64)[order],
            "layer_tokens": np.asarray(meters.layer_tokens, dtype=np.float64)[order],
            "history_events": np.asarray(meters.history_events, dtype=np.int64)[order]}
