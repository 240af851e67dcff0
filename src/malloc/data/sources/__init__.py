"""Source readers: one entry point, :func:`load_dataset`, for every data set MALLOC knows.

=======================  ===========================================================  =============
source                   what ``path`` points at                                       reader
=======================  ===========================================================  =============
``ml-100k``              nothing (embedded copy in ``recbole``), or ``u.data`` /       movielens
                         ``ml-100k.inter`` (file or directory holding it)
``ml-1m``                ``ratings.dat`` (file or directory holding it)                 movielens
``ml-20m``, ``ml-latest`` ``ratings.csv`` (file or directory holding it)               movielens
``ml-latest-small``      nothing (Debian ``r-cran-dslabs`` unpacked in the cache), or  dslabs
                         its ``Rdata.rdb`` / a folder above it
``amazon-electronics``   reczoo ``AmazonElectronics_x1`` directory (CSV)               reczoo
``microvideo``,          reczoo/LongCTR ``*_x2`` directory (Parquet)                   longctr
``kuaivideo``
``synthetic``            nothing (see :class:`~malloc.data.sources.synthetic.SyntheticConfig`)  synthetic
=======================  ===========================================================  =============

Readers are imported lazily, so an optional dependency (``pyarrow``) is only needed by the source using it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from malloc.data.sequences import CTRRows, DataError, Dataset, Sequences

if TYPE_CHECKING:
    from malloc.data.sources.synthetic import SyntheticConfig

logger = logging.getLogger("malloc.data")

SOURCES: tuple[str, ...] = (
    "ml-100k",
    "ml-1m",
    "ml-20m",
    "ml-latest",
    "ml-latest-small",
    "amazon-electronics",
    "microvideo",
    "kuaivideo",
    "synthetic",
)

# What each source that needs a path expects it to point at (used in the "missing path" error).
_EXPECTED_PATH: dict[str, str] = {
    "ml-1m": "the MovieLens-1M ratings.dat file (or the directory holding it)",
    "ml-20m": "the MovieLens-20M ratings.csv file (or the directory holding it)",
    "ml-latest": "the MovieLens-latest ratings.csv file (or the directory holding it)",
    "amazon-electronics": "the reczoo AmazonElectronics_x1 directory (train.csv, test.csv, [valid.csv])",
    "microvideo": "the reczoo/LongCTR MicroVideo1.7M_x2 directory ({train,valid,test,user_info}.parquet)",
    "kuaivideo": "the reczoo/LongCTR KuaiVideo_x2 directory (train/valid/test.parquet, user_info.parquet)",
}


def load_dataset(
    source: str,
    path: str | None = None,
    *,
    label_threshold: float = 4.0,
    min_events: int = 3,
    synthetic: SyntheticConfig | None = None,
) -> Dataset:
    """Read one data set and drop users that are too short.

    Args:
        source: one of :data:`SOURCES`.
        path: where the files are (module table); ``None`` for ``ml-100k`` (embedded), ``ml-latest-small``
            (cache, :mod:`malloc.data.sources.dslabs`) and ``synthetic``.
        label_threshold: MovieLens only (ml-latest-small too): an event is positive (label 1) iff
            ``rating >= label_threshold``.
        min_events: users with fewer events are dropped (:func:`drop_short_users`).
        synthetic: configuration of the ``synthetic`` source (default ``SyntheticConfig()``); ignored by
            the other sources.
    Returns:
        The :class:`Dataset`; ``ctr_rows`` is set by the sources that define their own rows (reczoo, LongCTR).
    Raises:
        DataError: unknown source, missing path, unreadable or malformed files, or no user left.
    """
    check_source(source, path)
    try:
        dataset = _read(source, None if path is None else Path(path).expanduser(), label_threshold, synthetic)
    except OSError as exc:  # permission, a folder where a file was expected, an I/O error
        raise DataError(f"{exc.filename or path}: cannot read the {source} data ({exc.strerror or exc})") from exc
    dataset, dropped = drop_short_users(dataset, min_events)
    if dropped:
        logger.info("%s: dropped %d users with fewer than %d events", source, dropped, min_events)
    if dataset.sequences.num_users == 0:
        raise DataError(f"data set {source!r} has no user with at least {min_events} events")
    return dataset


def check_source(source: str, path: str | None) -> None:
    """Raise a :class:`DataError` unless ``source`` is known and ``path`` is given exactly where it needs one."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; known sources: {', '.join(SOURCES)}")
    if source == "synthetic" and path is not None:
        raise DataError(f"source 'synthetic' is generated and takes no path (got {path!r})")
    if source in _EXPECTED_PATH and path is None:
        raise DataError(f"source {source!r} needs a path: {_EXPECTED_PATH[source]}")


