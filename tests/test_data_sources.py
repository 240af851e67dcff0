"""Source readers on tiny generated files: layout, order, densification, labels, rows, and every bad input."""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from malloc.data import (
    SOURCES,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    UNKNOWN_LABEL,
    DataError,
    Dataset,
    Sequences,
    dataset_stats,
    drop_short_users,
    format_stats,
    load_dataset,
)
from malloc.data.sources import movielens

# (user, item, rating, timestamp): users and times deliberately out of order in the file.
RATINGS = [
    (3, 30, 5, 300),
    (1, 20, 4, 200),
    (3, 10, 2, 100),
    (1, 10, 3, 100),
    (2, 40, 1, 50),
    (1, 40, 5, 150),
    (2, 20, 4, 60),
    (3, 20, 4, 200),
    (2, 30, 4.5, 70),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _u_data(rows=RATINGS) -> str:
    return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)


def _inter(rows=RATINGS) -> str:
    return movielens.INTER_HEADER + "\n" + _u_data(rows)


def _ratings_dat(rows=RATINGS) -> str:
    return "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows)


def _ratings_csv(rows=RATINGS) -> str:
    return movielens.CSV_HEADER + "\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows)


def _user_events(seqs: Sequences, user: int) -> list[tuple[int, int, int]]:
    """(source item id, timestamp, label) of each event of ``user``."""
    sl = seqs.user_slice(user)
    return list(
        zip(
            seqs.item_ids[seqs.items[sl]].tolist(),
            seqs.timestamps[sl].tolist(),
            seqs.labels[sl].tolist(),
            strict=True,
        )
    )


def _check_ratings(ds: Dataset, threshold: float = 4.0) -> None:
    seqs = ds.sequences
    assert ds.ctr_rows is None
    assert seqs.offsets.tolist() == [0, 3, 6, 9]
    assert seqs.user_ids.tolist() == [1, 2, 3]
    assert seqs.item_ids.tolist() == [0, 10, 20, 30, 40]  # dense 1..4 in source-id order, 0 padding
    assert seqs.num_items == 4 and seqs.num_events == 9
    assert seqs.items.dtype == np.int64 and seqs.timestamps.dtype == np.int64 and seqs.labels.dtype == np.int8
    expected = {1: [(10, 100, 3), (40, 150, 5), (20, 200, 4)],
                2: [(40, 50, 1), (20, 60, 4), (30, 70, 4.5)],
                3: [(10, 100, 2), (20, 200, 4), (30, 300, 5)]}
    for u, events in expected.items():
        assert _user_events(seqs, u - 1) == [(i, t, int(r >= threshold)) for i, t, r in events]


# ----------------------------------------------------------------------------------------------------------
# MovieLens
# ----------------------------------------------------------------------------------------------------------


def test_u_data_file_and_directory(tmp_path: Path) -> None:
    file = _write(tmp_path / "u.data", _u_data())
    _check_ratings(load_dataset("ml-100k", str(file), min_events=0))
    _check_ratings(load_dataset("ml-100k", str(tmp_path), min_events=0))


def test_inter_file(tmp_path: Path) -> None:
    file = _write(tmp_path / "my.inter", _inter())
    _check_ratings(load_dataset("ml-100k", str(file)))


