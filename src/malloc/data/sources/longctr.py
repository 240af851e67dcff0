"""reczoo/LongCTR (``MicroVideo1.7M_x2``, ``KuaiVideo_x2``) reader: Parquet files, needs ``pyarrow``.

Layout of the directory:

* ``train.parquet``, ``valid.parquet`` (optional), ``test.parquet``: one CTR row per record, columns
  ``user_index``, ``item_index`` (the candidate), ``seq_len`` and the label ``is_click`` (``label`` is
  accepted too). Splits: train 0, valid 1, test 2; without ``valid.parquet`` no row has split 1.
* ``user_info.parquet``: ``full_item_seq`` (list of item indices) per user. If it has a ``user_index``
  column, that names the user of each record (unique); otherwise the record number (0-based) does, as in
  the LongCTR loader (``user_info["full_item_seq"].values[user_index]``).
* ``item_info.parquet`` (optional): one record per item index, record 0 = padding. Only its record count is
  used, to check that every item index is ``< count``.

Rules:

* History of a row = ``full_item_seq[user][:seq_len]`` with padding (item 0) masked out, as the LongCTR
  loader does. Padding never becomes an event: a user's events are the non-zero entries of
  ``full_item_seq`` in order, and a row's ``history_len`` is the number of non-zero entries among the first
  ``seq_len``. Consistency checks: ``user_index`` must exist in ``user_info``, ``0 <= seq_len <=
  len(full_item_seq)``, the candidate ``item_index >= 1``, the label 0 or 1; else a :class:`DataError`
  naming the file and the 1-based record number.
* Events carry ``UNKNOWN_LABEL``: ``full_item_seq`` records what the user consumed, not a click label.
* Timestamps are order indices (event ``i`` of a user has timestamp ``i``; a row's is its ``history_len``).
* Items are densified to ``1..num_items`` in ascending ``item_index`` over the items of all sequences and
  all rows (:func:`~malloc.data.sources.reczoo.assemble`); ``item_ids`` maps back to ``item_index``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from malloc.data.sequences import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, UNKNOWN_LABEL, DataError, Dataset
from malloc.data.sources.reczoo import assemble

PARQUET_HINT = "pip install 'malloc-bench[parquet]'"
SPLIT_FILES: tuple[tuple[str, int, bool], ...] = (  # (file name, split, required)
    ("train.parquet", SPLIT_TRAIN, True),
    ("valid.parquet", SPLIT_VALID, False),
    ("test.parquet", SPLIT_TEST, True),
)
ROW_COLUMNS = ("user_index", "item_index", "seq_len")
LABEL_COLUMNS = ("is_click", "label")


def read_longctr(path: Path, *, name: str) -> Dataset:
    """Read a LongCTR directory into sequences plus the files' own CTR rows (see the module rules)."""
    pq = _parquet()
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; expected a LongCTR directory (train/test.parquet, ...)")
    user_ids, raw_offsets, raw_items = _read_user_info(pq, path / "user_info.parquet")
    item_limit = _item_limit(pq, path / "item_info.parquet")
    if item_limit is not None and len(raw_items) and raw_items.max() >= item_limit:
        user = int(np.searchsorted(raw_offsets, int(np.argmax(raw_items >= item_limit)), side="right")) - 1
        raise DataError(
            f"{path / 'user_info.parquet'}: full_item_seq of user_index {user_ids[user]} holds an item index "
            f">= {item_limit}, the record count of item_info.parquet"
        )

    keep = raw_items > 0
    kept_before = np.zeros(len(raw_items) + 1, dtype=np.int64)  # non-padding entries before each position
    np.cumsum(keep, out=kept_before[1:])
    parts = [
        _read_rows(pq, path / filename, split, user_ids, raw_offsets, kept_before, item_limit)
        for filename, split, required in SPLIT_FILES
        if required or (path / filename).exists()
    ]
    row_user, history_len, row_items, label, split = (np.concatenate(c) for c in zip(*parts, strict=True))
    return assemble(
        name,
        user_ids=user_ids,
        offsets=kept_before[raw_offsets],
        event_items=raw_items[keep],
        event_labels=np.full(int(keep.sum()), UNKNOWN_LABEL, dtype=np.int8),
        row_user=row_user,
        row_history_len=history_len,
        row_items=row_items,
        row_label=label,
        row_split=split,
    )


def _parquet() -> ModuleType:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"reading LongCTR Parquet files needs pyarrow: {PARQUET_HINT}") from err
    return pq


def _column_names(pq: ModuleType, file: Path) -> list[str]:
    if not file.is_file():
        raise DataError(f"{file}: file not found")
    try:
        return list(pq.read_schema(file).names)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
        raise DataError(f"{file}: not a readable Parquet file ({err})") from err


def _open_table(pq: ModuleType, file: Path, columns: list[str]) -> Any:
    names = _column_names(pq, file)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{file}: missing column(s) {missing}; found {names}")
    return pq.read_table(file, columns=columns)


