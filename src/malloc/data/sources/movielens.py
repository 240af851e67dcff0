"""MovieLens readers: ml-100k (embedded or ``u.data`` / ``.inter``), ml-1m (``ratings.dat``), ml-20m and
ml-latest (``ratings.csv``).

Every event keeps its rating as a label: 1 if ``rating >= label_threshold`` else 0. Timestamps are int64
seconds. Users are ordered by source id, items densified to ``1..num_items`` in ascending source-id order
(:func:`~malloc.data.sequences.build_sequences`).

Parsing is vectorised with NumPy over blocks of the file (ml-20m has 20M lines), and strict: the first bad
line is reported with the file and its 1-based line number (the header, where there is one, is line 1).
Accepted fields are decimal numbers: an optional leading ``-``, digits, at most one ``.`` (no exponent, no
spaces). Ids and timestamps must be integral. ``\\r\\n`` line ends are accepted.

Bounded memory: a first pass counts the lines, the columns (user, item, timestamp int64, label int8: 25 bytes an
event) are allocated once, and each block is parsed into them (:func:`read_ratings`), so the parse holds the columns
and one block's temporaries; :func:`~malloc.data.sequences.build_sequences` then sorts them with one permutation.
The parsed sequences of a large file are kept in the parse cache (:mod:`malloc.data.cache`, keyed by the file's
digest) and memory-mapped from it on the next load.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malloc.data.cache import ParseCache
from malloc.data.fingerprint import file_digest
from malloc.data.sequences import DataError, Dataset, Sequences, build_sequences

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
CSV_HEADER = "userId,movieId,rating,timestamp"
RECBOLE_HINT = "pip install --no-deps recbole==1.2.1"

_BLOCK_BYTES = 1 << 20  # parse this much text at a time: its temporaries are tens of times this size
READER_VERSION = 1  # part of the parse cache's key: a change of what the reader returns must bump it
_MAX_DIGITS = 15  # float64 holds every integer of up to 15 digits exactly
_NL = ord("\n")
_MINUS = ord("-")
_DOT = ord(".")
_SEPARATOR_LIKE = {",", "\t", ";", "|", " ", ":"}
_POW10 = 10.0 ** np.arange(_MAX_DIGITS + 1)
# _DIGIT_WEIGHT[(k << 8) | byte] = digit value of byte * 10**k, 0 when byte is not a digit.
_DIGIT_WEIGHT = (
    _POW10[:, None] * np.where((np.arange(256) >= 48) & (np.arange(256) <= 57), np.arange(256) - 48, 0)
).ravel()


@dataclass(frozen=True)
class TableFormat:
    """Layout of a delimited numeric ratings file.

    Attributes:
        sep: field separator (``"\\t"``, ``","`` or ``"::"``).
        header: exact first line, or ``None`` when the file has no header.
        columns: column names, in file order; always user, item, rating, timestamp here.
    """

    sep: str
    header: str | None
    columns: tuple[str, ...] = ("user", "item", "rating", "timestamp")


U_DATA = TableFormat(sep="\t", header=None)
INTER = TableFormat(sep="\t", header=INTER_HEADER)
RATINGS_DAT = TableFormat(sep="::", header=None)
RATINGS_CSV = TableFormat(sep=",", header=CSV_HEADER)


def read_movielens(source: str, path: Path | None, *, label_threshold: float = 4.0,
                   cache: ParseCache | bool = True) -> Dataset:
    """Read a MovieLens source (``ml-100k``, ``ml-1m``, ``ml-20m``, ``ml-latest``) into a :class:`Dataset`.

    ``path`` may be the ratings file or the directory holding it; ``ml-100k`` without a path reads the copy
    embedded in the ``recbole`` package. ``cache``: the parse cache (True: :meth:`ParseCache.default`; False
    parses every time).
    """
    file, fmt = _resolve(source, path)
    return ratings_to_dataset(source, file, fmt, label_threshold=label_threshold, cache=cache)


def ratings_file(source: str, path: Path | None) -> Path:
    """The ratings file :func:`read_movielens` reads for ``source`` and ``path``."""
    return _resolve(source, path)[0]


def _resolve(source: str, path: Path | None) -> tuple[Path, TableFormat]:
    if source == "ml-100k":
        return _resolve_ml100k(path)
    if source == "ml-1m":
        assert path is not None
        return _resolve_in_dir(path, "ratings.dat"), RATINGS_DAT
    if source in ("ml-20m", "ml-latest"):
        assert path is not None
        return _resolve_in_dir(path, "ratings.csv"), RATINGS_CSV
    raise DataError(f"not a MovieLens source: {source!r}")


def ratings_to_dataset(name: str, file: Path, fmt: TableFormat, *, label_threshold: float = 4.0,
                       cache: ParseCache | bool = True) -> Dataset:
    """Parse one ratings file of layout ``fmt`` and group it into per-user chronological sequences, through the
    parse cache (``cache``: as in :func:`read_movielens`)."""

    def build() -> Sequences:
        return build_sequences(name, *read_ratings(file, fmt, label_threshold))

    store = (ParseCache.default() if cache else None) if isinstance(cache, bool) else cache
    if store is None or not file.is_file():
        return Dataset(build())
    key = {"reader": "movielens", "version": READER_VERSION, "source": name, "sep": fmt.sep, "header": fmt.header,
           "label_threshold": label_threshold, "digest": file_digest(file)}
    return Dataset(store.sequences(file, "movielens", key, build))


def read_ratings(file: Path, fmt: TableFormat, label_threshold: float, block_bytes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``(N,)`` user, item and timestamp (int64) and label (int8: ``rating >= label_threshold``) columns of a
    ratings file of layout ``fmt``, in file order.

    Two passes: one counts the lines, so the columns are allocated once; the other parses ``block_bytes`` of text
    at a time (default ``_BLOCK_BYTES``) into them.

    Raises:
        DataError: naming the file and the 1-based line of the first problem.
    """
    capacity = _count_lines(file, fmt, _BLOCK_BYTES if block_bytes is None else block_bytes)
    user, item, timestamp = (np.empty(capacity, dtype=np.int64) for _ in range(3))
    labels = np.empty(capacity, dtype=np.int8)
    filled = 0
    for first_line, values in iter_numeric_blocks(file, fmt, block_bytes):
        part = slice(filled, filled + len(values))
        if part.stop > capacity:
            raise DataError(f"{file}: the file grew while it was read; read it again")
        user[part] = _integral_column(values, 0, file, first_line, fmt.columns[0])
        item[part] = _integral_column(values, 1, file, first_line, fmt.columns[1])
        timestamp[part] = _integral_column(values, 3, file, first_line, fmt.columns[3])
        labels[part] = values[:, 2] >= label_threshold
        filled = part.stop
    return user[:filled], item[:filled], timestamp[:filled], labels[:filled]


