"""Summary statistics of a :class:`~malloc.data.sequences.Dataset`, as a dict and as a small text table."""

from __future__ import annotations

import numpy as np

from malloc.data.sequences import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, UNKNOWN_LABEL, Dataset

_SPLIT_NAMES = ((SPLIT_TRAIN, "train"), (SPLIT_VALID, "valid"), (SPLIT_TEST, "test"))


def dataset_stats(ds: Dataset) -> dict[str, str | int | float | None]:
    """Sizes, label balance and history-length distribution of a data set.

    Keys: ``name``, ``users``, ``items``, ``events``; ``positive_rate`` (share of label-1 events among the
    labelled ones, ``None`` when no event has a label); ``length_mean``, ``length_p50``, ``length_p90``,
    ``length_p99``, ``length_max`` (events per user; percentiles by linear interpolation). When the data
    set has its own CTR rows: ``ctr_rows_train``, ``ctr_rows_valid``, ``ctr_rows_test`` and
    ``ctr_positive_rate``.
    """
    seq = ds.sequences
    lengths = seq.lengths.astype(np.float64)
    known = seq.labels != UNKNOWN_LABEL
    stats: dict[str, str | int | float | None] = {
        "name": seq.name,
        "users": seq.num_users,
        "items": seq.num_items,
        "events": seq.num_events,
        "positive_rate": float((seq.labels[known] == 1).mean()) if known.any() else None,
    }
    if len(lengths):
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        stats.update(
            length_mean=float(lengths.mean()),
            length_p50=float(p50),
            length_p90=float(p90),
            length_p99=float(p99),
            length_max=int(lengths.max()),
        )
    rows = ds.ctr_rows
    if rows is not None:
        for split, name in _SPLIT_NAMES:
            stats[f"ctr_rows_{name}"] = int((rows.split == split).sum())
        stats["ctr_positive_rate"] = float(rows.label.mean()) if len(rows) else None
    return stats


def format_stats(stats: dict[str, str | int | float | None]) -> str:
    """Two aligned columns, one ``key  value`` line per entry (ints with thousands separators)."""
    width = max((len(key) for key in stats), default=0)
    return "\n".join(f"{key:<{width}}  {_format_value(value):>12}" for key, value in stats.items())


def _format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):,.4g}" if abs(float(value)) < 1e4 else f"{float(value):,.0f}"
    return str(value)