def _int_column(values: np.ndarray, file: Path, column: str, first_record: int = 1) -> np.ndarray:
    """``(N,)`` int64 from a numeric column, or DataError at the first null / non-integral record."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.floor(values)))
        if len(bad) == 0:
            return values.astype(np.int64)
        raise DataError(f"{file}, record {first_record + int(bad[0])}: {column} must be an integer")
    raise DataError(f"{file}: column {column} must be integer, found dtype {values.dtype}")


def _column_numpy(table: Any, file: Path, column: str) -> np.ndarray:
    chunked = table.column(column)
    if chunked.null_count:
        first_null = int(np.flatnonzero(chunked.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{file}, record {first_null + 1}: {column} is null")
    return _int_column(chunked.to_numpy(), file, column)


def _read_user_info(pq: ModuleType, file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns ``user_ids (U,)`` int64, ``offsets (U + 1,)`` int64 and ``items (T,)`` int64 (padding kept)."""
    has_index = "user_index" in _column_names(pq, file)
    table = _open_table(pq, file, ["user_index", "full_item_seq"] if has_index else ["full_item_seq"])
    seqs = table.column("full_item_seq").combine_chunks()
    if not hasattr(seqs, "value_lengths"):  # a list column has per-record lengths; a scalar column has none
        raise DataError(f"{file}: column full_item_seq must be a list of item indices per user, found {seqs.type}")
    if seqs.null_count:
        first_null = int(np.flatnonzero(seqs.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{file}, record {first_null + 1}: full_item_seq is null")
    lengths = np.asarray(seqs.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64)
    values = seqs.flatten()
    if values.null_count:
        raise DataError(f"{file}: full_item_seq holds null items")
    items = _int_column(values.to_numpy(zero_copy_only=False), file, "full_item_seq")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(items) and items.min() < 0:
        record = int(np.searchsorted(offsets, int(np.argmax(items < 0)), side="right"))
        raise DataError(f"{file}, record {record}: negative item index in full_item_seq")
    if not has_index:
        return np.arange(len(lengths), dtype=np.int64), offsets, items
    user_ids = _column_numpy(table, file, "user_index")
    order = np.argsort(user_ids, kind="stable")
    sorted_ids = user_ids[order]
    repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(repeated):
        record = int(order[repeated[0] + 1]) + 1
        raise DataError(f"{file}, record {record}: user_index {sorted_ids[repeated[0]]} appears twice")
    # Reorder the jagged sequences by user_index.
    new_lengths = lengths[order]
    new_offsets = np.zeros_like(offsets)
    np.cumsum(new_lengths, out=new_offsets[1:])
    gather = np.repeat(offsets[:-1][order] - new_offsets[:-1], new_lengths) + np.arange(int(new_offsets[-1]))
    return sorted_ids, new_offsets, items[gather]


def _item_limit(pq: ModuleType, file: Path) -> int | None:
    if not file.exists():
        return None
    try:
        return int(pq.ParquetFile(file).metadata.num_rows)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
        raise DataError(f"{file}: not a readable Parquet file ({err})") from err


def _read_rows(
    pq: ModuleType,
    file: Path,
    split: int,
    user_ids: np.ndarray,
    raw_offsets: np.ndarray,
    kept_before: np.ndarray,
    item_limit: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One split file's rows: ``user, history_len, item, label, split``, each ``(R,)``."""
    names = _column_names(pq, file)
    label_column = next((c for c in LABEL_COLUMNS if c in names), LABEL_COLUMNS[0])
    table = _open_table(pq, file, [*ROW_COLUMNS, label_column])
    user_index, item, seq_len, label = (_column_numpy(table, file, c) for c in (*ROW_COLUMNS, label_column))

    user = np.searchsorted(user_ids, user_index)
    found = user < len(user_ids)
    found[found] = user_ids[user[found]] == user_index[found]
    _fail_first(~found, file, "user_index not in user_info.parquet", user_index)
    lengths = np.diff(raw_offsets)[user]
    _fail_first((seq_len < 0) | (seq_len > lengths), file, "seq_len outside 0..len(full_item_seq)", seq_len)
    _fail_first(item < 1, file, "item_index must be >= 1 (0 is padding)", item)
    if item_limit is not None:
        _fail_first(item >= item_limit, file, f"item_index >= {item_limit}, the size of item_info", item)
    _fail_first((label != 0) & (label != 1), file, f"{label_column} must be 0 or 1", label)
    start = raw_offsets[user]
    history_len = kept_before[start + seq_len] - kept_before[start]
    return user, history_len, item, label.astype(np.int8), np.full(len(user), split, dtype=np.int8)


def _fail_first(bad: np.ndarray, file: Path, message: str, values: np.ndarray) -> None:
    index = np.flatnonzero(bad)
    if len(index):
        record = int(index[0])
        raise DataError(f"{file}, record {record + 1}: {message} (found {values[record]})")
