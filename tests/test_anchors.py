"""The anchors (scores without a sequence model) and the CTR protocols they are read under."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from malloc.data.sequences import Dataset, build_sequences
from malloc.data.tasks import CTRView, RetrievalView, ctr_rows
from malloc.eval.anchors import (
    ctr_anchor_logits,
    fit_ctr_mf,
    fit_retrieval_mf,
    item_mean_logits,
    popularity_ranks,
    rank_targets,
    user_rate_logits,
    visible_labels,
)
from malloc.eval.metrics import ctr_metrics, gauc, retrieval_metrics


def _interaction_view(users: int = 60, items: int = 40, events: int = 30, seed: int = 0) -> CTRView:
    """Two user types and two item types; a user clicks exactly the items of its own type: every item's and every
    user's mean label is about 1/2, so only an interaction (MF's factors) can rank within a user."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), events)
    item = rng.integers(1, items + 1, len(user))
    label = ((user % 2) == (item % 2)).astype(np.int8)
    stamp = np.tile(np.arange(events), users) * 60
    seqs = build_sequences("interaction", user, item, stamp, label)
    return CTRView(seqs, ctr_rows(Dataset(seqs), 0.2, 0.2))


def test_item_mean_is_the_smoothed_training_mean():
    view = _interaction_view()
    train, test = view.split("train"), view.split("test")
    item = int(test.item[0])
    mine = train.label[train.item == item]
    base = train.label.mean()
    expected = (mine.sum() + base) / (len(mine) + 1.0)
    assert item_mean_logits(view, "test")[0] == pytest.approx(np.log(expected / (1 - expected)))


def test_mf_learns_an_interaction_that_no_mean_sees():
    view = _interaction_view()
    test = view.split("test")
    logits = ctr_anchor_logits(view, "test", "blind")
    assert ctr_metrics(test.user, test.label, logits["mf"])["gauc"] > 0.95
    assert abs(ctr_metrics(test.user, test.label, logits["item-mean"])["gauc"] - 0.5) < 0.15


def test_visible_labels_and_the_user_rate():
    # one user, events 0..9 with labels 1,1,1,1,0,0,0,0,0,0 ; rows at history lengths 7, 8, 9 (its window)
    seqs = build_sequences("one", np.zeros(10, dtype=np.int64), np.arange(1, 11), np.arange(10),
                           np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=np.int8))
    rows = ctr_rows(Dataset(seqs), 0.3, 0.1)
    window = rows.select(rows.split == 2)
    assert window.history_len.tolist() == [7, 8, 9]
    assert visible_labels(window, "feedback").tolist() == [7, 8, 9]
    assert visible_labels(window, "blind").tolist() == [7, 7, 7]
    rate = 1 / (1 + np.exp(-user_rate_logits(seqs, window, "feedback", base=0.5, prior=0.0)))
    np.testing.assert_allclose(rate, [4 / 7, 4 / 8, 4 / 9])
    rate = 1 / (1 + np.exp(-user_rate_logits(seqs, window, "blind", base=0.5, prior=0.0)))
    np.testing.assert_allclose(rate, [4 / 7] * 3)


def test_the_blind_protocol_removes_the_window_bias_on_movielens():
    """A user's running positive rate, used as a score, ranks a window's rows below chance when it follows the
    window's own labels (feedback), and exactly at chance when it cannot (blind)."""
    pytest.importorskip("recbole")
    from malloc.data.sources import load_dataset

    ds = load_dataset("ml-100k")
    view = CTRView(ds.sequences, ctr_rows(ds))
    for split in ("valid", "test"):
        rows = view.split(split)
        blind = gauc(rows.user, rows.label, user_rate_logits(view.sequences, rows, "blind", 0.5))
        feedback = gauc(rows.user, rows.label, user_rate_logits(view.sequences, rows, "feedback", 0.5))
        assert blind == pytest.approx(0.5, abs=1e-12)
        assert feedback < 0.4  # the leave-one-out bias pushes it well below chance


def _cluster_view(users: int = 80, items: int = 60, events: int = 25, seed: int = 1) -> RetrievalView:
    """Users of two clusters consume items of their own cluster's half of the catalogue."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), events)
    half = items // 2
    item = rng.integers(1, half + 1, len(user)) + (user % 2) * half
    seqs = build_sequences("clusters", user, item, np.tile(np.arange(events), users), np.full(len(user), -1,
                                                                                               dtype=np.int8))
    return RetrievalView(seqs)


def test_retrieval_mf_beats_popularity_on_clustered_users():
    view = _cluster_view()
    user, item = fit_retrieval_mf(view, epochs=40)
    mf = retrieval_metrics(rank_targets(view, "test", lambda u: user[u] @ item.T), (10,))
    popular = retrieval_metrics(popularity_ranks(view, "test"), (10,))
    assert mf["hr@10"] > popular["hr@10"] + 0.1


def test_ctr_mf_is_seeded():
    view = _interaction_view(users=20)
    first, second = fit_ctr_mf(view, seed=3, epochs=3), fit_ctr_mf(view, seed=3, epochs=3)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert torch.get_default_dtype() == torch.float32
