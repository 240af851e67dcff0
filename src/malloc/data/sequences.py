"""Jagged per-user event sequences and explicit CTR rows.

Every source reader produces a :class:`Sequences` (all users' chronological histories, stored jagged) and,
where the source defines its own click-through rows (reczoo, LongCTR), a :class:`CTRRows` that indexes into it.
Task views (:mod:`malloc.data.tasks`) only hold indices into these arrays; no prefix is ever materialised.

Jagged convention: user ``u`` owns the events ``offsets[u] : offsets[u + 1]`` of the flat arrays.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from malloc.errors import MallocError

logger = logging.getLogger("malloc.data")

# Event label meaning "not observed" (retrieval data, or a click log without labels).
UNKNOWN_LABEL = -1


@dataclass(frozen=True)
class Sequences:
    """All users' histories, chronological within each user.

    Attributes:
        name: data set name, for logs and results.
        offsets: ``(U + 1,)`` int64, ``offsets[0] == 0``, non-decreasing.
        items: ``(E,)`` int64 item ids in ``1 .. num_items`` (0 is reserved for padding).
        timestamps: ``(E,)`` int64 seconds (or order indices where the source has no time), non-decreasing per user.
        labels: ``(E,)`` int8, 1 positive, 0 negative, ``UNKNOWN_LABEL`` where the source has none.
        num_items: size of the item vocabulary, excluding padding.
        user_ids: ``(U,)`` the source's user ids (for reports), in the same order as ``offsets``.
        item_ids: ``(num_items + 1,)`` the source's item id of each dense id (entry 0 is padding).
    """

    name: str
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    labels: np.ndarray
    num_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        num_events = int(self.offsets[-1]) if len(self.offsets) else 0
        assert self.offsets.ndim == 1 and self.offsets[0] == 0, "offsets must start at 0"
        assert np.all(np.diff(self.offsets) >= 0), "offsets must be non-decreasing"
        assert len(self.items) == len(self.timestamps) == len(self.labels) == num_events
        assert len(self.user_ids) == len(self.offsets) - 1
        assert num_events == 0 or (self.items.min() >= 1 and self.items.max() <= self.num_items)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """``(U,)`` int64 number of events per user."""
        return np.diff(self.offsets)

    def user_slice(self, user: int) -> slice:
        return slice(int(self.offsets[user]), int(self.offsets[user + 1]))

    def has_labels(self) -> bool:
        return bool(self.num_events) and bool(np.all(self.labels != UNKNOWN_LABEL))


@dataclass(frozen=True)
class CTRRows:
    """Explicit click-through rows defined by a source (one candidate item per row).

    Row ``r`` asks: given user ``user[r]``'s first ``history_len[r]`` events, will they click ``item[r]``?

    Attributes:
        user: ``(R,)`` int64 index into :class:`Sequences` users.
        history_len: ``(R,)`` int64 number of the user's events visible to the row (``<= lengths[user]``).
        item: ``(R,)`` int64 dense candidate item id.
        timestamp: ``(R,)`` int64 time of the request (used by the time bias).
        label: ``(R,)`` int8 0/1.
        split: ``(R,)`` int8, 0 train, 1 valid, 2 test.
    """

    user: np.ndarray
    history_len: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray
    split: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.user)
        assert all(len(a) == n for a in (self.history_len, self.item, self.timestamp, self.label, self.split))

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> CTRRows:
        return CTRRows(*(a[mask] for a in (self.user, self.history_len, self.item, self.timestamp,
                                           self.label, self.split)))


SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2


@dataclass(frozen=True)
class Dataset:
    """What a source reader returns: the sequences and, if the source defines them, its own CTR rows."""

    sequences: Sequences
    ctr_rows: CTRRows | None = None


class DataError(MallocError, ValueError):
    """A user-caused data problem: the message names the input (file, line) and what was expected."""


def build_sequences(
    name: str,
    user_raw: np.ndarray,
    item_raw: np.ndarray,
    timestamps: np.ndarray,
    labels: np.ndarray,
    chunk: int = 1 << 20,
) -> Sequences:
    """Group flat interactions by user, sort each user's events by time (stable), and densify item ids.

    Exact duplicates (the same user, item, timestamp and label: the same event as the model sees it) would
    count one interaction twice in the history and in the CTR rows; every repeat after the first is dropped and
    the count logged.

    Memory: besides the inputs and the outputs, one sort permutation and the sorted user ids (``E`` each) at most,
    and temporaries of about ``chunk`` events (repeats are looked for, and item ids mapped, a chunk at a time); the
    item ids are densified through a table over the id range where the ids are small non-negative integers
    (MovieLens's), else by one sort of the distinct ids.

    Args:
        user_raw: ``(E,)`` source user ids (any sortable dtype).
        item_raw: ``(E,)`` source item ids (any sortable dtype).
        timestamps: ``(E,)`` int64.
        labels: ``(E,)`` int8 (``UNKNOWN_LABEL`` allowed).
    Returns:
        Sequences with users in ascending source-id order and dense items ``1..num_items`` in ascending
        source-id order.
    """
    order = np.lexsort((timestamps, user_raw))  # stable: a user's events at one time keep their file order
    user_sorted = user_raw[order]
    count = len(order)
    starts = np.flatnonzero(user_sorted[1:] != user_sorted[:-1]) + 1 if count else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([np.zeros(min(count, 1), dtype=np.int64), starts])  # (U,) each user's first event
    user_ids = user_sorted[starts]
    del user_sorted
    time_sorted = timestamps[order].astype(np.int64, copy=False)
    keep = _not_repeated(order, starts, time_sorted, item_raw, labels, chunk)
    lengths = np.diff(np.append(starts, count))
    if keep is not None:
        logger.info("%s: dropped %d exact duplicate events (same user, item, timestamp and label)", name,
                    int(count - keep.sum()))
        lengths = np.add.reduceat(keep, starts, dtype=np.int64)  # a user keeps every first occurrence
        order, time_sorted = order[keep], time_sorted[keep]
    offsets = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    item_ids, items = _dense_items(item_raw, order, chunk)
    return Sequences(
        name=name,
        offsets=offsets,
        items=items,
        timestamps=time_sorted,
        labels=labels[order].astype(np.int8, copy=False),
        num_items=len(item_ids),
        user_ids=user_ids,
        item_ids=np.concatenate([np.zeros(1, dtype=item_ids.dtype), item_ids]),
    )


def _not_repeated(order: np.ndarray, starts: np.ndarray, time_sorted: np.ndarray, item_raw: np.ndarray,
                  labels: np.ndarray, chunk: int) -> np.ndarray | None:
    """``(E,)`` bool over the sorted events: False for a repeat of an earlier event (in file order) of the same
    user, item, timestamp and label; None where there is none.

    ``starts`` ``(U,)``: the first sorted event of each user. A repeat shares its user and timestamp, so users are
    taken ``chunk`` events at a time (more where one user has more), and in each only the runs of events of one user and
    one timestamp (which ``order`` keeps in file order) are checked, with :func:`first_occurrences`.
    """
    count = len(order)
    near = np.searchsorted(starts, np.arange(0, count, chunk))  # the first user starting at or after each
    cuts = np.unique(np.append(starts[near[near < len(starts)]], count)).tolist()
    keep = None
    for first, stop in itertools.pairwise(cuts):
        new_user = np.zeros(stop - first, dtype=bool)
        new_user[starts[np.searchsorted(starts, first):np.searchsorted(starts, stop)] - first] = True
        user = np.cumsum(new_user)  # (n,) the chunk's users numbered from 1
        stamp = time_sorted[first:stop]
        same = (user[1:] == user[:-1]) & (stamp[1:] == stamp[:-1])
        if not same.any():
            continue
        in_run = np.zeros(stop - first, dtype=bool)
        in_run[1:] |= same
        in_run[:-1] |= same
        positions = np.flatnonzero(in_run)
        rows = order[first + positions]
        repeated = positions[~first_occurrences(user[positions], stamp[positions], item_raw[rows], labels[rows])]
        if len(repeated):
            if keep is None:
                keep = np.ones(count, dtype=bool)
            keep[first + repeated] = False
    return keep


def _dense_items(item_raw: np.ndarray, order: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct item ids, ascending, and ``(len(order),)`` int64 dense ids ``1..`` of ``item_raw[order]``."""
    items = np.empty(len(order), dtype=np.int64)
    if item_raw.dtype.kind in "iu" and len(item_raw) and 0 <= int(item_raw.min()) \
            and int(item_raw.max()) < max(1 << 22, 4 * len(item_raw)):
        used = np.zeros(int(item_raw.max()) + 1, dtype=bool)
        used[item_raw] = True
        item_ids = np.flatnonzero(used).astype(item_raw.dtype)
        dense = np.cumsum(used, dtype=np.int64)  # (max id + 1,): the 1-based rank of each used id
        for start in range(0, len(order), chunk):
            items[start:start + chunk] = dense[item_raw[order[start:start + chunk]]]
        return item_ids, items
    item_ids = np.unique(item_raw)
    for start in range(0, len(order), chunk):
        items[start:start + chunk] = np.searchsorted(item_ids, item_raw[order[start:start + chunk]]) + 1
    return item_ids, items


def first_occurrences(*columns: np.ndarray) -> np.ndarray:
    """``(E,)`` bool: whether each row of the ``(E,)`` columns is the first (in file order) of its exact repeats."""
    count = len(columns[0])
    if count == 0:
        return np.ones(0, dtype=bool)
    order = np.lexsort((np.arange(count), *reversed(columns)))
    repeat = np.ones(count, dtype=bool)
    repeat[0] = False
    for column in columns:
        ordered = column[order]
        repeat[1:] &= ordered[1:] == ordered[:-1]
    first = np.ones(count, dtype=bool)
    first[order[repeat]] = False
    return first
