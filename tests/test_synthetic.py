"""Synthetic source: determinism, shapes, the planted signal, and config validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from malloc.data import Sequences, SyntheticConfig, load_dataset
from malloc.data.sources.synthetic import generate, generate_with_truth

SMALL = SyntheticConfig(
    num_users=60, num_items=400, min_len=32, max_len=1200, num_topics=8, recall_min_gap=64, seed=3
)


def _same_user_steps(seqs: Sequences, values: np.ndarray) -> np.ndarray:
    user = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    return np.diff(values)[np.diff(user) == 0]


def _assert_arrays_equal(a: Sequences, b: Sequences) -> None:
    for name in ("offsets", "items", "timestamps", "labels", "user_ids", "item_ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_deterministic_from_seed() -> None:
    _assert_arrays_equal(generate(SMALL).sequences, generate(SMALL).sequences)
    other = generate(dataclasses.replace(SMALL, seed=4)).sequences
    assert not np.array_equal(other.items[:1000], generate(SMALL).sequences.items[:1000])


def test_shapes_and_jagged_invariants() -> None:
    seqs = generate(SMALL).sequences
    assert seqs.num_users == SMALL.num_users and seqs.num_items == SMALL.num_items
    assert seqs.lengths.min() >= SMALL.min_len and seqs.lengths.max() <= SMALL.max_len
    assert seqs.lengths.max() > 4 * seqs.lengths.min()  # lengths spread (log-uniform), not constant
    assert seqs.offsets[0] == 0 and seqs.offsets[-1] == seqs.num_events == len(seqs.items)
    assert seqs.items.min() >= 1 and seqs.items.max() <= seqs.num_items
    assert set(np.unique(seqs.labels).tolist()) <= {0, 1} and seqs.has_labels()
    assert np.all(_same_user_steps(seqs, seqs.timestamps) > 0)  # strictly increasing per user
    gaps = _same_user_steps(seqs, seqs.timestamps)
    assert 1800 < np.median(gaps) < 7200 and gaps.max() > 86_400  # hours apart, with multi-day breaks
    assert seqs.items.dtype == np.int64 and seqs.timestamps.dtype == np.int64 and seqs.labels.dtype == np.int8


def test_planted_signal() -> None:
    ds, truth = generate_with_truth(SMALL)
    seqs = ds.sequences
    user = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    topic = truth.item_topic[seqs.items]
    favourite = (truth.favourites[user] == topic[:, None]).any(axis=1)
    fresh = ~truth.is_recall
    # Labels follow the planted rule up to the 10% noise.
    assert seqs.labels[favourite & fresh].mean() > 0.85
    assert seqs.labels[~favourite & fresh].mean() < 0.15
    assert seqs.labels[truth.is_recall].mean() > 0.85
    assert np.mean(seqs.labels != truth.clean_labels) == pytest.approx(SMALL.label_noise, abs=0.02)
    # Re-consumed items really occurred at least recall_min_gap events earlier, for the same user.
    recalls = np.flatnonzero(truth.is_recall)
    source = truth.recall_source[recalls]
    assert len(recalls) > 100
    assert np.all(user[source] == user[recalls])
    assert np.all(recalls - source >= SMALL.recall_min_gap)
    assert np.array_equal(seqs.items[source], seqs.items[recalls])
    assert np.all(truth.recall_source[fresh] == -1)
    # Favourite topics are fixed per user and over-represented in that user's history.
    per_user_fav = np.bincount(user[favourite], minlength=seqs.num_users) / seqs.lengths
    assert per_user_fav.mean() > SMALL.favourite_prob + 0.05


def test_long_histories() -> None:
    cfg = SyntheticConfig(num_users=3, num_items=2000, min_len=16_384, max_len=16_384, seed=1)
    ds, truth = generate_with_truth(cfg)
    seqs = ds.sequences
    assert seqs.lengths.tolist() == [16_384] * 3
    recalls = np.flatnonzero(truth.is_recall)
    assert len(recalls) > 1000 and np.all(recalls - truth.recall_source[recalls] >= cfg.recall_min_gap)
    assert np.all(_same_user_steps(seqs, seqs.timestamps) > 0)


def test_load_dataset_synthetic() -> None:
    cfg = dataclasses.replace(SMALL, num_users=5)
    ds = load_dataset("synthetic", synthetic=cfg)
    assert ds.sequences.name == "synthetic" and ds.sequences.num_users == 5 and ds.ctr_rows is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_users", 0),
        ("num_items", 4),  # fewer items than topics
        ("min_len", 0),
        ("max_len", 10),  # below min_len
        ("num_topics", 0),
        ("zipf_exponent", -1.0),
        ("interests_per_user", 0),
        ("interests_per_user", 33),
        ("favourite_topics", 40),
        ("favourite_prob", 1.5),
        ("drift_rate", -0.1),
        ("recall_prob", 0.9),  # recall_prob + favourite_prob > 1
        ("recall_min_gap", 0),
        ("label_noise", 0.5),
        ("mean_gap_seconds", 0.0),
        ("break_prob", 2.0),
        ("seed", -1),
        ("num_users", 2.5),
        ("num_users", True),
        ("drift_rate", float("nan")),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field} "):
        SyntheticConfig(**{field: value})
