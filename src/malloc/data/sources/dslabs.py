"""ml-latest-small (2016 snapshot): the MovieLens ratings that Debian's ``r-cran-dslabs`` package carries.

The R package ``dslabs`` ships a 100,004-rating MovieLens snapshot (671 users, 9,066 movies, 1995-2016; some
users with over a thousand ratings) as the ``movielens`` object of its lazy-load database
``dslabs/data/Rdata.rdb`` + ``Rdata.rdx``. MALLOC reads it without R:

* ``Rdata.rdx`` is a gzip-compressed R serialisation (XDR) of a list whose ``variables`` entry maps each object
  name to ``(offset, length)`` in ``Rdata.rdb``, and whose ``compressed`` entry says how blocks are packed;
* each block of ``Rdata.rdb`` is a 4-byte big-endian uncompressed length followed by a zlib stream (``compressed``
  TRUE or 1; 2 is bzip2; 3 adds a one-byte type, ``Z`` xz, ``2`` bzip2, ``1`` zlib, ``0`` stored) holding the
  R serialisation of the object, here a data.frame with ``userId``, ``movieId``, ``rating`` (0.5 .. 5 in steps of
  0.5) and ``timestamp`` (seconds) columns, plus ``title``, ``year`` and ``genres``, which MALLOC ignores.

Both serialisations are decoded with the PyPI package ``rdata`` (an optional dependency: the ``dslabs`` extra).

Where the files are found (first match wins):

1. ``path`` (``data.path``): the ``Rdata.rdb`` file, the folder holding it, the ``dslabs`` package folder, or any
   folder above it (such as the root that ``dpkg -x`` unpacked into);
2. ``$MALLOC_DATA_CACHE/dslabs`` if that variable is set;
3. ``$XDG_CACHE_HOME/malloc/dslabs``, else ``~/.cache/malloc/dslabs``: where ``make setup`` unpacks the package
   (``apt-get download r-cran-dslabs`` then ``dpkg -x``). The data are never committed to the repository.

Events follow the MovieLens readers: label 1 iff ``rating >= label_threshold``, int64 timestamps, users in
ascending id order, movies densified in ascending id order (:func:`~malloc.data.sequences.build_sequences`).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from malloc.data.sequences import DataError, Dataset, build_sequences

PACKAGE = "r-cran-dslabs"
OBJECT = "movielens"
CACHE_ENV = "MALLOC_DATA_CACHE"
RDATA_HINT = "pip install 'rdata>=1.0' (or `pip install -e '.[dslabs]'`, which `make setup` does)"
FETCH_HINT = (
    f"run `make setup`, or fetch it by hand: mkdir -p {{cache}} && cd {{cache}} && apt-get download {PACKAGE} "
    f"&& dpkg -x {PACKAGE}_*.deb dslabs (run `apt-get update` first if apt cannot find {PACKAGE}); "
    f"or point data.path (--path) at the unpacked dslabs folder, or ${CACHE_ENV} at the cache folder"
)
_COLUMNS = ("userId", "movieId", "rating", "timestamp")


def cache_root() -> Path:
    """The folder under which MALLOC keeps downloaded data (``dslabs/`` holds the unpacked package)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "malloc"


def find_rdb(path: Path | None = None) -> Path:
    """The ``Rdata.rdb`` of the dslabs package under ``path`` (or the cache, see the module docstring).

    Raises:
        DataError: nothing found; the message says how to fetch the package.
    """
    root = path if path is not None else cache_root() / "dslabs"
    if path is not None and path.is_file():
        return path
    for candidate in (root / "Rdata.rdb", root / "data" / "Rdata.rdb"):
        if candidate.is_file():
            return candidate
    if root.is_dir():
        found = sorted(root.glob("**/dslabs/data/Rdata.rdb"))
        if found:
            return found[0]
    where = f"{root} (data.path)" if path is not None else f"{root}"
    raise DataError(f"ml-latest-small: no dslabs/data/Rdata.rdb under {where}; "
                    + FETCH_HINT.format(cache=cache_root()))


def read_dslabs_movielens(path: Path | None = None, *, label_threshold: float = 4.0,
                          name: str = "ml-latest-small") -> Dataset:
    """Read the ``movielens`` object of the dslabs lazy-load database into a :class:`Dataset`.

    Args:
        path: see the module docstring; ``None`` looks in the cache.
        label_threshold: an event is positive iff ``rating >= label_threshold``.
    Raises:
        DataError: package files missing, ``rdata`` not installed, or a file that does not decode to the
            expected data.frame (the message names the file).
    """
    rdb = find_rdb(path)
    rdx = rdb.with_suffix(".rdx")
    if not rdx.is_file():
        raise DataError(f"{rdx}: file not found (the index that goes with {rdb.name}); "
                        + FETCH_HINT.format(cache=cache_root()))
    frame = _fetch_object(rdb, rdx, OBJECT)
    columns = _numeric_columns(frame, rdb)
    user, item, timestamp = (_integral(columns[c], c, rdb) for c in ("userId", "movieId", "timestamp"))
    labels = (columns["rating"] >= label_threshold).astype(np.int8)
    return Dataset(build_sequences(name, user, item, timestamp, labels))