def _count_lines(file: Path, fmt: TableFormat, block_bytes: int) -> int:
    """At least the number of data lines of ``file``: its line ends, plus a last line without one, less the
    header (read ``block_bytes`` at a time)."""
    count, last = 0, b"\n"
    try:
        with file.open("rb") as stream:
            while chunk := stream.read(block_bytes):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except FileNotFoundError:
        raise DataError(f"{file}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{file}: not a regular file") from None
    return max(0, count + (last != b"\n") - (fmt.header is not None))


def _resolve_ml100k(path: Path | None) -> tuple[Path, TableFormat]:
    if path is None:
        return _embedded_ml100k(), INTER
    if path.is_dir():
        for name, fmt in (("u.data", U_DATA), ("ml-100k.inter", INTER)):
            if (path / name).is_file():
                return path / name, fmt
        raise DataError(f"{path}: directory holds neither u.data nor ml-100k.inter")
    return path, (INTER if path.suffix == ".inter" else U_DATA)


def _embedded_ml100k() -> Path:
    try:
        root = importlib.resources.files("recbole")
    except ModuleNotFoundError as err:
        raise DataError(
            f"the embedded ml-100k data comes from the recbole package, not installed: {RECBOLE_HINT}"
        ) from err
    inter = root / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not inter.is_file():
        raise DataError(f"recbole is installed but has no {inter}; reinstall it: {RECBOLE_HINT}")
    return Path(str(inter))


def _resolve_in_dir(path: Path, filename: str) -> Path:
    if path.is_dir():
        if not (path / filename).is_file():
            raise DataError(f"{path}: directory has no {filename}")
        return path / filename
    return path


# ----------------------------------------------------------------------------------------------------------
# Vectorised strict parser
# ----------------------------------------------------------------------------------------------------------


def read_numeric_table(file: Path, fmt: TableFormat) -> tuple[np.ndarray, int]:
    """Parse a delimited file of decimal numbers (all of it in memory: :func:`read_ratings` streams).

    Returns:
        values: ``(N, C)`` float64, one row per data line.
        first_line: 1-based line number of the first data line (2 when there is a header).
    Raises:
        DataError: naming the file and the 1-based line of the first problem.
    """
    blocks = [values for _, values in iter_numeric_blocks(file, fmt)]
    return np.concatenate(blocks), 1 if fmt.header is None else 2


