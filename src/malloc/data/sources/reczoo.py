"""reczoo/BARS ``AmazonElectronics_x1`` reader, and :func:`assemble`, the row-based builder LongCTR shares.

Layout: a directory with ``train.csv`` and ``test.csv`` (and optionally ``valid.csv``), each with the header
``label,user_id,item_id,cate_id,item_history,cate_history``; ``item_history`` is the user's earlier reviewed
items, ``^``-separated and possibly empty. Categories are not used.

Rules this reader applies (the file has no per-user sequence, so it is reconstructed from the rows):

* **The user's sequence** is the longest ``item_history`` among all the user's rows (all files). It is
  extended by one item, the row's ``item_id``, when the label-1 rows carrying exactly that longest history
  all name the same item (DIN's construction: the test row's positive is the user's last review); with no
  such row, or rows that disagree, it is not extended.
* **Consistency**: every row's ``item_history`` must be a prefix of the user's sequence; the row's
  ``history_len`` is its number of items. A row that is not a prefix is a :class:`DataError` naming the
  file and line (and where the longest history came from).
* **Events** are reviews, so every event has label 1. The data has no time, so event ``i`` of a user has
  timestamp ``i`` (its order index) and a row's timestamp is its ``history_len`` (the index of the event it
  predicts).
* **Splits**: ``train.csv`` rows are split 0, ``valid.csv`` 1, ``test.csv`` 2. Without ``valid.csv`` (the
  public release has none) no row has split 1.
* **Ids**: users and items are the file's tokens; when every token of a kind is an integer they are
  ordered numerically, else as strings. Users are ordered by id, items densified to ``1..num_items`` in id
  order over the items of all sequences *and* all rows (negative candidates may never be reviewed).
"""

from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass, field
from pathlib import Path

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

AMAZON_HEADER = "label,user_id,item_id,cate_id,item_history,cate_history"
HISTORY_SEP = "^"
SPLIT_FILES: tuple[tuple[str, int, bool], ...] = (  # (file name, split, required)
    ("train.csv", SPLIT_TRAIN, True),
    ("valid.csv", SPLIT_VALID, False),
    ("test.csv", SPLIT_TEST, True),
)
_LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


@dataclass
class _Rows:
    """Rows of all split files, as read (parallel columns, one entry per data line)."""

    files: list[Path] = field(default_factory=list)
    file: array = field(default_factory=lambda: array("b"))  # index into ``files``
    line: array = field(default_factory=lambda: array("q"))  # 1-based line number in its file
    label: array = field(default_factory=lambda: array("b"))
    split: array = field(default_factory=lambda: array("b"))
    user: list[str] = field(default_factory=list)
    item: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    history_len: array = field(default_factory=lambda: array("q"))  # number of items in ``history``

    def where(self, row: int) -> str:
        return f"{self.files[self.file[row]]}, line {self.line[row]}"


def read_amazon_electronics(path: Path, *, name: str = "amazon-electronics") -> Dataset:
    """Read an ``AmazonElectronics_x1`` directory into sequences plus the files' own CTR rows."""
    if not path.is_dir():
        raise DataError(
            f"{path}: not a directory; expected the AmazonElectronics_x1 directory (train.csv, test.csv)"
        )
    rows = _Rows()
    for filename, split, required in SPLIT_FILES:
        file = path / filename
        if not file.is_file():
            if required:
                raise DataError(f"{file}: file not found (AmazonElectronics_x1 needs train.csv and test.csv)")
            continue
        _read_split_file(file, split, rows)
    if not rows.user:
        raise DataError(f"{path}: the split files hold no data rows")
    return _rows_to_dataset(name, rows)


