"""Task views: CTR rows and next-item retrieval targets, as indices into the jagged :class:`Sequences`.

CTR (the MALLOC paper's task). A row asks whether a user clicks an item given the events before it. Sources that
define their own rows (reczoo, LongCTR) keep them. Otherwise every event ``i >= 1`` of a labelled user is a row
(history = events ``0..i-1``, label = the event's label) and the split is **per user and temporal**: the last
``ceil(test_fraction * n)`` events of a user of ``n`` events are test rows, the ``ceil(valid_fraction * n)`` before
them are validation rows, the rest train. Users never cross splits by time: a test row is always later than
every train row of the same user.

Retrieval (the SASRec/HSTU task): leave-one-out by time. A user's last event is the test target, the one before
it the validation target, and next-item prediction on the events before those is the training signal.

Training windows. A user's training events are cut, from the newest backwards, into windows of at most
``max_len`` events; positions restart at 0 in every window, exactly as the serving path numbers a state written
from the window's first event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from malloc.data.sequences import (
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    CTRRows,
    DataError,
    Dataset,
    Sequences,
)

SPLITS = {"train": SPLIT_TRAIN, "valid": SPLIT_VALID, "test": SPLIT_TEST}


def derive_ctr_rows(seqs: Sequences, test_fraction: float, valid_fraction: float) -> CTRRows:
    """Every event ``i >= 1`` of every user becomes a row, split per user by time (see module docstring)."""
    if not seqs.has_labels():
        raise DataError(f"data set {seqs.name!r} has no event labels, so it has no CTR task; use task=retrieval")
    lengths = seqs.lengths
    user = np.repeat(np.arange(seqs.num_users), lengths)
    index_in_user = np.arange(seqs.num_events) - np.repeat(seqs.offsets[:-1], lengths)
    n = lengths[user]
    n_test = np.ceil(test_fraction * n).astype(np.int64)
    n_valid = np.ceil(valid_fraction * n).astype(np.int64)
    split = np.full(seqs.num_events, SPLIT_TRAIN, dtype=np.int8)
    split[index_in_user >= n - n_test - n_valid] = SPLIT_VALID
    split[index_in_user >= n - n_test] = SPLIT_TEST
    keep = index_in_user >= 1
    return CTRRows(user=user[keep], history_len=index_in_user[keep], item=seqs.items[keep],
                   timestamp=seqs.timestamps[keep], label=seqs.labels[keep].astype(np.int8), split=split[keep])


def ctr_rows(ds: Dataset, test_fraction: float = 0.1, valid_fraction: float = 0.1) -> CTRRows:
    """The source's own rows if it has them, else rows derived from labelled events."""
    if ds.ctr_rows is not None:
        return ds.ctr_rows
    return derive_ctr_rows(ds.sequences, test_fraction, valid_fraction)


@dataclass(frozen=True)
class Window:
    """A training window: events ``start:stop`` of ``user`` (positions ``0..stop-start-1``)."""

    user: int
    start: int
    stop: int


def windows(ends: np.ndarray, max_len: int, overlap: int = 0) -> list[Window]:
    """Cut each user's events ``0:ends[u]`` into windows of at most ``max_len``, newest first.

    Consecutive windows share ``overlap`` events (retrieval uses 1, so every next-item transition is trained).
    """
    assert 0 <= overlap < max_len
    out = []
    for user, end in enumerate(ends.tolist()):
        stop = end
        while stop > 0:
            start = max(0, stop - max_len)
            out.append(Window(user, start, stop))
            if start == 0:
                break
            stop = start + overlap
    return out


@dataclass(frozen=True)
class CTRView:
    """CTR rows of one data set, plus the training windows covering the train rows."""

    sequences: Sequences
    rows: CTRRows

    def split(self, name: str) -> CTRRows:
        return self.rows.select(self.rows.split == SPLITS[name])


@dataclass(frozen=True)
class RetrievalView:
    """Leave-one-out targets: ``targets[split]`` is the index within the user of the event to predict.

    Users need at least 3 events (one to train on, one validation and one test target).
    """

    sequences: Sequences

    def __post_init__(self) -> None:
        short = int((self.sequences.lengths < 3).sum())
        if short:
            raise DataError(f"{short} users of {self.sequences.name!r} have fewer than 3 events; retrieval needs "
                            "3 (train, valid, test): raise data.min_events to 3")

    def target_index(self, name: str) -> np.ndarray:
        """``(U,)`` int64 index within each user of the target event of split ``name`` (valid or test)."""
        lengths = self.sequences.lengths
        return lengths - 1 if name == "test" else lengths - 2

    def train_ends(self) -> np.ndarray:
        """``(U,)`` number of events usable for training (everything before the validation target)."""
        return self.sequences.lengths - 2