def iter_numeric_blocks(file: Path, fmt: TableFormat, block_bytes: int | None = None
                        ) -> Iterator[tuple[int, np.ndarray]]:
    """The data lines of a delimited file of decimal numbers, a block of about ``block_bytes`` of text (default
    ``_BLOCK_BYTES``) at a time, in file order: ``(line, values)``, the 1-based line number of the block's first
    line and its ``(n, C)`` float64 values. At least one block comes, else DataError.

    Raises:
        DataError: naming the file and the 1-based line of the first problem.
    """
    if not file.exists():
        raise DataError(f"{file}: file not found")
    if not file.is_file():
        raise DataError(f"{file}: not a regular file")
    size = _BLOCK_BYTES if block_bytes is None else block_bytes
    ncols = len(fmt.columns)
    first_line = 1 if fmt.header is None else 2
    found = False
    line_no = 1
    with file.open("rb") as stream:
        head = stream.readline() if fmt.header is not None else b""
        carry = stream.read(size)
        if not head.strip() and not carry.strip():
            raise DataError(f"{file}, line 1: file is empty; expected {_describe(fmt)}")
        if fmt.header is not None:
            header = head.rstrip(b"\r\n").decode("utf-8", errors="replace")
            if header != fmt.header:
                raise DataError(f"{file}, line 1: expected the header {fmt.header!r}, found {header!r}")
            line_no = 2
        while True:
            more = stream.read(size)
            data = carry + more
            if not more:  # end of file: tolerate trailing blank lines and a missing final newline
                data = data.rstrip(b"\r\n")
            cut = data.rfind(b"\n") + 1 if more else len(data)
            if more:  # blank lines that end a read may end the file (tolerated): parse them with what follows
                cut = data.find(b"\n", len(data[:cut].rstrip(b"\r\n"))) + 1
            block, carry = data[:cut], data[cut:]
            if block:
                if not block.endswith(b"\n"):
                    block += b"\n"
                values = _parse_block(block, fmt.sep, ncols, file, line_no)
                if len(values):
                    found = True
                    yield line_no, values
                line_no += len(values)
            if not more and not carry:
                break
    if not found:
        raise DataError(f"{file}, line {first_line}: no data lines; expected {_describe(fmt)}")


def _describe(fmt: TableFormat) -> str:
    header = f"a header {fmt.header!r} then " if fmt.header else ""
    return f"{header}lines of {len(fmt.columns)} numbers ({', '.join(fmt.columns)}) separated by {fmt.sep!r}"


def _parse_block(block: bytes, sep: str, ncols: int, file: Path, line_no: int) -> np.ndarray:
    """Validate and parse whole lines (``block`` ends with a newline) starting at 1-based ``line_no``.

    Returns ``(lines, ncols)`` float64.
    """
    block = block.replace(b"\r\n", b"\n")
    sep_byte = sep.encode()
    if len(sep_byte) > 1:  # "::": map to a byte that cannot occur in valid text, so a lone ':' stays invalid
        if b"\x1f" in block:
            line = line_no + block.count(b"\n", 0, block.index(b"\x1f"))
            raise DataError(f"{file}, line {line}: unexpected control character; expected {sep!r} separators")
        block = block.replace(sep_byte, b"\x1f")
        sep_byte = b"\x1f"
    text = np.frombuffer(block, dtype=np.uint8)
    try:
        return _decode(text, sep_byte[0], sep, ncols).reshape(-1, ncols)
    except _LineError as err:
        raise DataError(f"{file}, line {line_no + err.line}: {err.message}") from None