def _read_split_file(file: Path, split: int, rows: _Rows) -> None:
    rows.files.append(file)
    file_index = len(rows.files) - 1
    with file.open("rb") as stream:
        header = _decode_line(stream.readline(), file, 1)
        if not header.strip():
            raise DataError(f"{file}, line 1: file is empty; expected the header {AMAZON_HEADER!r}")
        if header != AMAZON_HEADER:
            raise DataError(f"{file}, line 1: expected the header {AMAZON_HEADER!r}, found {header!r}")
        for line_no, raw in enumerate(stream, start=2):
            line = _decode_line(raw, file, line_no)
            if not line:
                continue
            fields = next(csv.reader([line])) if '"' in line else line.split(",")
            if len(fields) != 6:
                raise DataError(
                    f"{file}, line {line_no}: expected 6 comma-separated fields ({AMAZON_HEADER}), "
                    f"found {len(fields)}"
                )
            label, user, item, _, history, _ = fields
            if label not in _LABELS:
                raise DataError(f"{file}, line {line_no}: label must be 0 or 1, found {label!r}")
            if not user or not item or HISTORY_SEP in item:
                raise DataError(f"{file}, line {line_no}: user_id and item_id must be single non-empty ids")
            rows.file.append(file_index)
            rows.line.append(line_no)
            rows.label.append(_LABELS[label])
            rows.split.append(split)
            rows.user.append(user)
            rows.item.append(item)
            rows.history.append(history)
            rows.history_len.append(history.count(HISTORY_SEP) + 1 if history else 0)


def _decode_line(raw: bytes, file: Path, line_no: int) -> str:
    """One line of UTF-8 text without its line end, or a DataError naming the file and line."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{file}, line {line_no}: not UTF-8 text (byte {err.start} of the line)") from None


def _rows_to_dataset(name: str, rows: _Rows) -> Dataset:
    source_row = _sequence_source_rows(rows)  # user token -> row holding the user's longest history
    sequence_text = _extend_with_positives(rows, source_row)
    _check_prefixes(rows, sequence_text, source_row)

    user_tokens = list(sequence_text)
    user_ids = sortable_ids(user_tokens)
    order = np.argsort(user_ids, kind="stable")
    user_ids = user_ids[order]
    user_tokens = [user_tokens[i] for i in order.tolist()]
    user_index = {token: i for i, token in enumerate(user_tokens)}

    event_items: list[str] = []
    offsets = np.zeros(len(user_tokens) + 1, dtype=np.int64)
    for i, token in enumerate(user_tokens):
        event_items.extend(_split_sequence(sequence_text[token], rows, source_row[token]))
        offsets[i + 1] = len(event_items)
    items = sortable_ids(event_items + rows.item)
    return assemble(
        name,
        user_ids=user_ids,
        offsets=offsets,
        event_items=items[: len(event_items)],
        event_labels=np.ones(len(event_items), dtype=np.int8),
        row_user=np.array([user_index[u] for u in rows.user], dtype=np.int64),
        row_history_len=np.frombuffer(rows.history_len, dtype=np.int64).copy(),
        row_items=items[len(event_items) :],
        row_label=np.frombuffer(rows.label, dtype=np.int8).copy(),
        row_split=np.frombuffer(rows.split, dtype=np.int8).copy(),
    )


def _sequence_source_rows(rows: _Rows) -> dict[str, int]:
    """For each user, the first row with the user's longest ``item_history``."""
    best: dict[str, int] = {}
    lengths = rows.history_len
    for row, user in enumerate(rows.user):
        current = best.get(user)
        if current is None or lengths[row] > lengths[current]:
            best[user] = row
    return best


def _extend_with_positives(rows: _Rows, source_row: dict[str, int]) -> dict[str, str]:
    """User token -> the user's sequence as ``^``-joined text (see the module rules)."""
    positives: dict[str, set[str]] = {}
    for row, user in enumerate(rows.user):
        best = source_row[user]
        if rows.label[row] == 1 and rows.history_len[row] == rows.history_len[best]:
            if rows.history[row] == rows.history[best]:
                positives.setdefault(user, set()).add(rows.item[row])
    sequences: dict[str, str] = {}
    for user, best in source_row.items():
        history = rows.history[best]
        targets = positives.get(user, set())
        if len(targets) == 1:
            (item,) = targets
            history = f"{history}{HISTORY_SEP}{item}" if history else item
        sequences[user] = history
    return sequences


