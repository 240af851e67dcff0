"""Data: source readers, jagged per-user sequences, CTR rows and summary statistics.

``load_dataset(source, path)`` is the entry point; every reader returns a :class:`Dataset` of
:class:`Sequences` (and, for reczoo and LongCTR, the source's own :class:`CTRRows`).
"""

from malloc.data.sequences import (
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    UNKNOWN_LABEL,
    CTRRows,
    DataError,
    Dataset,
    Sequences,
    build_sequences,
)
from malloc.data.sources import SOURCES, drop_short_users, load_dataset
from malloc.data.sources.synthetic import SyntheticConfig
from malloc.data.stats import dataset_stats, format_stats

__all__ = [
    "SOURCES",
    "SPLIT_TEST",
    "SPLIT_TRAIN",
    "SPLIT_VALID",
    "UNKNOWN_LABEL",
    "CTRRows",
    "DataError",
    "Dataset",
    "Sequences",
    "SyntheticConfig",
    "build_sequences",
    "dataset_stats",
    "drop_short_users",
    "format_stats",
    "load_dataset",
]
