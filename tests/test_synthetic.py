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


# -- presets ---------------------------------------------------------------------------------------------------------
def test_presets_fill_the_fields_left_at_their_defaults() -> None:
    from malloc.data.sources.synthetic import PRESETS

    assert SyntheticConfig(preset="default") == SyntheticConfig()
    cfg = SyntheticConfig(preset="long-range", num_users=7)
    assert cfg.num_users == 7  # set explicitly: kept
    assert (cfg.label_rule, cfg.interests_per_user, cfg.num_topics) == ("affinity", 32, 64)  # from the preset
    for name, values in PRESETS.items():
        resolved = SyntheticConfig(preset=name)
        assert all(getattr(resolved, key) == value for key, value in values.items()), name
        assert dataclasses.replace(resolved, num_users=5).preset == name  # replace keeps the resolved values
    with pytest.raises(ValueError, match=r"SyntheticConfig\.preset must be one of default, long-range"):
        SyntheticConfig(preset="medium")
    with pytest.raises(ValueError, match=r"SyntheticConfig\.label_rule must be one of"):
        SyntheticConfig(label_rule="likes")
    with pytest.raises(ValueError, match=r"SyntheticConfig\.topic_stickiness must be in \[0, 1\)"):
        SyntheticConfig(topic_stickiness=1.0)


def _coverage(cfg: SyntheticConfig, window: int) -> float:
    """Share of events whose label evidence lies within the last ``window`` events (among events past the first
    ``window``, so that every one has a full window behind it)."""
    from malloc.data.sources.synthetic import evidence_distance

    ds, truth = generate_with_truth(cfg)
    seqs = ds.sequences
    distance = evidence_distance(ds, truth, cfg)
    position = np.arange(seqs.num_events) - np.repeat(seqs.offsets[:-1], seqs.lengths)
    late = position >= 256
    return float(np.mean((distance[late] > 0) & (distance[late] <= window)))


def test_long_range_preset_plants_what_its_docstring_says() -> None:
    cfg = SyntheticConfig(preset="long-range", num_users=60, seed=1)
    ds, truth = generate_with_truth(cfg)
    seqs = ds.sequences
    user = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    topic = truth.item_topic[seqs.items]
    assert truth.likes is not None and not truth.is_recall.any()
    assert np.array_equal(truth.clean_labels, truth.likes[user, topic].astype(np.int8))  # affinity labels
    assert np.mean(seqs.labels != truth.clean_labels) == pytest.approx(0.05, abs=0.01)
    assert max(len(np.unique(topic[user == u])) for u in range(seqs.num_users)) == 32  # 32 interests each
    for window in (8, 32, 128):  # 1 - (31/32) ** w: 22%, 64%, 98%
        assert _coverage(cfg, window) == pytest.approx(1 - (31 / 32) ** window, abs=0.02)


def test_short_and_reconsume_presets() -> None:
    short = SyntheticConfig(preset="short", num_users=60, seed=1)
    assert _coverage(short, 1) == pytest.approx(0.75, abs=0.02)  # the previous event, 75% of the time
    assert _coverage(short, 256) - _coverage(short, 8) < 0.03  # older events add little
    reconsume = SyntheticConfig(preset="reconsume", num_users=60, seed=1)
    ds, truth = generate_with_truth(reconsume)
    assert np.array_equal(truth.clean_labels, truth.is_recall.astype(np.int8))  # positives are re-consumptions
    late = (np.arange(ds.sequences.num_events) - np.repeat(ds.sequences.offsets[:-1], ds.sequences.lengths)) >= 32
    assert truth.is_recall[late].mean() == pytest.approx(0.3, abs=0.02)
    assert _coverage(reconsume, 31) < 0.02  # no recall source within the last 31 events (only chance repeats)
