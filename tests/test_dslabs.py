"""ml-latest-small: the dslabs lazy-load database reader, on the real Debian package and on tiny generated files."""

from __future__ import annotations

import gzip
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from malloc.cli import main
from malloc.data.sequences import DataError
from malloc.data.sources import load_dataset
from malloc.data.sources.dslabs import CACHE_ENV, find_rdb, read_dslabs_movielens
from malloc.data.stats import dataset_stats

rdata = pytest.importorskip("rdata", reason="the dslabs extra (rdata) is not installed: pip install -e '.[dslabs]'")
pd = pytest.importorskip("pandas")


def _serialise(obj: Any) -> bytes:
    return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(obj, file_type="rds"),
                                       file_format="xdr")


def write_lazyload(folder: Path, objects: dict[str, Any], *, index: dict[str, Any] | None = None) -> Path:
    """A lazy-load database like R's ``Rdata.rdb`` + ``Rdata.rdx`` (zlib blocks after a 4-byte length)."""
    folder.mkdir(parents=True, exist_ok=True)
    blocks, variables, offset = [], {}, 0
    for name, obj in objects.items():
        payload = _serialise(obj)
        block = len(payload).to_bytes(4, "big") + zlib.compress(payload)
        variables[name] = np.array([offset, len(block)], dtype=np.int32)
        blocks.append(block)
        offset += len(block)
    (folder / "Rdata.rdb").write_bytes(b"".join(blocks))
    table = index if index is not None else {"variables": variables, "references": {},
                                             "compressed": np.array([True])}
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_serialise(table)))
    return folder / "Rdata.rdb"


def ratings_frame(rows: list[tuple[int, int, float, int]]) -> Any:
    user, movie, rating, timestamp = zip(*rows, strict=True)
    return pd.DataFrame({"movieId": np.array(movie, dtype=np.int32),
                         "userId": np.array(user, dtype=np.int32), "rating": np.array(rating, dtype=np.float64),
                         "timestamp": np.array(timestamp, dtype=np.int32)})


TINY = [(7, 50, 4.0, 30), (7, 10, 3.5, 10), (7, 20, 5.0, 20), (3, 20, 1.0, 5), (3, 50, 4.5, 6), (3, 99, 2.0, 7)]


@pytest.fixture
def tiny_package(tmp_path: Path) -> Path:
    """A dpkg -x style tree holding a 2-user movielens object."""
    write_lazyload(tmp_path / "usr/lib/R/site-library/dslabs/data", {"heights": np.arange(3.0),
                                                                    "movielens": ratings_frame(TINY)})
    return tmp_path


def test_tiny_package_is_read_like_movielens(tiny_package: Path) -> None:
    for path in (tiny_package, tiny_package / "usr/lib/R/site-library/dslabs",
                 tiny_package / "usr/lib/R/site-library/dslabs/data/Rdata.rdb"):
        seqs = load_dataset("ml-latest-small", str(path), min_events=3).sequences
        assert seqs.name == "ml-latest-small"
        assert seqs.user_ids.tolist() == [3, 7] and seqs.offsets.tolist() == [0, 3, 6]
        assert seqs.item_ids.tolist() == [0, 10, 20, 50, 99]  # dense ids in ascending movie id order
        assert seqs.items.tolist() == [2, 3, 4, 1, 2, 3]  # each user's events by time
        assert seqs.timestamps.tolist() == [5, 6, 7, 10, 20, 30]
        assert seqs.labels.tolist() == [0, 1, 0, 0, 1, 1]  # rating >= 4
    strict = read_dslabs_movielens(tiny_package, label_threshold=4.5).sequences
    assert strict.labels.tolist() == [0, 1, 0, 0, 1, 0]