class _LineError(Exception):
    """A problem on line ``line`` (0-based within the block being decoded)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _decode(text: np.ndarray, sep_byte: int, sep: str, ncols: int) -> np.ndarray:
    """Check and parse ``text`` (whole lines, ending with a newline): ``(lines * ncols,)`` float64.

    Structural problems (a foreign character, a wrong number of separators) are found first; the lines
    before the first of them are then decoded too, so that an earlier malformed number wins.

    Raises:
        _LineError: at the first bad line.
    """
    if len(text) == 0:
        return np.zeros(0)
    code = text - np.uint8(ord("0"))  # digits map to 0..9, everything else wraps to >= 10
    is_digit = code < 10
    is_delim = (text == sep_byte) | (text == _NL)
    is_minus = text == _MINUS
    is_dot = text == _DOT
    ends = np.flatnonzero(is_delim)  # (F,) the delimiter closing each field
    problem = _structure_problem(text, is_digit | is_delim | is_minus | is_dot, ends, sep_byte, sep, ncols)
    if problem is not None:
        line_ends = np.flatnonzero(text == _NL)
        prefix_end = int(line_ends[problem.line - 1]) + 1 if problem.line else 0
        _decode(text[:prefix_end], sep_byte, sep, ncols)  # raises if an earlier line is bad
        raise problem

    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    digits_through = np.cumsum(is_digit, dtype=np.int32)  # (n,) digits at or before each byte
    digits_at_end = digits_through[ends]  # (F,)
    num_digits = np.diff(digits_at_end, prepend=0)
    negative = text[starts] == _MINUS
    dots = np.flatnonzero(is_dot)
    dot_field = np.searchsorted(ends, dots)
    misplaced_minus = None
    if int(is_minus.sum()) != int(negative.sum()):  # error path: some '-' does not open a field
        inside = is_minus.copy()
        inside[1:] &= ~is_delim[:-1]
        inside[0] = False
        misplaced_minus = int(np.count_nonzero(text[: int(np.argmax(inside))] == _NL))
    _check_fields(ends - starts, num_digits, dot_field, misplaced_minus, ncols)

    # Each digit's power of ten in the field's integer mantissa = digits after it in the field.
    end_digits = np.repeat(digits_at_end, np.diff(ends, prepend=-1))  # (n,) per byte, for its field
    power = end_digits - digits_through
    np.minimum(power, _MAX_DIGITS, out=power)
    power <<= 8
    power |= text  # index into _DIGIT_WEIGHT: (power, byte) -> digit * 10**power, 0 for non-digits
    mantissa = np.add.reduceat(np.take(_DIGIT_WEIGHT, power), starts)
    decimals = np.zeros(len(ends), dtype=np.int32)
    decimals[dot_field] = digits_at_end[dot_field] - digits_through[dots]
    values = mantissa / np.take(_POW10, decimals)
    values[negative] = -values[negative]
    return values


def _structure_problem(
    text: np.ndarray, allowed: np.ndarray, ends: np.ndarray, sep_byte: int, sep: str, ncols: int
) -> _LineError | None:
    """The first foreign character or wrong separator count, whichever comes on an earlier line."""
    problems: list[_LineError] = []
    if not allowed.all():
        pos = int(np.argmin(allowed))
        line = int(np.count_nonzero(text[:pos] == _NL))
        char = chr(text[pos])
        if char in _SEPARATOR_LIKE:
            message = f"wrong separator {char!r}; expected {ncols} fields separated by {sep!r}"
        else:
            message = f"non-numeric character {char!r}; expected {ncols} numeric fields"
        problems.append(_LineError(line, message))
    is_newline = text[ends] == _NL  # (F,)
    well_formed = len(ends) % ncols == 0
    if well_formed:
        by_line = is_newline.reshape(-1, ncols)
        well_formed = bool(by_line[:, -1].all()) and not by_line[:, :-1].any()
    if not well_formed:
        line_of_delim = np.cumsum(is_newline) - is_newline
        fields_per_line = np.bincount(line_of_delim, minlength=int(is_newline.sum()))
        line = int(np.flatnonzero(fields_per_line != ncols)[0])
        found = int(fields_per_line[line])
        problems.append(_LineError(line, f"expected {ncols} columns separated by {sep!r}, found {found}"))
    return min(problems, key=lambda p: p.line) if problems else None


def _check_fields(
    lengths: np.ndarray,
    num_digits: np.ndarray,
    dot_field: np.ndarray,
    misplaced_minus: int | None,
    ncols: int,
) -> None:
    """Raise at the first line holding a malformed number.

    Args:
        lengths, num_digits: ``(F,)`` per field.
        dot_field: ``(D,)`` field index of each '.', ascending.
        misplaced_minus: line of the first '-' that does not open a field, if any.
    """
    problems: list[_LineError] = []

    def first(mask_or_index: np.ndarray, message: str, *, is_index: bool = False) -> None:
        index = mask_or_index if is_index else np.flatnonzero(mask_or_index)
        if len(index):
            problems.append(_LineError(int(index[0]) // ncols, message))

    first(lengths == 0, "empty field")
    first((num_digits == 0) & (lengths > 0), "a field has no digit")
    first(num_digits > _MAX_DIGITS, f"a number has more than {_MAX_DIGITS} digits")
    if len(dot_field) > 1:
        repeated = np.flatnonzero(np.diff(dot_field) == 0)
        first(dot_field[repeated], "a number has more than one '.'", is_index=True)
    if misplaced_minus is not None:
        problems.append(_LineError(misplaced_minus, "misplaced '-' (only a leading minus sign is allowed)"))
    if problems:
        raise min(problems, key=lambda p: p.line)


def _integral_column(values: np.ndarray, column: int, file: Path, first_line: int, name: str) -> np.ndarray:
    """``(N,)`` int64 column, or DataError at the first line whose value is not an integer."""
    col = values[:, column]
    fractional = np.flatnonzero(col != np.floor(col))
    if len(fractional):
        row = int(fractional[0])
        raise DataError(f"{file}, line {first_line + row}: {name} must be an integer, found {float(col[row])!r}")
    return col.astype(np.int64)
