"""Significance of a scheme against Native: seed statistics and a paired test over users.

Every suite item stores its per-user metric delta against Native on the same users (CTR: the user's AUC, the
GAUC term; retrieval: the user's NDCG@10). With several seeds, each user's delta is averaged over the seeds
first, then :func:`wilcoxon_signed_rank` tests whether the deltas are centred on 0. The test is the two-sided
Wilcoxon signed-rank test with the normal approximation (zeros dropped, tie-corrected variance, no continuity
correction), checked against ``scipy.stats.wilcoxon(..., method="approx")`` in the tests; it needs no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from malloc.evaluate import average_ranks


def wilcoxon_signed_rank(delta: np.ndarray) -> dict[str, float | int]:
    """Two-sided Wilcoxon signed-rank test of paired differences ``delta (N,)`` against 0.

    NaN entries (users without a defined metric) and zero differences are dropped.

    Returns:
        ``n`` (non-zero differences used), ``w_plus`` (sum of the ranks of positive differences), ``z``
        (standardised ``w_plus``) and ``p_value`` (two-sided; NaN when no difference is non-zero).
    """
    d = np.asarray(delta, dtype=np.float64)
    d = d[~np.isnan(d)]
    d = d[d != 0.0]
    n = len(d)
    if n == 0:
        return {"n": 0, "w_plus": float("nan"), "z": float("nan"), "p_value": float("nan")}
    magnitude = np.abs(d)
    ranks = average_ranks(magnitude)
    w_plus = float(ranks[d > 0].sum())
    _, ties = np.unique(magnitude, return_counts=True)
    variance = n * (n + 1) * (2 * n + 1) / 24.0 - float((ties ** 3 - ties).sum()) / 48.0
    if variance <= 0:
        return {"n": n, "w_plus": w_plus, "z": float("nan"), "p_value": float("nan")}
    z = (w_plus - n * (n + 1) / 4.0) / math.sqrt(variance)
    return {"n": n, "w_plus": w_plus, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2.0))}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value, NaN for none) of the finite values."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def seed_mean_delta(per_seed: Sequence[tuple[Sequence[int], Sequence[float | None]]]) -> np.ndarray:
    """Each user's delta averaged over seeds: ``per_seed`` is one ``(users, deltas)`` pair per seed (JSON null =
    undefined). Users missing from a seed, or undefined there, are averaged over the seeds that have them.

    Returns:
        ``(U,)`` float64 over the union of users (sorted by id); NaN where no seed defines the user.
    """
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for users, deltas in per_seed:
        for user, value in zip(users, deltas, strict=True):
            if value is None or not math.isfinite(value):
                continue
            sums[user] = sums.get(user, 0.0) + float(value)
            counts[user] = counts.get(user, 0) + 1
    users = sorted(set().union(*(set(u) for u, _ in per_seed))) if per_seed else []
    return np.array([sums[u] / counts[u] if u in counts else float("nan") for u in users], dtype=np.float64)