def test_cache_folder_from_environment(tiny_package: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cache = tiny_package.parent / "cache"
    shutil.copytree(tiny_package / "usr", cache / "dslabs" / "usr")
    monkeypatch.setenv(CACHE_ENV, str(cache))
    assert find_rdb().name == "Rdata.rdb"
    assert main(["data", "stats", "ml-latest-small", "--json"]) == 0
    assert '"events": 6' in capsys.readouterr().out


def test_missing_package_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"apt-get download r-cran-dslabs && dpkg -x"):
        load_dataset("ml-latest-small")
    assert main(["data", "stats", "ml-latest-small"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make setup" in err and str(tmp_path / "empty") in err
    with pytest.raises(DataError, match=r"no dslabs/data/Rdata.rdb under .*nowhere \(data.path\)"):
        load_dataset("ml-latest-small", str(tmp_path / "nowhere"))


def test_missing_rdata_package(tiny_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rdata", None)  # import rdata now raises ModuleNotFoundError
    with pytest.raises(DataError, match=r"needs the rdata package, not installed: pip install 'rdata"):
        load_dataset("ml-latest-small", str(tiny_package))


def _data_dir(root: Path) -> Path:
    return root / "usr/lib/R/site-library/dslabs/data"


@pytest.mark.parametrize("damage, words", [
    ("index-not-gzip", "Rdata.rdx: not a gzip file"),
    ("index-not-r", "Rdata.rdx: cannot decode the lazy-load index as an R serialisation"),
    ("index-missing", "Rdata.rdx: file not found"),
    ("block-garbage", "Rdata.rdb: cannot decompress a zlib block"),
    ("block-truncated", "the file is truncated"),
    ("block-length", "its header says"),
    ("block-not-r", "cannot decode object 'movielens'"),
])
def test_corrupt_files_are_one_clear_error(tiny_package: Path, damage: str, words: str) -> None:
    data = _data_dir(tiny_package)
    rdb, rdx = data / "Rdata.rdb", data / "Rdata.rdx"
    blob = rdb.read_bytes()
    if damage == "index-not-gzip":
        rdx.write_bytes(b"not gzip at all")
    elif damage == "index-not-r":
        rdx.write_bytes(gzip.compress(b"hello, this is no R serialisation"))
    elif damage == "index-missing":
        rdx.unlink()
    elif damage == "block-garbage":
        rdb.write_bytes(blob[:4] + b"\x00" * (len(blob) - 4))
    elif damage == "block-truncated":
        rdb.write_bytes(blob[: len(blob) // 2])
    elif damage == "block-length" or damage == "block-not-r":
        # rewrite the database with a movielens block whose header or payload is wrong
        payload = b"X\n garbage" if damage == "block-not-r" else _serialise(ratings_frame(TINY))
        header = len(payload) + (0 if damage == "block-not-r" else 1)
        block = header.to_bytes(4, "big") + zlib.compress(payload)
        rdb.write_bytes(block)
        index = {"variables": {"movielens": np.array([0, len(block)], dtype=np.int32)}, "references": {},
                 "compressed": np.array([True])}
        rdx.write_bytes(gzip.compress(_serialise(index)))
    with pytest.raises(DataError, match=words):
        load_dataset("ml-latest-small", str(tiny_package))


def test_wrong_object_or_columns(tmp_path: Path) -> None:
    write_lazyload(tmp_path / "a", {"heights": np.arange(3.0)})
    with pytest.raises(DataError, match=r"has no object 'movielens' \(it has heights"):
        read_dslabs_movielens(tmp_path / "a")
    write_lazyload(tmp_path / "b", {"movielens": pd.DataFrame({"userId": [1], "rating": [4.0]})})
    with pytest.raises(DataError, match=r"no column movieId, timestamp"):
        read_dslabs_movielens(tmp_path / "b")
    frame = ratings_frame(TINY)
    frame.loc[2, "rating"] = np.nan
    write_lazyload(tmp_path / "c", {"movielens": frame})
    with pytest.raises(DataError, match=r"column rating: missing value \(NA\) in row 3"):
        read_dslabs_movielens(tmp_path / "c")


# -- the real package -----------------------------------------------------------------------------------------------
def _real_rdb() -> Path:
    try:
        return find_rdb()
    except DataError:
        pytest.skip("r-cran-dslabs is not unpacked in the data cache (make setup fetches it with apt-get download; "
                    "set MALLOC_DATA_CACHE if it lives elsewhere)")


def test_real_ml_latest_small() -> None:
    _real_rdb()
    ds = load_dataset("ml-latest-small")
    stats = dataset_stats(ds)
    assert (stats["users"], stats["items"], stats["events"]) == (671, 9066, 100_004)
    assert stats["length_p50"] == 71 and stats["length_max"] == 2391  # long histories: why this data set is here
    assert stats["positive_rate"] == pytest.approx(0.5157, abs=1e-4)  # rating >= 4
    seqs = ds.sequences
    user = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    same_user = np.diff(user) == 0
    assert np.all(np.diff(seqs.timestamps)[same_user] >= 0)  # chronological within each user
    assert seqs.timestamps.min() >= 788_918_400 and seqs.timestamps.max() < 1_483_228_800  # 1995 .. 2016