def _rdata() -> Any:
    try:
        import rdata
    except ModuleNotFoundError as err:
        raise DataError(f"reading ml-latest-small needs the rdata package, not installed: {RDATA_HINT}") from err
    return rdata


def _unserialise(data: bytes, file: Path, what: str) -> Any:
    """Decode one R serialisation (XDR) with ``rdata``: the converted Python object."""
    rdata = _rdata()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialisation has no file extension
            return rdata.conversion.convert(rdata.parser.parse_data(data))
    except Exception as err:  # rdata raises many types (ValueError, NotImplementedError, struct.error, ...)
        raise DataError(f"{file}: cannot decode {what} as an R serialisation ({type(err).__name__}: {err}); "
                        f"the file is damaged or not from {PACKAGE}: delete it and fetch it again") from err


def _fetch_object(rdb: Path, rdx: Path, name: str) -> Any:
    """The R object ``name`` of a lazy-load database, converted by ``rdata`` (a data.frame becomes pandas)."""
    try:
        raw = rdx.read_bytes()
    except OSError as err:
        raise DataError(f"{rdx}: cannot read the file ({err.strerror or err})") from err
    try:
        index_bytes = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{rdx}: not a gzip file ({err}); expected the dslabs lazy-load index") from err
    index = _unserialise(index_bytes, rdx, "the lazy-load index")
    try:
        variables = index["variables"]
        compressed = int(np.asarray(index.get("compressed", [1])).ravel()[0])
    except (TypeError, KeyError, IndexError, ValueError) as err:
        raise DataError(f"{rdx}: not a lazy-load index (no 'variables' table)") from err
    if name not in variables:
        known = ", ".join(sorted(str(k) for k in variables)[:8])
        raise DataError(f"{rdx}: the database has no object {name!r} (it has {known}, ...)")
    try:
        offset, length = (int(v) for v in np.asarray(variables[name]).ravel()[:2])
    except (TypeError, ValueError) as err:
        raise DataError(f"{rdx}: entry {name!r} is not an (offset, length) pair") from err
    with rdb.open("rb") as stream:
        stream.seek(offset)
        block = stream.read(length)
    if length < 5 or len(block) != length:
        raise DataError(f"{rdb}: object {name!r} should span bytes {offset}..{offset + length}, but the file holds "
                        f"{rdb.stat().st_size} bytes; the file is truncated: delete it and fetch it again")
    return _unserialise(_unpack_block(block, compressed, rdb), rdb, f"object {name!r}")


def _unpack_block(block: bytes, compressed: int, rdb: Path) -> bytes:
    """Undo R's ``lazyLoadDBinsertValue`` packing of one block (see the module docstring)."""
    expected = int.from_bytes(block[:4], "big")
    body, codec = block[4:], {1: "zlib", 2: "bzip2"}.get(compressed, "zlib")
    if compressed == 3:
        codec = {b"Z": "xz", b"2": "bzip2", b"1": "zlib", b"0": "stored"}.get(block[4:5], "unknown")
        body = block[5:]
    if codec == "unknown":
        raise DataError(f"{rdb}: unknown block compression type {block[4:5]!r}")
    decompress = {"zlib": zlib.decompress, "bzip2": bz2.decompress, "xz": lzma.decompress,
                  "stored": bytes}[codec]
    try:
        data = decompress(body)
    except (zlib.error, OSError, ValueError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"{rdb}: cannot decompress a {codec} block ({err}); the file is damaged: delete it and "
                        "fetch it again") from err
    if len(data) != expected:
        raise DataError(f"{rdb}: a block unpacks to {len(data)} bytes, its header says {expected}; the file is "
                        "damaged: delete it and fetch it again")
    return data


def _numeric_columns(frame: Any, rdb: Path) -> dict[str, np.ndarray]:
    """``{column: (N,) float64}`` for the four rating columns of the data.frame, checked for NA."""
    names = [str(c) for c in getattr(frame, "columns", [])]
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        raise DataError(f"{rdb}: object {OBJECT!r} is not the ratings data.frame: no column "
                        f"{', '.join(missing)} (found {', '.join(names) or 'no columns'})")
    out = {}
    for column in _COLUMNS:
        values = frame[column]
        if bool(values.isna().any()):
            row = int(np.flatnonzero(values.isna().to_numpy())[0]) + 1
            raise DataError(f"{rdb}: object {OBJECT!r}, column {column}: missing value (NA) in row {row}")
        out[column] = values.to_numpy(dtype=np.float64)
    return out


def _integral(values: np.ndarray, column: str, rdb: Path) -> np.ndarray:
    bad = np.flatnonzero(values != np.floor(values))
    if len(bad):
        raise DataError(f"{rdb}: object {OBJECT!r}, column {column} must hold integers, row {int(bad[0]) + 1} "
                        f"holds {values[bad[0]]!r}")
    return values.astype(np.int64)
