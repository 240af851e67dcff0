"""The requests of a replay over time: a data set's events after each user's training prefix, in timestamp order
across all users.

Which events are requests:

- CTR: every row of the validation and test splits (the last 20% of each user's events by default), one request
  per event. A request scores the event's item at the event's time, before its label is known, then appends the
  event with its label: the ``feedback`` protocol of :mod:`malloc.eval.replay`, one event at a time.
- Retrieval: each user's validation and test targets (the last two events): a request ranks the full catalogue
  from the state, then appends the event.

The events before a user's first request are the user's **event log** as it stood when serving began (the
training prefix). A state that is not in the store is recomputed from the log, from the user's *log start* (the
``model.max_len`` events before the first request, as the evaluation writes them) up to the request: under Native
that is the state an uninterrupted replay would hold, so dropping and recomputing a user costs compute, not
accuracy.

Order: by timestamp, then user, then event index (a user's events never reorder: their timestamps do not
decrease). :func:`worker_of` partitions users by a stable hash, so that each user's requests stay in one worker,
in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from malloc.data.tasks import CTRView, RetrievalView
from malloc.serve.options import ServeError

SPLIT_CODES = {"valid": 1, "test": 2}


@dataclass(frozen=True)
class Requests:
    """The requests of one replay, in serving order.

    Attributes:
        user: ``(R,)`` int64 dense user index.
        event: ``(R,)`` int64 index of the request's event within its user (the history is events ``0..event-1``).
        item: ``(R,)`` int64 the event's item (the CTR candidate, the retrieval target).
        timestamp: ``(R,)`` int64 the event's time.
        label: ``(R,)`` int8 the event's label (-1 for retrieval).
        split: ``(R,)`` int8 1 validation, 2 test.
        row: ``(R,)`` int64 the request's row within its split (``view.split(name)`` order for CTR; the user for
            retrieval): where the anchors' predictions are read.
        log_start: ``(U,)`` int64 per user, the first event a recomputed state is written from.
        num_users: users of the data set (``U``).
    """

    user: np.ndarray
    event: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray
    split: np.ndarray
    row: np.ndarray
    log_start: np.ndarray
    num_users: int

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> Requests:
        """The requests at ``index`` (``(r,)`` int64, kept in that order); log starts are shared."""
        return Requests(self.user[index], self.event[index], self.item[index], self.timestamp[index],
                        self.label[index], self.split[index], self.row[index], self.log_start, self.num_users)


def build_requests(view: CTRView | RetrievalView, max_len: int, max_requests: int = 0) -> Requests:
    """The requests of ``view`` (module docstring), the first ``max_requests`` in time order (0: all).

    Raises:
        ServeError: CTR rows that are not the data set's events (sources with their own rows), or no request.
    """
    seqs = view.sequences
    if isinstance(view, CTRView):
        parts = []
        for name, code in SPLIT_CODES.items():
            rows = view.split(name)
            parts.append((rows.user, rows.history_len, rows.item, rows.timestamp, rows.label.astype(np.int8),
                          np.full(len(rows), code, dtype=np.int8), np.arange(len(rows), dtype=np.int64)))
        user, event, item, timestamp, label, split, row = (np.concatenate(cols) for cols in zip(*parts, strict=True))
        flat = seqs.offsets[user] + event
        inside = event < seqs.lengths[user]
        if not (inside.all() and np.array_equal(seqs.items[flat[inside]], item[inside])
                and np.array_equal(seqs.timestamps[flat[inside]], timestamp[inside])):
            raise ServeError(f"data set {seqs.name!r}: its CTR rows are not its events (a source with its own rows); "
                             "malloc serve replays events, use a source whose rows are its events (MovieLens, "
                             "synthetic)")
    else:
        parts = []
        for name, code in SPLIT_CODES.items():
            users = np.arange(seqs.num_users, dtype=np.int64)
            index = view.target_index(name)
            parts.append((users, index, seqs.items[seqs.offsets[users] + index],
                          seqs.timestamps[seqs.offsets[users] + index], np.full(len(users), -1, dtype=np.int8),
                          np.full(len(users), code, dtype=np.int8), users))
        user, event, item, timestamp, label, split, row = (np.concatenate(cols) for cols in zip(*parts, strict=True))
    user, event = user.astype(np.int64), event.astype(np.int64)
    order = np.lexsort((event, user, timestamp))
    if max_requests:
        order = order[:max_requests]
    if len(order) == 0:
        raise ServeError(f"data set {seqs.name!r} has no request to replay (no validation or test events)")
    first = np.full(seqs.num_users, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, user[order], event[order])
    log_start = np.where(first == np.iinfo(np.int64).max, 0, np.maximum(0, first - max_len))
    return Requests(user[order], event[order], item[order].astype(np.int64), timestamp[order].astype(np.int64),
                    label[order], split[order], row[order].astype(np.int64), log_start, seqs.num_users)


def worker_of(users: np.ndarray, workers: int) -> np.ndarray:
    """``(N,)`` the worker of each user: a multiplicative hash of the user index modulo ``workers`` (stable across
    runs and machines, so a resumed replay gives each worker the same users)."""
    mixed = (users.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(33)) % np.uint64(workers)).astype(np.int64)


__all__ = ["SPLIT_CODES", "Requests", "build_requests", "worker_of"]
