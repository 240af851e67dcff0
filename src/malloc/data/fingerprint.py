"""The content digest of a data set's input files, part of every run's identity.

A run's results folder is named by a hash of its config; the config names the data by source and path, and a path
says nothing of what the file holds now. So the identity also carries :func:`data_digest`: a BLAKE2b digest of the
bytes of every file the source's reader reads (in a fixed order, each with its role), and editing a file gives the
rerun a new folder instead of the old run's metrics. Generated data (``synthetic``) is named by its settings,
which the config already holds.

A digest costs one read of the files; it is computed once per process for a file of the same path, size and
modification time.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from malloc.data.sequences import DataError

_CHUNK = 1 << 20


def input_files(source: str, path: str | None) -> list[tuple[str, Path]]:
    """``(role, file)`` of every file the reader of ``source`` reads for ``path``, in a fixed order.

    Raises:
        DataError: a required file is missing (the reader's own message, before any compute).
    """
    from malloc.data.sources import check_source

    check_source(source, path)
    where = None if path is None else Path(path).expanduser()
    if source == "synthetic":
        return []
    if source == "ml-latest-small":
        from malloc.data.sources import dslabs

        rdb = dslabs.find_rdb(where)
        return [("rdb", rdb), ("rdx", rdb.with_suffix(".rdx"))]
    if source.startswith("ml-"):
        from malloc.data.sources import movielens

        ratings = movielens.ratings_file(source, where)
        if not ratings.is_file():
            raise DataError(f"{ratings}: file not found" if not ratings.exists() else f"{ratings}: not a regular file")
        return [("ratings", ratings)]
    assert where is not None  # check_source: every other source needs a path
    if source == "amazon-electronics":
        from malloc.data.sources import reczoo

        names = [name for name, _, _ in reczoo.SPLIT_FILES]
    else:
        from malloc.data.sources import longctr

        names = ["user_info.parquet", "item_info.parquet", *(name for name, _, _ in longctr.SPLIT_FILES)]
    return [(name, where / name) for name in names if (where / name).is_file()]


def data_digest(source: str, path: str | None) -> str | None:
    """Hex digest of the contents of the files :func:`input_files` lists (None for generated data).

    Raises:
        DataError: a file is missing or cannot be read (naming it).
    """
    files = input_files(source, path)
    if not files:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for role, file in files:
        try:
            stat = file.stat()
        except OSError as exc:
            raise DataError(f"{file}: cannot read the data file ({exc.strerror or exc})") from exc
        digest.update(f"{role}\0{_file_digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns)}\0".encode())
    return digest.hexdigest()


def file_digest(file: Path) -> str:
    """Hex BLAKE2b digest of one file's bytes (computed once per process for the same path, size and
    modification time; the digest :func:`data_digest` combines).

    Raises:
        DataError: the file is missing or cannot be read (naming it).
    """
    try:
        stat = file.stat()
    except OSError as exc:
        raise DataError(f"{file}: cannot read the data file ({exc.strerror or exc})") from exc
    return _file_digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_digest(file: str, size: int, mtime_ns: int) -> str:
    """BLAKE2b of one file's bytes; the size and modification time are part of the cache key only."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(file, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{file}: cannot read the data file ({exc.strerror or exc})") from exc
    return digest.hexdigest()


__all__ = ["data_digest", "file_digest", "input_files"]