def _read(
    source: str, path: Path | None, label_threshold: float, synthetic: SyntheticConfig | None
) -> Dataset:
    if source == "ml-latest-small":
        from malloc.data.sources import dslabs

        return dslabs.read_dslabs_movielens(path, label_threshold=label_threshold, name=source)
    if source.startswith("ml-"):
        from malloc.data.sources import movielens

        return movielens.read_movielens(source, path, label_threshold=label_threshold)
    if source == "amazon-electronics":
        from malloc.data.sources import reczoo

        assert path is not None
        return reczoo.read_amazon_electronics(path, name=source)
    if source in ("microvideo", "kuaivideo"):
        from malloc.data.sources import longctr

        assert path is not None
        return longctr.read_longctr(path, name=source)
    from malloc.data.sources import synthetic as synthetic_source

    return synthetic_source.generate(synthetic or synthetic_source.SyntheticConfig())


def drop_short_users(dataset: Dataset, min_events: int) -> tuple[Dataset, int]:
    """Drop every user with fewer than ``min_events`` events; return the new data set and the number dropped.

    Rule (one pass, users only, not an iterated k-core): a user is kept iff ``lengths[u] >= min_events``.
    Kept users keep their order and all their events; the CTR rows of dropped users are dropped and the
    remaining rows' ``user`` indices are renumbered. Item ids are then re-densified over the items still
    referenced by a kept event or a kept CTR row, keeping their relative (ascending source-id) order, so
    ``num_items`` counts only items that still occur. ``min_events <= 0`` keeps everyone (including users
    with no events) and returns the input unchanged.
    """
    if min_events <= 0:
        return dataset, 0
    seq = dataset.sequences
    keep_user = seq.lengths >= min_events
    dropped = int(seq.num_users - keep_user.sum())
    if dropped == 0:
        return dataset, 0
    event_user = np.repeat(np.arange(seq.num_users), seq.lengths)
    keep_event = keep_user[event_user]
    new_user = np.cumsum(keep_user) - 1  # (U,) new index of each kept user
    rows = dataset.ctr_rows
    if rows is not None:
        rows = rows.select(keep_user[rows.user])

    items = seq.items[keep_event]
    used = np.zeros(seq.num_items + 1, dtype=bool)
    used[items] = True
    if rows is not None:
        used[rows.item] = True
    used[0] = True  # padding stays id 0
    new_item = np.cumsum(used) - 1  # (num_items + 1,) dense remap, 0 -> 0
    if rows is not None:
        rows = CTRRows(
            new_user[rows.user], rows.history_len, new_item[rows.item], rows.timestamp, rows.label, rows.split
        )
    offsets = np.zeros(int(keep_user.sum()) + 1, dtype=np.int64)
    np.cumsum(seq.lengths[keep_user], out=offsets[1:])
    sequences = Sequences(
        name=seq.name,
        offsets=offsets,
        items=new_item[items].astype(np.int64),
        timestamps=seq.timestamps[keep_event],
        labels=seq.labels[keep_event],
        num_items=int(used.sum()) - 1,
        user_ids=seq.user_ids[keep_user],
        item_ids=seq.item_ids[used],
    )
    return Dataset(sequences, rows), dropped


__all__ = ["SOURCES", "check_source", "drop_short_users", "load_dataset"]