def _check_prefixes(rows: _Rows, sequence_text: dict[str, str], source_row: dict[str, int]) -> None:
    """Every row's ``item_history`` must be a whole-item prefix of its user's sequence."""
    for row, user in enumerate(rows.user):
        history = rows.history[row]
        if not history:
            continue
        sequence = sequence_text[user]
        n = len(history)
        if not sequence.startswith(history) or (len(sequence) > n and sequence[n] != HISTORY_SEP):
            raise DataError(
                f"{rows.where(row)}: item_history of user {user!r} is not a prefix of the user's sequence "
                f"(the longest history of that user, at {rows.where(source_row[user])})"
            )


def _split_sequence(text: str, rows: _Rows, source: int) -> list[str]:
    tokens = text.split(HISTORY_SEP) if text else []
    if "" in tokens:
        raise DataError(f"{rows.where(source)}: item_history has an empty item (a stray {HISTORY_SEP!r})")
    return tokens


def sortable_ids(tokens: list[str]) -> np.ndarray:
    """``(N,)`` ids from text tokens: int64 when every token is a canonical non-negative integer, else str.

    Canonical (no sign, no leading zero) keeps the map token -> id one-to-one, so ``"7"`` and ``"07"`` stay
    distinct (as strings).
    """
    if all(t.isdigit() and t.isascii() and (len(t) == 1 or t[0] != "0") and len(t) < 19 for t in tokens):
        return np.array(tokens, dtype=np.int64) if tokens else np.zeros(0, dtype=np.int64)
    return np.array(tokens, dtype=str)


def assemble(
    name: str,
    *,
    user_ids: np.ndarray,
    offsets: np.ndarray,
    event_items: np.ndarray,
    event_labels: np.ndarray,
    row_user: np.ndarray,
    row_history_len: np.ndarray,
    row_items: np.ndarray,
    row_label: np.ndarray,
    row_split: np.ndarray,
) -> Dataset:
    """Build a :class:`Dataset` from per-user sequences and CTR rows given with source item ids.

    Items are densified to ``1..num_items`` (ascending source id) over the union of event and row items,
    so a candidate that nobody consumed still gets an id. Timestamps are order indices: event ``i`` of a user
    has timestamp ``i`` and a row's timestamp is its ``history_len``.

    Args:
        user_ids: ``(U,)`` source user ids, in sequence order.
        offsets: ``(U + 1,)`` int64 jagged offsets of the events.
        event_items: ``(E,)`` source item ids (same dtype as ``row_items``).
        event_labels: ``(E,)`` int8.
        row_user: ``(R,)`` int64 index into ``user_ids``.
        row_history_len: ``(R,)`` int64, ``<= lengths[row_user]``.
        row_items: ``(R,)`` source item ids.
        row_label, row_split: ``(R,)`` int8.
    """
    lengths = np.diff(offsets)
    assert np.all(row_history_len <= lengths[row_user]), "a row sees more events than its user has"
    item_ids, dense = np.unique(np.concatenate([event_items, row_items]), return_inverse=True)
    dense = dense.astype(np.int64) + 1
    starts = np.repeat(offsets[:-1], lengths)
    sequences = Sequences(
        name=name,
        offsets=offsets.astype(np.int64),
        items=dense[: len(event_items)],
        timestamps=np.arange(int(offsets[-1]), dtype=np.int64) - starts,
        labels=event_labels.astype(np.int8),
        num_items=len(item_ids),
        user_ids=user_ids,
        item_ids=np.concatenate([np.zeros(1, dtype=item_ids.dtype), item_ids]),
    )
    rows = CTRRows(
        user=row_user.astype(np.int64),
        history_len=row_history_len.astype(np.int64),
        item=dense[len(event_items) :],
        timestamp=row_history_len.astype(np.int64),
        label=row_label.astype(np.int8),
        split=row_split.astype(np.int8),
    )
    return Dataset(sequences, rows)
