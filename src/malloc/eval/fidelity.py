"""Fidelity: how closely a scheme's predictions follow Native's on the same users and rows.

CTR compares logits (Pearson, Spearman, mean absolute difference) and each user's AUC (the user's GAUC term);
retrieval compares each user's top-K (overlap) and target rank (Spearman) and NDCG@K. The per-user metric deltas
are also the pairs of the paired test (:func:`malloc.eval.statistics.wilcoxon_signed_rank`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from malloc.data.tasks import CTRView, RetrievalView
from malloc.eval.metrics import ndcg_gain, user_aucs
from malloc.eval.replay import Replay
from malloc.eval.statistics import nan_mean_std, pearson, spearman

# top-K of the retrieval fidelity (overlap of each user's top-K with Native's) and of per-user NDCG deltas
FIDELITY_TOP_K = 10


def user_auc_delta(users: np.ndarray, labels: np.ndarray, logits: np.ndarray, native: np.ndarray) -> np.ndarray:
    """``(U,)`` each user's AUC under ``logits`` minus under ``native`` (rows ``(R,)``; users in ascending id
    order; NaN for a user with one label class)."""
    labels = np.asarray(labels).astype(np.int8)
    scheme_auc, _, _ = user_aucs(np.asarray(users), labels, np.asarray(logits, dtype=np.float64))
    native_auc, _, _ = user_aucs(np.asarray(users), labels, np.asarray(native, dtype=np.float64))
    return scheme_auc - native_auc


def ctr_fidelity(users: np.ndarray, labels: np.ndarray, logits: np.ndarray, native: np.ndarray) -> dict[str, float]:
    """Agreement of CTR logits ``(R,)`` with Native's on the same rows.

    Returns:
        ``logit_pearson``, ``logit_spearman``, ``logit_abs_delta_mean``, and the per-user AUC delta scheme - Native,
        mean and std over users with both labels (``user_auc_delta_*``), and how many users that is.
    """
    delta = user_auc_delta(users, labels, logits, native)
    mean, std = nan_mean_std(delta)
    return {"logit_pearson": pearson(logits, native), "logit_spearman": spearman(logits, native),
            "logit_abs_delta_mean": float(np.mean(np.abs(np.asarray(logits) - native))) if len(native) else 0.0,
            "user_auc_delta_mean": mean, "user_auc_delta_std": std, "users_compared": int((~np.isnan(delta)).sum())}


def retrieval_fidelity(ranks: np.ndarray, top: np.ndarray, native_ranks: np.ndarray, native_top: np.ndarray,
                       k: int = FIDELITY_TOP_K) -> dict[str, float]:
    """Agreement of retrieval outputs with Native's on the same users.

    Args:
        ranks, native_ranks: ``(U,)`` 1-based target ranks; top, native_top: ``(U, k)`` item ids.
    Returns:
        ``top{k}_overlap_mean`` (|top-k intersection| / k, mean over users), ``target_rank_spearman``, and the
        per-user NDCG@k delta scheme - Native, mean and std (``ndcg@{k}_delta_*``).
    """
    k = min(k, np.shape(top)[1]) if np.ndim(top) == 2 else k  # a catalogue smaller than k ranks all its items
    overlap = np.array([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(top, native_top, strict=True)])
    mean, std = nan_mean_std(ndcg_gain(ranks, k) - ndcg_gain(native_ranks, k))
    return {f"top{k}_overlap_mean": float(overlap.mean()) if len(overlap) else float("nan"),
            "target_rank_spearman": spearman(ranks, native_ranks),
            f"ndcg@{k}_delta_mean": mean, f"ndcg@{k}_delta_std": std}


def fidelity(view: CTRView | RetrievalView, split: str, result: Replay, native: Replay) -> dict[str, float]:
    """Agreement of a replay with Native's replay of the same split (:func:`ctr_fidelity`,
    :func:`retrieval_fidelity`)."""
    if isinstance(view, CTRView):
        rows = view.split(split)
        assert result.logits is not None and native.logits is not None
        return ctr_fidelity(rows.user, rows.label, result.logits, native.logits)
    assert result.ranks is not None and native.ranks is not None
    return retrieval_fidelity(result.ranks, result.top, native.ranks, native.top)


def per_user_delta(view: CTRView | RetrievalView, split: str, result: Replay, native: Replay) -> dict[str, Any]:
    """Each user's metric under ``result`` minus Native's (the pairs of a paired test).

    Returns:
        ``{"metric", "users", "delta"}``: CTR: ``user_auc`` (the user's GAUC term), users = the split's users
        sorted, delta NaN for a user with one label class; retrieval: ``ndcg@{FIDELITY_TOP_K}``, users = every
        user id. ``users`` and ``delta`` are lists of the same length.
    """
    if isinstance(view, CTRView):
        rows = view.split(split)
        assert result.logits is not None and native.logits is not None
        return {"metric": "user_auc", "users": np.unique(rows.user).tolist(),
                "delta": user_auc_delta(rows.user, rows.label, result.logits, native.logits).tolist()}
    assert result.ranks is not None and native.ranks is not None
    delta = ndcg_gain(result.ranks, FIDELITY_TOP_K) - ndcg_gain(native.ranks, FIDELITY_TOP_K)
    return {"metric": f"ndcg@{FIDELITY_TOP_K}", "users": list(range(len(delta))), "delta": delta.tolist()}
