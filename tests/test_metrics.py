"""Metrics against hand-computed values and against scikit-learn."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from malloc.eval.metrics import (
    auc,
    ctr_metrics,
    gauc,
    logloss,
    retrieval_metrics,
    sigmoid,
    target_ranks,
)

# ---------------------------------------------------------------- AUC


def test_auc_hand_example() -> None:
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered.
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auc_ties_count_half() -> None:
    # Pairs: (0.5 vs 0.5) = 1/2, (0.5 vs 0.2) = 1, (0.9 vs both) = 2 -> 3.5 / 4.
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == pytest.approx(0.875)
    assert auc(np.array([0, 1, 1, 0, 1]), np.zeros(5)) == pytest.approx(0.5)


def test_auc_single_class_raises() -> None:
    with pytest.raises(ValueError, match="one class"):
        auc(np.ones(4), np.arange(4.0))


def test_auc_rejects_nan_and_bad_labels() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="0 or 1"):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=2, max_size=60).filter(
        lambda rows: len({label for label, _ in rows}) == 2
    )
)
def test_auc_matches_sklearn_with_many_ties(rows: list[tuple[int, int]]) -> None:
    labels = np.array([label for label, _ in rows])
    scores = np.array([score for _, score in rows], dtype=np.float64)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_matches_sklearn_random() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    scores = np.round(rng.normal(size=5000) + labels, 1)  # rounding creates ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


# ---------------------------------------------------------------- GAUC


def test_gauc_hand_example_weights_and_skips() -> None:
    groups = np.array([7, 7, 7, 3, 3, 9, 9, 9, 9])
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.95, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4])
    # User 7: AUC 1/2 over 3 rows; user 3: AUC 1 over 2 rows; user 9: all positive, skipped.
    assert gauc(groups, labels, scores) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)


def test_gauc_weight_counts_all_rows_of_a_group() -> None:
    # User 1 has one positive and three negatives: weight 4, not the number of pairs (3) or positives (1).
    groups = np.array([1, 1, 1, 1, 2, 2])
    labels = np.array([1, 0, 0, 0, 1, 0])
    scores = np.array([0.5, 0.6, 0.1, 0.2, 0.1, 0.9])
    assert gauc(groups, labels, scores) == pytest.approx((4 * (2 / 3) + 2 * 0.0) / 6)


def test_gauc_no_qualifying_group_is_nan() -> None:
    assert math.isnan(gauc(np.array([1, 1, 2]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3])))
    assert math.isnan(gauc(np.array([], dtype=int), np.array([], dtype=int), np.array([])))


def test_gauc_ties_within_group_only() -> None:
    # Equal scores in different groups must not be averaged together.
    groups = np.array([1, 1, 2, 2])
    labels = np.array([1, 0, 0, 1])
    scores = np.array([0.5, 0.5, 0.5, 0.7])
    assert gauc(groups, labels, scores) == pytest.approx((2 * 0.5 + 2 * 1.0) / 4)


def test_gauc_string_groups() -> None:
    groups = np.array(["b", "a", "b", "a"])
    labels = np.array([1, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    assert gauc(groups, labels, scores) == pytest.approx(0.5)


def _reference_gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    total, weight = 0.0, 0
    for group in np.unique(groups):
        rows = groups == group
        if labels[rows].min() == labels[rows].max():
            continue
        total += rows.sum() * roc_auc_score(labels[rows], scores[rows])
        weight += rows.sum()
    return total / weight if weight else float("nan")


@pytest.mark.parametrize("seed", range(3))
def test_gauc_matches_per_group_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    groups = rng.integers(0, 100, n)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(size=n), 1)
    assert gauc(groups, labels, scores) == pytest.approx(_reference_gauc(groups, labels, scores), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1), st.integers(-2, 2)), min_size=1, max_size=40))
def test_gauc_property_matches_reference(rows: list[tuple[int, int, int]]) -> None:
    groups, labels, scores = (np.array(column) for column in zip(*rows, strict=True))
    expected = _reference_gauc(groups, labels, scores.astype(np.float64))
    value = gauc(groups, labels, scores)
    assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected, abs=1e-12)


def test_gauc_is_fast_on_a_million_rows() -> None:
    rng = np.random.default_rng(0)
    n = 1_000_000
    groups = rng.integers(0, 100_000, n)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n).astype(np.float32)
    start = time.perf_counter()
    value = gauc(groups, labels, scores)
    assert time.perf_counter() - start < 5.0
    assert 0.45 < value < 0.55


# ---------------------------------------------------------------- Logloss and the CTR bundle


def test_logloss_hand_example() -> None:
    expected = -(math.log(0.8) + math.log(1 - 0.4)) / 2
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(expected)


def test_logloss_clips_extremes() -> None:
    value = logloss(np.array([1, 0]), np.array([0.0, 1.0]), eps=1e-7)
    assert value == pytest.approx(-math.log(1e-7))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.floats(0.001, 0.999, allow_nan=False)), min_size=1, max_size=50)
)
def test_logloss_matches_sklearn(rows: list[tuple[int, float]]) -> None:
    labels = np.array([label for label, _ in rows])
    probs = np.array([prob for _, prob in rows])
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs, labels=[0, 1]), rel=1e-9)


def test_sigmoid_is_stable() -> None:
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        probs = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(probs, [0.0, 0.5, 1.0])


def test_ctr_metrics_bundle() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 20, 500)
    labels = rng.integers(0, 2, 500)
    logits = rng.normal(size=500) + labels
    metrics = ctr_metrics(groups, labels, logits)
    assert set(metrics) == {"auc", "gauc", "logloss"}
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, logits))
    assert metrics["gauc"] == pytest.approx(_reference_gauc(groups, labels, logits))
    assert metrics["logloss"] == pytest.approx(log_loss(labels, 1 / (1 + np.exp(-logits))))


def test_ctr_metrics_auc_uses_logits_not_saturated_probs() -> None:
    # sigmoid(40) and sigmoid(50) are both 1.0 in float64; the logits still order them.
    metrics = ctr_metrics(np.zeros(2), np.array([0, 1]), np.array([40.0, 50.0]))
    assert metrics["auc"] == 1.0


def test_ctr_metrics_single_class_gives_nan_auc() -> None:
    metrics = ctr_metrics(np.array([1, 2]), np.array([1, 1]), np.array([0.3, -0.2]))
    assert math.isnan(metrics["auc"]) and math.isnan(metrics["gauc"])
    assert math.isfinite(metrics["logloss"])


# ---------------------------------------------------------------- Ranks


def test_target_ranks_hand_example_and_ties() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5], [0.1, 0.5, 0.3, 0.5]])
    targets = torch.tensor([1, 2])
    assert target_ranks(scores, targets).tolist() == [2, 3]
    assert target_ranks(scores, targets, ties="optimistic").tolist() == [1, 3]


def test_target_ranks_masks_history_but_never_the_target() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5]])
    exclude = torch.tensor([[False, True, True, True]])
    # Items 1 and 3 are masked; the target (2) is masked too, which is ignored.
    assert target_ranks(scores, torch.tensor([2]), exclude).tolist() == [1]
    assert target_ranks(scores, torch.tensor([0]), exclude).tolist() == [1]
    assert target_ranks(scores, torch.tensor([0])).tolist() == [4]


def test_target_ranks_collapsed_scores_rank_last() -> None:
    # A model that scores every item alike must not reach HR@1 = 1.
    ranks = target_ranks(torch.zeros(3, 50), torch.tensor([0, 10, 49]))
    assert ranks.tolist() == [50, 50, 50]


def test_target_ranks_numpy_and_torch_agree_and_return_int64() -> None:
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, size=(16, 30)).astype(np.float32)
    targets = rng.integers(0, 30, 16)
    exclude = rng.random((16, 30)) < 0.3
    from_numpy = target_ranks(scores, targets, exclude)
    from_torch = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(exclude))
    assert from_numpy.dtype == np.int64 and from_numpy.shape == (16,)
    np.testing.assert_array_equal(from_numpy, from_torch)


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_target_ranks_against_brute_force(ties: str) -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=(40, 25)).astype(np.float64)
    targets = rng.integers(0, 25, 40)
    exclude = rng.random((40, 25)) < 0.4
    expected = []
    for row, target in enumerate(targets):
        others = [i for i in range(25) if i != target and not exclude[row, i]]
        other_scores = scores[row, others]
        target_score = scores[row, target]
        beaten = other_scores >= target_score if ties == "pessimistic" else other_scores > target_score
        expected.append(1 + int(beaten.sum()))
    np.testing.assert_array_equal(target_ranks(scores, targets, exclude, ties=ties), expected)


def test_target_ranks_errors() -> None:
    with pytest.raises(ValueError, match="targets must lie"):
        target_ranks(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(B, I\)"):
        target_ranks(torch.zeros(3), torch.tensor([0]))
    with pytest.raises(ValueError, match="exclude"):
        target_ranks(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ties"):
        target_ranks(torch.zeros(2, 3), torch.tensor([0, 1]), ties="average")  # type: ignore[arg-type]
    assert target_ranks(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).shape == (0,)


# ---------------------------------------------------------------- HR / NDCG / MRR


def test_retrieval_metrics_hand_example() -> None:
    metrics = retrieval_metrics(np.array([1, 3, 20]), ks=(10, 20))
    assert metrics["hr@10"] == pytest.approx(2 / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)  # 1/log2(3+1) = 0.5
    assert metrics["hr@20"] == pytest.approx(1.0)
    assert metrics["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(21)) / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 20) / 3)
    assert set(metrics) == {"hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr"}


def test_retrieval_metrics_default_ks_and_errors() -> None:
    assert set(retrieval_metrics(np.array([5]))) == {
        "hr@10",
        "ndcg@10",
        "hr@50",
        "ndcg@50",
        "hr@200",
        "ndcg@200",
        "mrr",
    }
    with pytest.raises(ValueError):
        retrieval_metrics(np.array([0, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.array([], dtype=np.int64))
