"""Accuracy metrics for the two tasks.

CTR: :func:`auc`, :func:`gauc`, :func:`logloss`, bundled by :func:`ctr_metrics`.
Retrieval over the full catalogue: :func:`target_ranks` turns a score matrix into the 1-based rank of each
user's target item, :func:`retrieval_metrics` turns ranks into HR@K, NDCG@K and MRR.

Inputs are NumPy arrays (``target_ranks`` also takes torch tensors); outputs are Python floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from malloc.data.sequences import Sequences

TieRule = Literal["pessimistic", "optimistic"]


def _as_binary_labels(labels: np.ndarray, n: int) -> np.ndarray:
    """Check ``labels (N,)`` are 0/1 and return them as int8."""
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} rows, expected {n}")
    if n and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return labels.astype(np.int8, copy=False)


def _as_scores(scores: np.ndarray) -> np.ndarray:
    """Return ``scores (N,)`` as float64, rejecting NaN (it would silently sort last)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def user_aucs(
    groups: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mann-Whitney AUC of every group at once, ties given average ranks.

    Args:
        groups: ``(N,)`` group key per row (any sortable dtype).
        labels: ``(N,)`` int8 0/1.
        scores: ``(N,)`` float64, no NaN.

    Returns:
        ``(auc (G,), rows (G,), positives (G,))``; ``auc`` is NaN where a group has a single class.
    """
    order = np.lexsort((scores, groups))
    sorted_groups, sorted_scores, sorted_labels = groups[order], scores[order], labels[order]
    n = len(order)
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = sorted_groups[1:] != sorted_groups[:-1]
    new_run = new_group.copy()  # a run = equal (group, score), i.e. one block of ties
    new_run[1:] |= sorted_scores[1:] != sorted_scores[:-1]

    group_starts = np.flatnonzero(new_group)
    run_starts = np.flatnonzero(new_run)
    run_ends = np.append(run_starts[1:], n) - 1
    group_of_row = np.cumsum(new_group) - 1
    run_of_row = np.cumsum(new_run) - 1

    # The average 1-based rank of a tie block inside its group is the mean of its first and last rank.
    run_rank = (run_starts + run_ends) / 2.0 - group_starts[group_of_row[run_starts]] + 1.0
    row_rank = run_rank[run_of_row]

    rows = np.diff(np.append(group_starts, n))
    positives = np.add.reduceat(sorted_labels.astype(np.int64), group_starts)
    negatives = rows - positives
    positive_rank_sum = np.add.reduceat(np.where(sorted_labels == 1, row_rank, 0.0), group_starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        group_auc = (positive_rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)
    group_auc[(positives == 0) | (negatives == 0)] = np.nan
    return group_auc, rows, positives


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, ties between a positive and a negative counted as one half.

    Args:
        labels: ``(N,)`` 0/1.
        scores: ``(N,)`` any monotone score (logit or probability).

    Raises:
        ValueError: if only one class is present, or on NaN scores.
    """
    scores = _as_scores(scores)
    labels = _as_binary_labels(labels, len(scores))
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        raise ValueError("AUC is undefined when labels contain only one class")
    group_auc, _, _ = user_aucs(np.zeros(len(scores), dtype=np.int8), labels, scores)
    return float(group_auc[0])


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: per-group AUC averaged with weights equal to the group's number of rows.

    Groups (users) whose rows are all one class are skipped; a qualifying group weighs all its rows, as in
    DIN and FuxiCTR.

    Args:
        groups: ``(N,)`` group key per row (user id).
        labels: ``(N,)`` 0/1.
        scores: ``(N,)`` any monotone score.

    Returns:
        The weighted mean, or NaN if no group has both classes.
    """
    scores = _as_scores(scores)
    groups = np.asarray(groups).reshape(-1)
    if groups.shape[0] != scores.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} rows, scores has {scores.shape[0]}")
    labels = _as_binary_labels(labels, len(scores))
    if len(scores) == 0:
        return float("nan")
    group_auc, rows, _ = user_aucs(groups, labels, scores)
    qualifies = ~np.isnan(group_auc)
    if not qualifies.any():
        return float("nan")
    weights = rows[qualifies].astype(np.float64)
    return float(np.sum(group_auc[qualifies] * weights) / np.sum(weights))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to ``[eps, 1 - eps]``.

    Args:
        labels: ``(N,)`` 0/1.
        probs: ``(N,)`` predicted probability of the positive class.
    """
    probs = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    labels = _as_binary_labels(labels, len(probs))
    if len(probs) == 0:
        raise ValueError("logloss of an empty set")
    losses = np.where(labels == 1, -np.log(probs), -np.log1p(-probs))
    return float(np.mean(losses))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function, ``(N,)`` float64 in, ``(N,)`` float64 out."""
    logits = np.asarray(logits, dtype=np.float64)
    decay = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))


def ctr_metrics(groups: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and Logloss of CTR predictions.

    AUC and GAUC are computed on the logits (sigmoid is monotone, and saturating it would create false ties);
    Logloss on ``sigmoid(logits)``. AUC is NaN, not an error, when the rows hold a single class.

    Args:
        groups: ``(N,)`` user id per row.
        labels: ``(N,)`` 0/1.
        logits: ``(N,)`` raw model outputs.

    Returns:
        ``{"auc", "gauc", "logloss"}``.
    """
    logits = _as_scores(logits)
    labels = _as_binary_labels(labels, len(logits))
    positives = int(labels.sum())
    single_class = positives == 0 or positives == len(labels)
    return {
        "auc": float("nan") if single_class else auc(labels, logits),
        "gauc": gauc(groups, labels, logits),
        "logloss": logloss(labels, sigmoid(logits)),
    }


def target_ranks(
    scores: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    exclude: torch.Tensor | np.ndarray | None = None,
    ties: TieRule = "pessimistic",
) -> np.ndarray:
    """1-based rank of each row's target item among all non-excluded items.

    ``rank = 1 + #{items scoring strictly higher than the target}`` plus, with ``ties="pessimistic"`` (the
    default), ``#{other items scoring exactly the same}``. Pessimistic ties matter: a collapsed model that
    scores every item alike (e.g. a state compressed to nothing) would otherwise rank every target first and
    reach HR@K = 1. ``ties="optimistic"`` counts only strictly higher items. Excluded items (the user's
    history, padding) never count; the target itself is never excluded.

    Args:
        scores: ``(B, I)`` scores over the full catalogue (torch or NumPy; any device).
        targets: ``(B,)`` int item index into the second dimension.
        exclude: optional ``(B, I)`` bool, True for items to mask out.
        ties: ``"pessimistic"`` or ``"optimistic"``.

    Returns:
        ``(B,)`` int64 NumPy array of ranks in ``1 .. I``.

    Raises:
        ValueError: on a NaN score, a target out of range or mismatched shapes.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, I), got shape {tuple(scores.shape)}")
    targets = torch.as_tensor(targets, device=scores.device).reshape(-1).long()
    num_rows, num_items = scores.shape
    if targets.shape[0] != num_rows:
        raise ValueError(f"targets has {targets.shape[0]} rows, scores has {num_rows}")
    if num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    if bool(((targets < 0) | (targets >= num_items)).any()):
        raise ValueError(f"targets must lie in [0, {num_items})")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")

    # Items the target is compared with: everything except the excluded items and the target itself.
    if exclude is None:
        compared = torch.ones_like(scores, dtype=torch.bool)
    else:
        compared = ~torch.as_tensor(exclude, device=scores.device, dtype=torch.bool)
        if compared.shape != scores.shape:
            raise ValueError(f"exclude has shape {tuple(compared.shape)}, scores {tuple(scores.shape)}")
    compared = compared.scatter(1, targets[:, None], False)

    target_scores = scores.gather(1, targets[:, None])
    above = scores >= target_scores if ties == "pessimistic" else scores > target_scores
    ranks = 1 + (above & compared).sum(dim=1)
    return ranks.cpu().numpy().astype(np.int64)


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int] = (10, 50, 200)) -> dict[str, float]:
    """HR@K, NDCG@K and MRR for one relevant item per row.

    ``hr@k = mean(rank <= k)``, ``ndcg@k = mean(1 / log2(rank + 1) if rank <= k else 0)``,
    ``mrr = mean(1 / rank)``.

    Args:
        ranks: ``(N,)`` 1-based ranks, e.g. from :func:`target_ranks`.
        ks: cut-offs.

    Returns:
        ``{"hr@k", "ndcg@k" for k in ks} | {"mrr"}``.
    """
    ranks = np.asarray(ranks).reshape(-1)
    if len(ranks) == 0:
        raise ValueError("retrieval metrics of an empty set")
    if (ranks < 1).any():
        raise ValueError("ranks are 1-based and must be >= 1")
    ranks = ranks.astype(np.float64)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"hr@{k}"] = float(np.mean(ranks <= k))
        metrics[f"ndcg@{k}"] = float(np.mean(ndcg_gain(ranks, k)))
    metrics["mrr"] = float(np.mean(1.0 / ranks))
    return metrics


def ndcg_gain(ranks: np.ndarray, k: int) -> np.ndarray:
    """``(N,)`` each row's NDCG@k with one relevant item at 1-based ``ranks (N,)``: ``1 / log2(rank + 1)`` within
    the cut-off, else 0 (the ideal DCG of one relevant item is 1)."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def history_exclusion(seqs: Sequences, users: np.ndarray, stops: np.ndarray, num_columns: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, num_columns)`` bool: True at the items user ``users[b]`` consumed before its event ``stops[b]``, the
    items a retrieval ranking leaves out (``eval.mask_history``)."""
    exclude = torch.zeros(len(users), num_columns, dtype=torch.bool, device=device)
    for b, (user, stop) in enumerate(zip(users.tolist(), np.asarray(stops).tolist(), strict=True)):
        base = int(seqs.offsets[user])
        exclude[b, torch.as_tensor(seqs.items[base:base + int(stop)], device=device)] = True
    return exclude
