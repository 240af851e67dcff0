"""Data larger than memory: the streaming ratings reader, the sequences it builds, the parse cache, and a report
merged from suite shards written to different folders.

Memory is counted with ``tracemalloc``, which traces NumPy's allocations and Python's: deterministic, unlike a
resident size.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from malloc.cli import main
from malloc.data.cache import ParseCache
from malloc.data.sequences import DataError, build_sequences, first_occurrences
from malloc.data.sources import movielens

ROOT = Path(__file__).resolve().parents[1]


def ratings_csv(path: Path, events: int, seed: int = 0, users: int = 2000, crlf: bool = False) -> Path:
    """A MovieLens-20M-format file of ``events + 3`` lines: sorted by user then movie (not by time), with ties in
    time and repeated events (its last 3 lines repeat its first 3)."""
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(1, users + 1, events))
    movie = rng.integers(1, 4000, events) * 7
    order = np.lexsort((movie, user))
    stars = rng.integers(1, 11, events) / 2
    stamp = 1_000_000_000 + rng.integers(0, 50, events)  # few distinct times: many ties within a user
    lines = [f"{u},{m},{r:.1f},{t}" for u, m, r, t in zip(user[order].tolist(), movie[order].tolist(),
                                                            stars.tolist(), stamp.tolist(), strict=True)]
    lines += lines[:3]  # exact repeats
    end = "\r\n" if crlf else "\n"
    path.write_text(movielens.CSV_HEADER + end + end.join(lines) + end + end)  # a trailing blank line
    return path


def plain_build(user: np.ndarray, item: np.ndarray, stamp: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """The definition :func:`build_sequences` implements: repeats dropped (first kept), a stable sort by user then
    time, users and items numbered in ascending id order."""
    first = first_occurrences(user, item, stamp, label)
    user, item, stamp, label = (a[first] for a in (user, item, stamp, label))
    order = np.lexsort((np.arange(len(user)), stamp, user))
    user_ids, counts = np.unique(user[order], return_counts=True)
    item_ids, dense = np.unique(item[order], return_inverse=True)
    return {"offsets": np.concatenate([[0], np.cumsum(counts)]), "items": dense + 1, "timestamps": stamp[order],
            "labels": label[order], "user_ids": user_ids, "item_ids": np.concatenate([[0], item_ids])}


@pytest.mark.parametrize("seed", range(12))
def test_build_sequences_is_its_definition(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(0, 400))
    user = rng.integers(0, 9, count) * [1, 1_000_003, 5][seed % 3]
    item = rng.integers(-3 if seed % 4 == 0 else 1, 25, count) * [1, 10**12 + 7][seed % 2]
    if seed % 5 == 0:
        user = np.array([f"u{u}" for u in user])  # any sortable ids
    stamp, label = rng.integers(0, 6, count), rng.integers(-1, 2, count).astype(np.int8)
    built = build_sequences("random", user, item, stamp, label)
    for name, expected in plain_build(user, item, stamp, label).items():
        assert np.array_equal(getattr(built, name), expected), name
    assert built.num_items == len(np.unique(item))


@pytest.mark.parametrize("block", [7, 64, 4096, None])
def test_the_streaming_reader_parses_any_block_size_as_the_whole_file(tmp_path, block):
    file = ratings_csv(tmp_path / "ratings.csv", 3000, crlf=block == 64)
    values, _ = movielens.read_numeric_table(file, movielens.RATINGS_CSV)
    user, item, stamp, label = movielens.read_ratings(file, movielens.RATINGS_CSV, 3.5, block_bytes=block)
    assert user.dtype == item.dtype == stamp.dtype == np.int64 and label.dtype == np.int8
    assert np.array_equal(user, values[:, 0]) and np.array_equal(item, values[:, 1])
    assert np.array_equal(stamp, values[:, 3]) and np.array_equal(label, values[:, 2] >= 3.5)
    dat = tmp_path / "ratings.dat"
    dat.write_text("".join(f"{int(u)}::{int(i)}::{r:g}::{int(t)}\n" for u, i, r, t in values[:500]))
    columns = movielens.read_ratings(dat, movielens.RATINGS_DAT, 4.0, block_bytes=block)
    assert np.array_equal(columns[0], values[:500, 0]) and np.array_equal(columns[2], values[:500, 3])


def test_a_bad_line_is_named_whatever_block_holds_it(tmp_path):
    file = ratings_csv(tmp_path / "ratings.csv", 300)
    lines = file.read_text().splitlines()
    lines[200] = lines[200].replace(",", ";", 1)
    file.write_text("\n".join(lines) + "\n")
    for block in (16, 256, None):
        with pytest.raises(DataError, match=rf"{file}, line 201: wrong separator ';'"):
            movielens.read_ratings(file, movielens.RATINGS_CSV, 4.0, block_bytes=block)


def _peak_bytes(call) -> tuple[int, object]:
    """Peak bytes allocated (NumPy arrays and Python objects) while ``call()`` runs, and its result."""
    tracemalloc.start()
    try:
        result = call()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_reading_holds_the_columns_and_one_block_and_building_one_permutation_more(tmp_path):
    events, block, chunk = 200_000, 1 << 16, 1 << 14
    file = ratings_csv(tmp_path / "ratings.csv", events - 3)  # and 3 repeats
    # the columns (int64 user, item, timestamp and int8 label: 25 bytes an event), allocated once, and one block's
    # temporaries; parsing the whole file before taking the columns (read_numeric_table) holds far more
    bound = 25 * events + 100 * block + (1 << 20)
    peak, columns = _peak_bytes(lambda: movielens.read_ratings(file, movielens.RATINGS_CSV, 4.0, block_bytes=block))
    assert len(columns[0]) == events and peak < bound

    def whole() -> np.ndarray:
        values, _ = movielens.read_numeric_table(file, movielens.RATINGS_CSV)
        return values[:, [0, 1, 3]].astype(np.int64)

    assert _peak_bytes(whole)[0] > bound
    # the outputs (17 bytes an event), one sort permutation, the sorted users, the sort's own buffers and
    # temporaries of one chunk; the plain definition holds more
    peak, seqs = _peak_bytes(lambda: build_sequences("big", *columns, chunk=chunk))
    assert seqs.num_events == np.sum(first_occurrences(*columns)) and peak < 48 * events
    assert _peak_bytes(lambda: plain_build(*columns))[0] > 48 * events


def test_the_parse_cache_maps_what_it_parsed_and_misses_on_any_change(tmp_path, caplog):
    file = ratings_csv(tmp_path / "ratings.csv", 5000)
    cache = ParseCache(tmp_path / "cache", min_bytes=0)
    parsed = movielens.read_movielens("ml-20m", file, cache=False).sequences
    with caplog.at_level(logging.INFO, logger="malloc.data"):
        first = movielens.read_movielens("ml-20m", file, cache=cache).sequences
        second = movielens.read_movielens("ml-20m", file, cache=cache).sequences
    (folder,) = (tmp_path / "cache" / "parsed").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(["meta.json", *(f"{n}.npy" for n in (
        "offsets", "items", "timestamps", "labels", "user_ids", "item_ids"))])
    assert "parsed arrays cached in" in caplog.text and "read from the cache" in caplog.text
    for seqs in (first, second):
        for name in ("offsets", "items", "timestamps", "labels", "user_ids", "item_ids"):
            array = getattr(seqs, name)
            assert np.array_equal(array, getattr(parsed, name)) and array.dtype == getattr(parsed, name).dtype
            assert _mapped(array), name  # memory-mapped from the .npy file, not read into memory
        assert (seqs.num_items, seqs.name) == (parsed.num_items, parsed.name)
    # another label threshold, and an edited file of the same size: other keys, parsed anew
    other = movielens.read_movielens("ml-20m", file, label_threshold=2.0, cache=cache).sequences
    assert not np.array_equal(other.labels, parsed.labels)
    text = file.read_text()
    file.write_text(text.replace(",1.0,", ",5.0,", 1))  # one negative event made positive
    edited = movielens.read_movielens("ml-20m", file, cache=cache).sequences
    assert edited.labels.sum() == parsed.labels.sum() + 1
    assert np.array_equal(edited.labels, movielens.read_movielens("ml-20m", file, cache=False).sequences.labels)
    assert len(list((tmp_path / "cache" / "parsed").iterdir())) == 3


def _mapped(array: np.ndarray) -> bool:
    import mmap

    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.base
    return base is not None


@pytest.mark.parametrize("damage", ["truncated items", "edited key", "missing meta"])
def test_an_unusable_cache_folder_is_logged_and_rebuilt(tmp_path, caplog, damage):
    file = ratings_csv(tmp_path / "ratings.csv", 2000)
    cache = ParseCache(tmp_path / "cache", min_bytes=0)
    movielens.read_movielens("ml-20m", file, cache=cache)
    expected = movielens.read_movielens("ml-20m", file, cache=False).sequences  # not mapped from the damaged file
    (folder,) = (tmp_path / "cache" / "parsed").iterdir()
    if damage == "truncated items":
        items = folder / "items.npy"
        items.write_bytes(items.read_bytes()[:-100])
    elif damage == "edited key":
        meta = json.loads((folder / "meta.json").read_text())
        meta["key"]["label_threshold"] = 1.0
        (folder / "meta.json").write_text(json.dumps(meta))
    else:
        (folder / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="malloc.data"):
        again = movielens.read_movielens("ml-20m", file, cache=cache).sequences
    assert "unusable parse cache" in caplog.text and str(folder) in caplog.text
    assert np.array_equal(again.items, expected.items) and np.array_equal(again.labels, expected.labels)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="malloc.data"):
        movielens.read_movielens("ml-20m", file, cache=cache)
    assert "read from the cache" in caplog.text and "unusable parse cache" not in caplog.text  # rebuilt whole


def test_a_cache_that_cannot_be_written_is_skipped_and_small_files_are_not_cached(tmp_path, caplog):
    file = ratings_csv(tmp_path / "ratings.csv", 2000)
    (tmp_path / "not-a-folder").write_text("a file where the cache root should be")
    with caplog.at_level(logging.WARNING, logger="malloc.data"):
        seqs = movielens.read_movielens("ml-20m", file, cache=ParseCache(tmp_path / "not-a-folder")).sequences
    assert seqs.num_events == 2000
    small = ParseCache(tmp_path / "cache")  # the default threshold: this file parses faster than it is cached
    movielens.read_movielens("ml-20m", file, cache=small)
    assert not (tmp_path / "cache").exists()
    unwritable = ParseCache(tmp_path / "not-a-folder", min_bytes=0)
    with caplog.at_level(logging.WARNING, logger="malloc.data"):
        assert movielens.read_movielens("ml-20m", file, cache=unwritable).sequences.num_events == 2000
    assert "cannot be written" in caplog.text


def test_load_dataset_caches_under_the_data_cache_and_can_be_told_not_to(tmp_path):
    file = ratings_csv(tmp_path / "ratings.csv", 700_000, users=5000)  # over the 16 MiB threshold
    assert file.stat().st_size >= 16 << 20
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
              "from malloc.data.sources import load_dataset\n"
              f"a = load_dataset('ml-20m', {str(file)!r}).sequences\n"
              f"b = load_dataset('ml-20m', {str(file)!r}).sequences\n"
              "assert (a.items == b.items).all() and a.num_events == b.num_events > 690_000\n")
    env = {**os.environ, "MALLOC_DATA_CACHE": str(tmp_path / "data-cache")}
    env.pop("MALLOC_PARSE_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parsed arrays cached in" in done.stdout and "read from the cache" in done.stdout
    assert len(list((tmp_path / "data-cache" / "parsed").iterdir())) == 1
    off = subprocess.run([sys.executable, "-c", script], env={**env, "MALLOC_PARSE_CACHE": "off"},
                         capture_output=True, text=True, timeout=300)
    assert off.returncode == 0 and "cache" not in off.stdout, off.stdout + off.stderr[-2000:]


def test_the_report_merges_shards_written_to_different_folders(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "configs" / "suites" / "smoke.yaml").read_text())
    spec.update(name="shards", tasks={"ctr": {}}, schemes=["recency", "int8"], ratios=["1/2"])
    suite = tmp_path / "shards.yaml"
    suite.write_text(yaml.safe_dump(spec))
    for index, machine in enumerate(("machine-a", "machine-b")):  # as two hosts with their own disks would
        assert main(["bench", "--suite", str(suite), "--results", str(tmp_path / machine), "--shard",
                     f"{index}/2", "--quiet"]) == 0
    folders = [tmp_path / machine / "shards" for machine in ("machine-a", "machine-b")]
    items = [sorted(p.name for p in (folder / "items").glob("*.json")) for folder in folders]
    assert items[0] and items[1] and not set(items[0]) & set(items[1])  # each folder holds half the suite
    out = tmp_path / "report"
    assert main(["report", *map(str, folders), "--out", str(out)]) == 0
    md = (out / "index.md").read_text()
    assert md.count("## Suite `shards`") == 1 and "Merged from 2 folders" in md
    assert all(f"`{folder}`" in md for folder in folders) and "--shard 0/2" in md and "--shard 1/2" in md
    for arm in ("native", "recency", "int8"):
        assert f"| {arm} |" in md, arm
    assert ": missing" not in md  # every planned item was found in one folder or the other
    alone = tmp_path / "alone"
    assert main(["report", str(folders[0]), "--out", str(alone)]) == 0
    assert ": missing" in (alone / "index.md").read_text()  # one shard alone lacks the other's items
    capsys.readouterr()


def test_the_generator_writes_what_the_reader_reads_and_the_benchmark_reports_it(tmp_path, benchmark_script, capsys):
    make_ratings, large_ratings = benchmark_script("make_ratings"), benchmark_script("large_ratings")
    file = tmp_path / "ml" / "ratings.csv"
    assert make_ratings.main([str(file), "--events", "5000", "--movies", "300", "--median-events", "40"]) == 0
    seqs = movielens.read_movielens("ml-20m", file, cache=False).sequences
    assert seqs.num_events == 5000 and seqs.lengths.min() >= 20 and seqs.num_items <= 300
    lines = file.read_text().splitlines()[1:]
    users = [int(line.split(",")[0]) for line in lines]
    assert users == sorted(users)  # by user, as MovieLens-20M, not by time
    capsys.readouterr()
    assert large_ratings.main([str(file), "--loads", "1", "--json"]) == 0
    (load,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert load["load"] == 1 and load["events"] == 5000 and load["users"] == seqs.num_users
    assert load["peak_rss_mib"] >= load["import_rss_mib"] > 0