def test_ratings_dat(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", _ratings_dat())
    _check_ratings(load_dataset("ml-1m", str(tmp_path / "ratings.dat")))
    _check_ratings(load_dataset("ml-1m", str(tmp_path)))


@pytest.mark.parametrize("source", ["ml-20m", "ml-latest"])
def test_ratings_csv_and_threshold(tmp_path: Path, source: str) -> None:
    _write(tmp_path / "ratings.csv", _ratings_csv())
    _check_ratings(load_dataset(source, str(tmp_path)))
    _check_ratings(load_dataset(source, str(tmp_path / "ratings.csv"), label_threshold=4.5), threshold=4.5)


def test_parser_is_exact_and_lenient_on_line_ends(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ints = rng.integers(-(10**12), 10**12, size=(200, 3))
    floats, places = rng.uniform(-1000, 1000, 200), rng.integers(0, 6, 200)
    decimals = [f"{x:.{k}f}" for x, k in zip(floats, places, strict=True)]
    lines = [f"{a},{b},{d},{c}" for (a, b, c), d in zip(ints.tolist(), decimals, strict=True)]
    text = movielens.CSV_HEADER + "\r\n" + "\r\n".join(lines)  # CRLF and no final newline
    values, first_line = movielens.read_numeric_table(_write(tmp_path / "x.csv", text), movielens.RATINGS_CSV)
    assert first_line == 2
    expected = np.array([[float(f) for f in line.split(",")] for line in lines])
    assert np.array_equal(values, expected)
    # Trailing blank lines at the end of the file are tolerated.
    padded = _write(tmp_path / "y.csv", text + "\n\n\n")
    values, _ = movielens.read_numeric_table(padded, movielens.RATINGS_CSV)
    assert np.array_equal(values, expected)


def test_blocks_split_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = _write(tmp_path / "ratings.csv", _ratings_csv())
    whole, _ = movielens.read_numeric_table(file, movielens.RATINGS_CSV)
    for block in (1, 5, 13, 64):
        monkeypatch.setattr(movielens, "_BLOCK_BYTES", block)
        values, _ = movielens.read_numeric_table(file, movielens.RATINGS_CSV)
        assert np.array_equal(values, whole)
    bad = [*RATINGS[:6], ("x", 1, 1, 1), *RATINGS[6:]]
    _write(file, _ratings_csv(bad))
    with pytest.raises(DataError, match=r"line 8: non-numeric"):
        movielens.read_numeric_table(file, movielens.RATINGS_CSV)


def test_embedded_ml100k() -> None:
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole is not installed")
    seqs = load_dataset("ml-100k").sequences
    assert (seqs.num_users, seqs.num_items, seqs.num_events) == (943, 1682, 100_000)
    assert seqs.has_labels()
    same_user = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    steps = np.diff(seqs.timestamps)[np.diff(same_user) == 0]
    assert np.all(steps >= 0)  # chronological within each user


def test_embedded_ml100k_without_recbole(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(package: str) -> None:
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps recbole==1\.2\.1"):
        load_dataset("ml-100k")


# Each case: file name, content, 1-based bad line, words expected in the message.
BAD_MOVIELENS = [
    ("ratings.csv", "", 1, "empty"),
    ("ratings.csv", "\n", 1, "empty"),
    ("ratings.csv", movielens.CSV_HEADER + "\n", 2, "no data lines"),
    ("ratings.csv", "user,item,rating,time\n1,2,3,4\n", 1, "header"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\n1\t2\t3\t4\n", 3, "separator"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\n1,2,3,4\n1,2,3\n", 4, "expected 4 columns"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4,5\n", 2, "found 5"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\nabc,2,3,4\n", 3, "non-numeric"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,good,4\n", 2, "non-numeric"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\n1,2,3,4\n1,2,3,noon\n", 4, "non-numeric"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\n1,,3,4\n", 3, "empty field"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\n1,2-3,3,4\n", 3, "misplaced '-'"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3.5.1,4\n", 2, "more than one '.'"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,-,4\n", 2, "no digit"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\n1.5,2,3,4\n", 3, "user must be an integer"),
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4.25\n", 2, "timestamp must be an integer"),
    # An earlier malformed number wins over a later structural error.
    ("ratings.csv", movielens.CSV_HEADER + "\n1,2,3,4\n1,,3,4\n1,2,3\n", 3, "empty field"),
    ("ratings.dat", "1::2::3::4\n1:2:3:4\n", 2, "separator"),
    ("ratings.dat", "1::2::3::4\n1::2::3::4\n1,2,3,4\n", 3, "separator"),
    ("ratings.dat", "1::2::3::4\n1::2::3\n", 2, "expected 4 columns"),
    ("ratings.dat", "1::2::3::4\n1::2::3::4::5\n", 2, "found 5"),
]


@pytest.mark.parametrize(("name", "content", "line", "words"), BAD_MOVIELENS)
def test_bad_movielens_files(tmp_path: Path, name: str, content: str, line: int, words: str) -> None:
    file = _write(tmp_path / name, content)
    source = "ml-1m" if name == "ratings.dat" else "ml-20m"
    with pytest.raises(DataError) as info:
        load_dataset(source, str(file))
    message = str(info.value)
    assert str(file) in message and f"line {line}:" in message and words in message


def test_bad_u_data_names_line(tmp_path: Path) -> None:
    file = _write(tmp_path / "u.data", _u_data() + "7,7,7,7\n")
    expected = rf"{re.escape(str(file))}, line {len(RATINGS) + 1}: wrong separator ','"
    with pytest.raises(DataError, match=expected):
        load_dataset("ml-100k", str(file))
    file = _write(tmp_path / "x.inter", _u_data())  # .inter without its header
    with pytest.raises(DataError, match=rf"{re.escape(str(file))}, line 1: expected the header"):
        load_dataset("ml-100k", str(file))


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'nope.dat'))}: file not found"):
        load_dataset("ml-1m", str(tmp_path / "nope.dat"))
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}: directory has no ratings\.csv"):
        load_dataset("ml-20m", str(tmp_path))
    with pytest.raises(DataError, match=r"neither u\.data nor ml-100k\.inter"):
        load_dataset("ml-100k", str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# load_dataset: names, paths, dropping short users
# ----------------------------------------------------------------------------------------------------------


def test_unknown_source_lists_known_names() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("ml-7b")
    assert "ml-7b" in str(info.value) and all(name in str(info.value) for name in SOURCES)


@pytest.mark.parametrize(
    ("source", "expected"),
    [("ml-1m", "ratings.dat"), ("ml-20m", "ratings.csv"), ("ml-latest", "ratings.csv"),
     ("amazon-electronics", "AmazonElectronics_x1"), ("microvideo", "MicroVideo1.7M_x2"),
     ("kuaivideo", "KuaiVideo_x2")],
)
def test_missing_path_says_what_is_expected(source: str, expected: str) -> None:
    with pytest.raises(DataError, match=rf"{source!r} needs a path: .*{expected}"):
        load_dataset(source)


def test_synthetic_takes_no_path() -> None:
    with pytest.raises(DataError, match="takes no path"):
        load_dataset("synthetic", "somewhere")


def test_min_events_drops_users_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [*RATINGS, (4, 99, 5, 1), (5, 98, 5, 1), (5, 10, 5, 2)]  # users 4 and 5 are short
    file = _write(tmp_path / "u.data", _u_data(rows))
    with caplog.at_level(logging.INFO, logger="malloc.data"):
        seqs = load_dataset("ml-100k", str(file), min_events=3).sequences
    assert seqs.user_ids.tolist() == [1, 2, 3]
    assert seqs.item_ids.tolist() == [0, 10, 20, 30, 40]  # items 98 and 99 only occurred for dropped users
    assert any("dropped 2 users" in r.getMessage() and r.name == "malloc.data" for r in caplog.records)
    with pytest.raises(DataError, match="no user with at least 4 events"):
        load_dataset("ml-100k", str(file), min_events=4)


# ----------------------------------------------------------------------------------------------------------
# reczoo AmazonElectronics_x1
# ----------------------------------------------------------------------------------------------------------

AMAZON_HEADER = "label,user_id,item_id,cate_id,item_history,cate_history"
# Each user's reviews in order (DIN style: rows predict review k+1 from the first k).
AMAZON_USERS = {"17": [5, 3, 9, 4], "4": [3, 8, 11], "23": [7, 5, 2, 6, 3]}


def _din_rows(reviews: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """DIN's construction: train rows for k = 1..n-2 and one test row pair at k = n-1 (pos + neg)."""
    train, test = [], []
    for user, items in reviews.items():
        for k in range(1, len(items)):
            history = "^".join(map(str, items[:k]))
            cates = "^".join("1" for _ in items[:k])
            pair = [f"1,{user},{items[k]},1,{history},{cates}", f"0,{user},{900 + k},1,{history},{cates}"]
            (test if k == len(items) - 1 else train).extend(pair)
    return train, test


def _amazon_dir(tmp_path: Path, valid: bool = False) -> Path:
    train, test = _din_rows(AMAZON_USERS)
    _write(tmp_path / "train.csv", "\n".join([AMAZON_HEADER, *train]) + "\n")
    _write(tmp_path / "test.csv", "\n".join([AMAZON_HEADER, *test]) + "\n")
    if valid:
        _write(tmp_path / "valid.csv", "\n".join([AMAZON_HEADER, train[0]]) + "\n")
    return tmp_path


def test_amazon_rebuilds_sequences_and_rows(tmp_path: Path) -> None:
    ds = load_dataset("amazon-electronics", str(_amazon_dir(tmp_path)), min_events=0)
    seqs, rows = ds.sequences, ds.ctr_rows
    assert rows is not None
    assert seqs.user_ids.tolist() == [4, 17, 23]  # integer ids, numeric order
    for u, user in enumerate(seqs.user_ids.tolist()):
        sl = seqs.user_slice(u)
        assert seqs.item_ids[seqs.items[sl]].tolist() == AMAZON_USERS[str(user)]
        assert seqs.timestamps[sl].tolist() == list(range(len(AMAZON_USERS[str(user)])))
    assert np.all(seqs.labels == 1)
    # Negative candidates (900 + k) get ids even though nobody reviewed them.
    assert set(seqs.item_ids[rows.item[rows.label == 0]].tolist()) <= set(range(901, 905))
    assert len(rows) == sum(2 * (len(v) - 1) for v in AMAZON_USERS.values())
    assert set(rows.split.tolist()) == {SPLIT_TRAIN, SPLIT_TEST}  # no valid.csv: no valid rows
    assert np.array_equal(rows.timestamp, rows.history_len)
    for r in range(len(rows)):
        user = str(seqs.user_ids[rows.user[r]])
        k = int(rows.history_len[r])
        sl = seqs.user_slice(int(rows.user[r]))
        assert seqs.item_ids[seqs.items[sl][:k]].tolist() == AMAZON_USERS[user][:k]
        if rows.label[r] == 1:
            assert seqs.item_ids[rows.item[r]] == AMAZON_USERS[user][k]
    test = rows.split == SPLIT_TEST
    assert np.all(rows.history_len[test] == seqs.lengths[rows.user[test]] - 1)


def test_amazon_valid_split_and_no_extension_when_ambiguous(tmp_path: Path) -> None:
    ds = load_dataset("amazon-electronics", str(_amazon_dir(tmp_path, valid=True)), min_events=0)
    assert ds.ctr_rows is not None and int((ds.ctr_rows.split == SPLIT_VALID).sum()) == 1
    # Two different positives after the longest history: the sequence is not extended.
    _write(tmp_path / "test.csv", f"{AMAZON_HEADER}\n1,8,1,1,5^6,1^1\n1,8,2,1,5^6,1^1\n")
    _write(tmp_path / "train.csv", f"{AMAZON_HEADER}\n1,8,6,1,5,1\n")
    (tmp_path / "valid.csv").unlink()
    seqs = load_dataset("amazon-electronics", str(tmp_path), min_events=0).sequences
    assert seqs.item_ids[seqs.items].tolist() == [5, 6]


BAD_AMAZON = [
    ("train.csv", "", 1, "empty"),
    ("train.csv", "label,user,item\n", 1, "header"),
    ("train.csv", f"{AMAZON_HEADER}\n1,4,3,1,,\n1,4,8,1,3\n", 3, "expected 6 comma-separated fields"),
    ("train.csv", f"{AMAZON_HEADER}\n1,4,3,1,,\n2,4,8,1,3,1\n", 3, "label must be 0 or 1"),
    ("train.csv", f"{AMAZON_HEADER}\n1,4,3,1,,\n1,,8,1,3,1\n", 3, "user_id and item_id"),
    # History 3^9 contradicts the user's longest history 3^8^11 (test.csv line 2).
    ("train.csv", f"{AMAZON_HEADER}\n1,4,3,1,,\n1,4,11,1,3^9,1^1\n", 3, "not a prefix"),
]


@pytest.mark.parametrize(("name", "content", "line", "words"), BAD_AMAZON)
def test_bad_amazon_files(tmp_path: Path, name: str, content: str, line: int, words: str) -> None:
    _write(tmp_path / "test.csv", f"{AMAZON_HEADER}\n1,4,5,1,3^8^11,1^1^1\n")
    file = _write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_dataset("amazon-electronics", str(tmp_path))
    message = str(info.value)
    assert str(file) in message and f"line {line}:" in message and words in message


def test_amazon_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("amazon-electronics", str(tmp_path / "absent"))
    _write(tmp_path / "train.csv", f"{AMAZON_HEADER}\n1,4,3,1,,\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'test.csv'))}: file not found"):
        load_dataset("amazon-electronics", str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# reczoo/LongCTR Parquet
# ----------------------------------------------------------------------------------------------------------

# Per user_index: full_item_seq with LongCTR pre-padding (0s).
LONGCTR_SEQS = {0: [0, 0, 4, 9, 4, 7], 1: [5, 6], 2: [0, 3, 8, 9, 2]}


def _longctr_dir(tmp_path: Path, *, with_user_index: bool = True, rows: dict | None = None) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    users = [2, 0, 1] if with_user_index else [0, 1, 2]  # stored out of order when indexed
    info = {"full_item_seq": [LONGCTR_SEQS[u] for u in users]}
    if with_user_index:
        info = {"user_index": users, **info}
    pq.write_table(pa.table(info), tmp_path / "user_info.parquet")
    pq.write_table(pa.table({"item_index": list(range(13))}), tmp_path / "item_info.parquet")
    splits = rows or {
        "train": {"user_index": [0, 0, 2, 1], "item_index": [4, 12, 3, 5], "seq_len": [2, 3, 2, 0],
                  "is_click": [1, 0, 1, 1]},
        "valid": {"user_index": [0], "item_index": [7], "seq_len": [5], "is_click": [1]},
        "test": {"user_index": [2, 1], "item_index": [2, 11], "seq_len": [4, 2], "is_click": [1, 0]},
    }
    for split, columns in splits.items():
        pq.write_table(pa.table(columns), tmp_path / f"{split}.parquet")
    return tmp_path


@pytest.mark.parametrize("with_user_index", [True, False])
def test_longctr_rows_match_histories(tmp_path: Path, with_user_index: bool) -> None:
    path = _longctr_dir(tmp_path, with_user_index=with_user_index)
    ds = load_dataset("microvideo", str(path), min_events=0)
    seqs, rows = ds.sequences, ds.ctr_rows
    assert rows is not None
    assert seqs.user_ids.tolist() == [0, 1, 2]
    assert np.all(seqs.labels == UNKNOWN_LABEL) and not seqs.has_labels()
    assert seqs.item_ids[0] == 0 and np.all(seqs.items >= 1)
    for u, full in LONGCTR_SEQS.items():
        sl = seqs.user_slice(u)
        assert seqs.item_ids[seqs.items[sl]].tolist() == [i for i in full if i > 0]  # padding dropped
        assert seqs.timestamps[sl].tolist() == list(range(sl.stop - sl.start))
    # Candidate 12 and 11 never occur in a sequence but still get dense ids.
    assert {11, 12} <= set(seqs.item_ids.tolist()) and seqs.num_items == len(seqs.item_ids) - 1
    seq_lens = [2, 3, 2, 0, 5, 4, 2]
    assert rows.split.tolist() == [SPLIT_TRAIN] * 4 + [SPLIT_VALID] + [SPLIT_TEST] * 2
    assert seqs.item_ids[rows.item].tolist() == [4, 12, 3, 5, 7, 2, 11]
    assert rows.label.tolist() == [1, 0, 1, 1, 1, 1, 0]
    for r, seq_len in enumerate(seq_lens):
        u = int(rows.user[r])
        visible = [i for i in LONGCTR_SEQS[u][:seq_len] if i > 0]
        sl = seqs.user_slice(u)
        k = int(rows.history_len[r])
        assert seqs.item_ids[seqs.items[sl][:k]].tolist() == visible
    assert rows.history_len.tolist() == [0, 1, 1, 0, 3, 3, 2]


def test_longctr_min_events_drops_rows_too(tmp_path: Path) -> None:
    ds = load_dataset("kuaivideo", str(_longctr_dir(tmp_path)), min_events=3)
    assert ds.sequences.user_ids.tolist() == [0, 2]  # user 1 has only 2 events
    rows = ds.ctr_rows
    assert rows is not None and len(rows) == 5 and set(rows.user.tolist()) == {0, 1}
    assert 11 not in ds.sequences.item_ids.tolist()  # only user 1's row referenced item 11
    assert ds.sequences.item_ids[rows.item].tolist() == [4, 12, 3, 7, 2]


BAD_LONGCTR = [
    ("train", {"seq_len": [2, 3, 7, 0]}, 3, "seq_len outside"),
    ("train", {"user_index": [0, 0, 2, 9]}, 4, "user_index not in user_info"),
    ("train", {"item_index": [4, 0, 3, 5]}, 2, "item_index must be >= 1"),
    ("train", {"item_index": [4, 13, 3, 5]}, 2, "item_info"),
    ("train", {"is_click": [1, 0, 2, 1]}, 3, "is_click must be 0 or 1"),
]


@pytest.mark.parametrize(("split", "change", "record", "words"), BAD_LONGCTR)
def test_bad_longctr_rows(tmp_path: Path, split: str, change: dict, record: int, words: str) -> None:
    columns = {"user_index": [0, 0, 2, 1], "item_index": [4, 12, 3, 5], "seq_len": [2, 3, 2, 0],
               "is_click": [1, 0, 1, 1]}
    rows = {"train": {**columns, **change}, "test": columns}
    path = _longctr_dir(tmp_path, rows=rows)
    with pytest.raises(DataError) as info:
        load_dataset("microvideo", str(path), min_events=0)
    message = str(info.value)
    assert str(path / f"{split}.parquet") in message and f"record {record}:" in message and words in message


def test_longctr_missing_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = _longctr_dir(tmp_path)
    pq.write_table(pa.table({"user_index": [0], "item_index": [3]}), path / "test.parquet")
    with pytest.raises(DataError, match=r"test\.parquet: missing column\(s\) \['seq_len', 'is_click'\]"):
        load_dataset("microvideo", str(path))
    (path / "test.parquet").unlink()
    with pytest.raises(DataError, match=r"test\.parquet: file not found"):
        load_dataset("microvideo", str(path))
    _write(path / "test.parquet", "not parquet")
    with pytest.raises(DataError, match=r"test\.parquet: not a readable Parquet file"):
        load_dataset("microvideo", str(path))
    (path / "user_info.parquet").unlink()
    with pytest.raises(DataError, match=r"user_info\.parquet: file not found"):
        load_dataset("microvideo", str(path))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(DataError, match=r"pip install 'malloc-bench\[parquet\]'"):
        load_dataset("microvideo", str(path))


# ----------------------------------------------------------------------------------------------------------
# Shared helpers and statistics
# ----------------------------------------------------------------------------------------------------------


def test_drop_short_users_without_drops_is_identity(tmp_path: Path) -> None:
    ds = load_dataset("ml-100k", str(_write(tmp_path / "u.data", _u_data())))
    assert drop_short_users(ds, 3) == (ds, 0)
    assert drop_short_users(ds, 0) == (ds, 0)


def test_stats(tmp_path: Path) -> None:
    stats = dataset_stats(load_dataset("amazon-electronics", str(_amazon_dir(tmp_path)), min_events=0))
    assert (stats["users"], stats["events"], stats["positive_rate"], stats["length_max"]) == (3, 12, 1.0, 5)
    assert stats["length_p50"] == 4.0
    assert (stats["ctr_rows_train"], stats["ctr_rows_valid"], stats["ctr_rows_test"]) == (12, 0, 6)
    assert stats["ctr_positive_rate"] == 0.5
    table = format_stats(stats)
    assert "ctr_rows_train" in table and "amazon-electronics" in table
    assert len(table.splitlines()) == len(stats)
    ratings = dataset_stats(load_dataset("ml-100k", str(_write(tmp_path / "u.data", _u_data()))))
    assert "ctr_rows_train" not in ratings and ratings["positive_rate"] == pytest.approx(6 / 9)
