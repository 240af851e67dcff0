"""Statistics of the results: seed means, a paired test over users, correlations and the per-user bootstrap.

Every suite item stores its per-user metric delta against Native on the same users (CTR: the user's AUC, the
GAUC term; retrieval: the user's NDCG@10). With several seeds, each user's delta is averaged over the seeds
first, then :func:`wilcoxon_signed_rank` tests whether the deltas are centred on 0. The test is the two-sided
Wilcoxon signed-rank test with the normal approximation (zeros dropped, tie-corrected variance, no continuity
correction), checked against ``scipy.stats.wilcoxon(..., method="approx")`` in the tests; it needs no SciPy.

Standard errors of a split's metrics come from a per-user bootstrap (:func:`bootstrap`): resample the served
users with replacement, recompute the metrics from per-user statistics (:class:`UserScores`); the same resamples
for two predictions of the same users give their difference a paired standard error.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from malloc.eval.metrics import ndcg_gain, sigmoid, user_aucs

RETRIEVAL_K = 10  # the cut-off of the bootstrap's retrieval metrics


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


# -- correlations --------------------------------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """``(N,)`` 1-based ranks of ``x``, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    new_run = np.ones(len(x), dtype=bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], len(x))
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or empty."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when either side is constant."""
    return pearson(average_ranks(a), average_ranks(b))


def nan_mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of the non-NaN values; NaNs when there are none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return (float(x.mean()), float(x.std())) if len(x) else (float("nan"), float("nan"))


# -- the per-user bootstrap ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserScores:
    """What the bootstrap resamples: per served user, everything the metrics need.

    CTR: ``auc (U,)`` per-user AUC (NaN for a single class), ``rows (U,)``, ``loss (U,)`` summed row log loss,
    plus the row arrays ``row_user (R,)`` (index into the users), ``labels (R,)``, ``scores (R,)`` for the
    global AUC. Retrieval: ``ranks (U,)`` 1-based target ranks.
    """

    task: str
    ranks: np.ndarray | None = None
    auc: np.ndarray | None = None
    rows: np.ndarray | None = None
    loss: np.ndarray | None = None
    row_user: np.ndarray | None = None
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None

    @property
    def num_users(self) -> int:
        return len(self.ranks) if self.task == "retrieval" else len(self.rows)


def ctr_user_scores(users: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> UserScores:
    """Per-user CTR statistics of rows ``(R,)``; users in ascending id order."""
    labels = np.asarray(labels).astype(np.int8)
    logits = np.asarray(logits, dtype=np.float64)
    auc, rows, _ = user_aucs(np.asarray(users), labels, logits)
    uniq, row_user = np.unique(users, return_inverse=True)
    prob = np.clip(sigmoid(logits), 1e-7, 1 - 1e-7)
    row_loss = np.where(labels == 1, -np.log(prob), -np.log1p(-prob))
    loss = np.bincount(row_user, weights=row_loss, minlength=len(uniq))
    return UserScores("ctr", auc=auc, rows=rows.astype(np.float64), loss=loss, row_user=row_user, labels=labels,
                      scores=logits)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """ROC AUC with integer row weights (ties count one half); NaN with a single class."""
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order], weights[order]
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] != s[:-1]
    block = np.cumsum(new) - 1
    neg = np.bincount(block, weights=w * (y == 0))
    pos = np.bincount(block, weights=w * (y == 1))
    below = np.cumsum(neg) - neg  # negative weight strictly below each block
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    return float(((below + 0.5 * neg) * pos).sum() / (total_pos * total_neg))


def metrics_with_counts(scores: UserScores, counts: np.ndarray) -> dict[str, float]:
    """The metrics when user ``u`` is counted ``counts[u]`` times (all ones: the plain metrics)."""
    counts = np.asarray(counts, dtype=np.float64)
    if scores.task == "retrieval":
        ranks = np.asarray(scores.ranks, dtype=np.float64)
        total = counts.sum()
        return {f"ndcg@{RETRIEVAL_K}": float((counts * ndcg_gain(ranks, RETRIEVAL_K)).sum() / total),
                f"hr@{RETRIEVAL_K}": float((counts * (ranks <= RETRIEVAL_K)).sum() / total),
                "mrr": float((counts / ranks).sum() / total)}
    ok = ~np.isnan(scores.auc)
    weight = counts[ok] * scores.rows[ok]
    gauc = float((weight * scores.auc[ok]).sum() / weight.sum()) if weight.sum() else float("nan")
    return {"gauc": gauc,
            "auc": weighted_auc(scores.labels, scores.scores, counts[scores.row_user]),
            "logloss": float((counts * scores.loss).sum() / (counts * scores.rows).sum())}


def bootstrap_counts(num_users: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, num_users)`` how often each user is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_users, size=(resamples, num_users))
    return np.stack([np.bincount(row, minlength=num_users) for row in draws]) if resamples else np.zeros((0, 0))


def bootstrap(scores: UserScores, counts: np.ndarray) -> dict[str, np.ndarray]:
    """``{metric: (resamples,)}`` the metrics of every resample."""
    samples = [metrics_with_counts(scores, row) for row in counts]
    return {key: np.array([s[key] for s in samples]) for key in (samples[0] if samples else {})}


@dataclass(frozen=True)
class Bootstrapped:
    """A model's metrics over all users and over every resample of a shared ``counts`` (see :func:`bootstrapped`)."""

    metrics: dict[str, float]
    samples: dict[str, np.ndarray]


def bootstrapped(scores: UserScores, counts: np.ndarray) -> Bootstrapped:
    """``scores``' metrics over all users once each, and over the resamples ``counts``."""
    return Bootstrapped(metrics_with_counts(scores, np.ones(scores.num_users)), bootstrap(scores, counts))


def paired_comparison(mine: Bootstrapped, reference: Bootstrapped) -> dict[str, dict[str, float]]:
    """``{"metrics", "se", "delta", "delta_se"}``: ``mine``'s metrics with their bootstrap standard errors, and the
    difference to ``reference`` on the same users with the standard error of the paired difference (both
    bootstrapped over the same resamples)."""
    return {"metrics": mine.metrics, "se": {k: sample_std(v) for k, v in mine.samples.items()},
            "delta": {k: mine.metrics[k] - reference.metrics[k] for k in mine.metrics},
            "delta_se": {k: sample_std(mine.samples[k] - reference.samples[k]) for k in mine.samples}}


def sample_std(x: np.ndarray) -> float:
    """The standard deviation (ddof 1) of the non-NaN samples: a bootstrap standard error."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.std(ddof=1)) if len(x) > 1 else float("nan")
