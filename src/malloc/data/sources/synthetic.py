"""Synthetic long-history data with a planted, learnable signal that rewards remembering the whole history.

What is planted (everything drawn from one ``numpy.random.default_rng(seed)``, so fully deterministic):

* **Topics.** Items ``1..num_items`` are split into ``num_topics`` topics of (almost) equal size by a random
  permutation. Within a topic, popularity is Zipf: the topic's ``r``-th item (in ascending id order) has
  weight ``r ** -zipf_exponent``.
* **Users.** ``num_users`` users; user ``u`` has ``lengths[u]`` events, drawn log-uniformly in
  ``[min_len, max_len]``. Each user has ``favourite_topics`` distinct **long-term favourite** topics (fixed
  for the whole history) and an **active interest set** of ``interests_per_user`` distinct topics, which
  drifts: before each event after the first, with probability ``drift_rate`` one slot (uniform) is replaced
  by a uniformly drawn topic.
* **Events.** Event ``t`` of a user is, with ``r ~ U[0, 1)``:
  a **recall** if ``r < recall_prob`` and ``t >= recall_min_gap``: it re-consumes the item of an earlier
  event ``j`` drawn uniformly in ``0 .. t - recall_min_gap`` (so the item occurred at least
  ``recall_min_gap`` events earlier); a **favourite** event if ``recall_prob <= r < recall_prob +
  favourite_prob``: a Zipf item of one of the favourite topics (uniform); otherwise (including a recall
  draw too early in the history to recall) an **active** event: a Zipf item of one of the current active
  topics (uniform slot).
* **Sticky topics** (``topic_stickiness``, 0 by default). Before the item is drawn, an event after the first
  repeats the previous event's topic with probability ``topic_stickiness`` (bursts of mean length
  ``1 / (1 - topic_stickiness)``); otherwise its topic is drawn as above.
* **Labels** (``label_rule``). ``"favourites"`` (default): ``1`` if the item's topic is a favourite topic of the
  user, or the event is a recall; else 0. So a CTR model that knows the user's favourites (spread over the
  whole history) and which items the user consumed long ago predicts the labels; the recent, drifting
  interests alone do not. ``"affinity"``: every user likes each topic independently with probability
  ``like_prob`` (fixed for the whole history); ``1`` if the user likes the item's topic, or the event is a
  recall. The evidence for a row is then the label of the user's last event of the same topic, however far
  back. ``"recall"``: ``1`` iff the event is a recall. Each label is then flipped with probability
  ``label_noise``.
* **Timestamps.** Int64 seconds; a user starts at ``1_600_000_000`` plus up to 30 days; each later event
  follows after ``1 + Exponential(mean_gap_seconds)`` seconds (floored), plus, with probability
  ``break_prob``, a break of 1 to 14 days (uniform). Timestamps strictly increase within a user.

**Presets** (``preset``; :data:`PRESETS`) are named settings whose long-range dependence is known by
construction; a preset sets every field left at its class default (so a field set explicitly to its class default
takes the preset's value). The evidence a truncated memory loses is computed exactly by :func:`evidence_within`.

* ``default``: the settings above (favourite topics, drifting interests, recalls at least 256 events back).
* ``long-range``: *interests that recur long after*. Each user has 32 interest topics (of 64; 4 items each,
  Zipf within the topic), fixed, and every event draws one uniformly, so a topic comes back after 32 events on
  average (geometric, a tail of hundreds); labels follow the user's fixed like or dislike of the topic
  (``affinity``). The last event of the same topic lies within the most recent ``w`` events with probability
  ``1 - (31/32) ** w``: 22% for ``w = 8``, 64% for ``w = 32``, 98% for ``w = 128``. No favourites, no recalls,
  no drift; 5% label noise; histories of 128 to 512 events.
* ``reconsume``: *re-consumption of items seen long ago*. 30% of events (from the 32nd on) re-consume an item the
  user consumed at least 32 events earlier (uniform over the earlier events), and only those are positives
  (``recall``); fresh items come from 100,000 items without popularity skew, so a fresh item repeats an earlier
  one only rarely. A memory of the last ``n / 16`` events (at most 32 for histories of up to 512) never holds
  the source of a recall.
* ``short``: *recent events carry almost all the signal*. Topics come in bursts (stickiness 0.75, mean length
  4) drawn uniformly from 1,024 topics of one item each, labels follow the user's like or dislike of the topic
  (``affinity``): the previous event, one step back, is the evidence for 75% of the events; a burst's first
  event needs the last burst of the same topic, which a history of at most 128 bursts rarely holds (about 12%
  of the burst starts at 512 events). 5% label noise; histories of 128 to 512 events.

:func:`generate_with_truth` also returns what was planted (:class:`SyntheticTruth`), for tests and analysis.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np

from malloc.data.sequences import Dataset, Sequences

_DAY = 86_400
_START_TIME = 1_600_000_000
LABEL_RULES = ("favourites", "affinity", "recall")
_SHARED_PRESET = {"favourite_prob": 0.0, "recall_prob": 0.0, "drift_rate": 0.0, "label_noise": 0.05,
                  "min_len": 128, "max_len": 512}
# Named settings (see the module docstring); each sets the fields left at their class defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "long-range": {**_SHARED_PRESET, "label_rule": "affinity", "num_items": 256, "num_topics": 64,
                   "interests_per_user": 32},
    "reconsume": {**_SHARED_PRESET, "label_rule": "recall", "num_items": 100_000, "zipf_exponent": 0.0,
                  "recall_prob": 0.3, "recall_min_gap": 32},
    "short": {**_SHARED_PRESET, "label_rule": "affinity", "num_items": 1024, "num_topics": 1024,
              "interests_per_user": 1024, "topic_stickiness": 0.75},
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic source (see the module docstring for what each one plants).

    Attributes:
        num_users: number of users (>= 1).
        num_items: item vocabulary size (>= num_topics).
        min_len, max_len: bounds of the log-uniform history length (1 <= min_len <= max_len).
        num_topics: number of item topics (>= 1).
        zipf_exponent: popularity exponent within a topic (>= 0; 0 is uniform).
        interests_per_user: size of the drifting active interest set (1 .. num_topics).
        favourite_topics: number of fixed long-term favourite topics (1 .. num_topics).
        favourite_prob: probability that an event comes from a favourite topic.
        drift_rate: per-event probability of swapping one active interest ([0, 1]).
        recall_prob: per-event probability of re-consuming an old item (recall_prob + favourite_prob <= 1).
        recall_min_gap: a recalled item occurred at least this many events earlier (>= 1).
        label_noise: probability of flipping each label ([0, 0.5)).
        mean_gap_seconds: mean of the exponential time gap between events (> 0).
        break_prob: per-event probability of a 1-14 day break ([0, 1]).
        seed: seed of the random generator (>= 0).
        topic_stickiness: per-event probability of repeating the previous event's topic ([0, 1)).
        label_rule: "favourites", "affinity" or "recall" (module docstring).
        like_prob: affinity rule: probability that a user likes a topic ([0, 1]).
        preset: a name from :data:`PRESETS`; it sets the fields left at their class defaults.
    """

    num_users: int = 1000
    num_items: int = 5000
    min_len: int = 64
    max_len: int = 512
    num_topics: int = 32
    zipf_exponent: float = 1.1
    interests_per_user: int = 3
    favourite_topics: int = 2
    favourite_prob: float = 0.15
    drift_rate: float = 0.01
    recall_prob: float = 0.1
    recall_min_gap: int = 256
    label_noise: float = 0.1
    mean_gap_seconds: float = 3600.0
    break_prob: float = 0.01
    seed: int = 0
    topic_stickiness: float = 0.0
    label_rule: str = "favourites"
    like_prob: float = 0.5
    preset: str = "default"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"SyntheticConfig.preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name, value in PRESETS[self.preset].items():
            default = next(f.default for f in fields(self) if f.name == name)
            assert default is not MISSING
            if getattr(self, name) == default:
                object.__setattr__(self, name, value)
        if self.label_rule not in LABEL_RULES:
            raise ValueError(f"SyntheticConfig.label_rule must be one of {', '.join(LABEL_RULES)}, "
                             f"got {self.label_rule!r}")
        for f in fields(self):
            if f.name in ("label_rule", "preset"):
                continue
            value = getattr(self, f.name)
            integral = f.type in ("int", int)
            kind = numbers.Integral if integral else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"SyntheticConfig.{f.name} must be {'an int' if integral else 'a number'}, "
                                 f"got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"SyntheticConfig.{f.name} must be finite, got {value!r}")
        self._check("num_users", self.num_users >= 1, ">= 1")
        self._check("num_topics", self.num_topics >= 1, ">= 1")
        self._check("num_items", self.num_items >= self.num_topics, f">= num_topics ({self.num_topics})")
        self._check("min_len", self.min_len >= 1, ">= 1")
        self._check("max_len", self.max_len >= self.min_len, f">= min_len ({self.min_len})")
        self._check("zipf_exponent", self.zipf_exponent >= 0, ">= 0")
        self._check("interests_per_user", 1 <= self.interests_per_user <= self.num_topics, "in 1..num_topics")
        self._check("favourite_topics", 1 <= self.favourite_topics <= self.num_topics, "in 1..num_topics")
        self._check("favourite_prob", 0 <= self.favourite_prob <= 1, "in [0, 1]")
        self._check("drift_rate", 0 <= self.drift_rate <= 1, "in [0, 1]")
        recall_ok = 0 <= self.recall_prob <= 1 - self.favourite_prob
        self._check("recall_prob", recall_ok, "in [0, 1 - favourite_prob]")
        self._check("recall_min_gap", self.recall_min_gap >= 1, ">= 1")
        self._check("label_noise", 0 <= self.label_noise < 0.5, "in [0, 0.5)")
        self._check("mean_gap_seconds", self.mean_gap_seconds > 0, "> 0")
        # timestamps are int64 seconds: a user's span (events x mean gap) must stay far inside them
        self._check("mean_gap_seconds", self.mean_gap_seconds * self.max_len <= 1e15,
                    f"at most {1e15 / self.max_len:.3g} (max_len x mean gap must fit int64 timestamps)")
        self._check("break_prob", 0 <= self.break_prob <= 1, "in [0, 1]")
        self._check("seed", self.seed >= 0, ">= 0")
        self._check("topic_stickiness", 0 <= self.topic_stickiness < 1, "in [0, 1)")
        self._check("like_prob", 0 <= self.like_prob <= 1, "in [0, 1]")

    def _check(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"SyntheticConfig.{name} must be {expected}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SyntheticTruth:
    """What :func:`generate_with_truth` planted, aligned with the returned :class:`Sequences`.

    Attributes:
        item_topic: ``(num_items + 1,)`` int64 topic of each item (entry 0, padding, is -1).
        favourites: ``(U, favourite_topics)`` int64 long-term favourite topics of each user.
        is_recall: ``(E,)`` bool, the event re-consumes an earlier item.
        recall_source: ``(E,)`` int64 flat index of the event a recall copies (``-1`` otherwise); it belongs
            to the same user and lies at least ``recall_min_gap`` events earlier.
        clean_labels: ``(E,)`` int8 labels before the noise flips.
        likes: ``(U, num_topics)`` bool topics each user likes (affinity rule), else None.
    """

    item_topic: np.ndarray
    favourites: np.ndarray
    is_recall: np.ndarray
    recall_source: np.ndarray
    clean_labels: np.ndarray
    likes: np.ndarray | None = None


def generate(cfg: SyntheticConfig) -> Dataset:
    """Generate the synthetic data set (no CTR rows of its own; task views build them from the labels)."""
    return generate_with_truth(cfg)[0]


def generate_with_truth(cfg: SyntheticConfig) -> tuple[Dataset, SyntheticTruth]:
    """Generate the data set and return what was planted (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    lengths = _history_lengths(rng, cfg)
    offsets = np.zeros(cfg.num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    user = np.repeat(np.arange(cfg.num_users), lengths)  # (E,)
    position = np.arange(int(offsets[-1]), dtype=np.int64) - offsets[user]  # (E,) index within the user

    item_topic, topic_items, topic_cdf, topic_start = _topics(rng, cfg)
    favourites = _distinct_topics(rng, cfg.num_users, cfg.favourite_topics, cfg.num_topics)
    initial_active = _distinct_topics(rng, cfg.num_users, cfg.interests_per_user, cfg.num_topics)

    draw = rng.random(len(user))
    is_recall = (draw < cfg.recall_prob) & (position >= cfg.recall_min_gap)
    is_favourite = ~is_recall & (draw >= cfg.recall_prob) & (draw < cfg.recall_prob + cfg.favourite_prob)
    favourite_pick = favourites[user, rng.integers(0, cfg.favourite_topics, len(user))]
    topic = np.where(is_favourite, favourite_pick, _active_topics(rng, cfg, user, position, initial_active))
    if cfg.topic_stickiness > 0:  # drawn only when used, so the default stream stays as it was
        stay = (rng.random(len(user)) < cfg.topic_stickiness) & (position > 0)
        topic = topic[_resolve_copies(np.where(stay, np.arange(len(user)) - 1, -1))]
    fresh_item = _zipf_items(rng, topic, topic_items, topic_cdf, topic_start)

    recall_source = np.full(len(user), -1, dtype=np.int64)
    recall_source[is_recall] = offsets[user[is_recall]] + np.floor(
        rng.random(int(is_recall.sum())) * (position[is_recall] - cfg.recall_min_gap + 1)
    ).astype(np.int64)
    items = fresh_item[_resolve_copies(recall_source)]

    likes = None
    if cfg.label_rule == "favourites":
        positive = (favourites[user] == item_topic[items][:, None]).any(axis=1)
    elif cfg.label_rule == "affinity":
        likes = rng.random((cfg.num_users, cfg.num_topics)) < cfg.like_prob
        positive = likes[user, item_topic[items]]
    else:
        positive = np.zeros(len(user), dtype=bool)
    clean = (positive | is_recall).astype(np.int8)
    labels = clean ^ (rng.random(len(user)) < cfg.label_noise).astype(np.int8)
    timestamps = _timestamps(rng, cfg, offsets, user, position)

    sequences = Sequences(
        name="synthetic",
        offsets=offsets,
        items=items,
        timestamps=timestamps,
        labels=labels,
        num_items=cfg.num_items,
        user_ids=np.arange(cfg.num_users, dtype=np.int64),
        item_ids=np.arange(cfg.num_items + 1, dtype=np.int64),
    )
    truth = SyntheticTruth(item_topic, favourites, is_recall, recall_source, clean, likes)
    return Dataset(sequences), truth


def _history_lengths(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """``(U,)`` int64 log-uniform in ``[min_len, max_len]``."""
    log_len = rng.uniform(math.log(cfg.min_len), math.log(cfg.max_len + 1), cfg.num_users)
    return np.clip(np.floor(np.exp(log_len)), cfg.min_len, cfg.max_len).astype(np.int64)


def _topics(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, ...]:
    """Item topics and per-topic Zipf tables.

    Returns:
        item_topic: ``(num_items + 1,)`` int64, -1 for padding.
        topic_items: ``(num_items,)`` int64 items grouped by topic, ascending id within a topic.
        topic_cdf: ``(num_items,)`` float64, topic ``k``'s cumulative Zipf weights offset by ``k``
            (so one ``searchsorted`` serves every topic).
        topic_start: ``(num_topics + 1,)`` int64 start of each topic in ``topic_items``.
    """
    item_topic = np.full(cfg.num_items + 1, -1, dtype=np.int64)
    item_topic[1:] = rng.permutation(np.arange(cfg.num_items) % cfg.num_topics)
    topic_items = np.argsort(item_topic[1:], kind="stable").astype(np.int64) + 1
    sizes = np.bincount(item_topic[1:], minlength=cfg.num_topics)
    topic_start = np.zeros(cfg.num_topics + 1, dtype=np.int64)
    np.cumsum(sizes, out=topic_start[1:])
    rank = np.arange(cfg.num_items) - np.repeat(topic_start[:-1], sizes) + 1  # 1-based rank within topic
    weight = rank.astype(np.float64) ** -cfg.zipf_exponent
    topic_of_slot = np.repeat(np.arange(cfg.num_topics), sizes)
    cumulative = np.cumsum(weight)
    before = np.concatenate([[0.0], cumulative[topic_start[1:-1] - 1]])  # mass of earlier topics
    total = cumulative[topic_start[1:] - 1] - before
    topic_cdf = (cumulative - before[topic_of_slot]) / total[topic_of_slot]
    topic_cdf[topic_start[1:] - 1] = 1.0  # exact end of every topic, despite rounding
    return item_topic, topic_items, topic_cdf + topic_of_slot, topic_start


def _distinct_topics(rng: np.random.Generator, num_users: int, k: int, num_topics: int) -> np.ndarray:
    """``(num_users, k)`` int64, ``k`` distinct uniform topics per user."""
    return np.argsort(rng.random((num_users, num_topics)), axis=1)[:, :k].astype(np.int64)


def _active_topics(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    user: np.ndarray,
    position: np.ndarray,
    initial: np.ndarray,
) -> np.ndarray:
    """``(E,)`` topic of a uniformly chosen slot of each event's current (drifting) active interest set."""
    num_events = len(user)
    swap = (rng.random(num_events) < cfg.drift_rate) & (position > 0)
    swap_slot = rng.integers(0, cfg.interests_per_user, num_events)
    swap_topic = rng.integers(0, cfg.num_topics, num_events)
    chosen_slot = rng.integers(0, cfg.interests_per_user, num_events)
    first = position == 0
    event_index = np.arange(num_events)
    topic = np.empty(num_events, dtype=np.int64)
    for slot in range(cfg.interests_per_user):
        # Forward-fill: the slot's topic at event e was set by its last swap at or before e (or at start).
        set_here = first | (swap & (swap_slot == slot))
        value = np.where(first, initial[user, slot], swap_topic)
        last_set = np.maximum.accumulate(np.where(set_here, event_index, 0))
        in_slot = chosen_slot == slot
        topic[in_slot] = value[last_set[in_slot]]
    return topic


def _zipf_items(
    rng: np.random.Generator,
    topic: np.ndarray,
    topic_items: np.ndarray,
    topic_cdf: np.ndarray,
    topic_start: np.ndarray,
) -> np.ndarray:
    """``(E,)`` an item of each event's topic, Zipf-distributed within the topic (inverse CDF)."""
    slot = np.searchsorted(topic_cdf, topic + rng.random(len(topic)), side="right")
    slot = np.clip(slot, topic_start[topic], topic_start[topic + 1] - 1)
    return topic_items[slot]


def _resolve_copies(source: np.ndarray) -> np.ndarray:
    """``(E,)`` the original (non-recall) event each event's item comes from, following chains of recalls.

    ``source[e]`` is ``-1`` for a fresh event, else an earlier index; pointer jumping takes O(log E) rounds.
    """
    origin = np.where(source < 0, np.arange(len(source)), source)
    while True:
        hop = origin[origin]
        if np.array_equal(hop, origin):
            return origin
        origin = hop


def _timestamps(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    offsets: np.ndarray,
    user: np.ndarray,
    position: np.ndarray,
) -> np.ndarray:
    """``(E,)`` int64 seconds, strictly increasing within each user."""
    num_events = len(user)
    gap = 1 + np.floor(rng.exponential(cfg.mean_gap_seconds, num_events)).astype(np.int64)
    breaks = rng.random(num_events) < cfg.break_prob
    gap[breaks] += rng.integers(_DAY, 14 * _DAY + 1, int(breaks.sum()))
    gap[position == 0] = 0
    elapsed = np.cumsum(gap)
    elapsed -= elapsed[offsets[:-1]][user]  # per-user running time since the user's first event
    start = _START_TIME + rng.integers(0, 30 * _DAY, cfg.num_users)
    return start[user] + elapsed


def evidence_distance(ds: Dataset, truth: SyntheticTruth, cfg: SyntheticConfig) -> np.ndarray:
    """``(E,)`` int64 events back to the evidence for each event's label, ``-1`` where the history holds none.

    The evidence is the user's most recent earlier event of the same topic (labels ``favourites`` and
    ``affinity``: its label reveals whether the user likes the topic) or of the same item (``recall``: a
    re-consumption). A memory of the last ``w`` events holds the evidence of an event iff ``0 < distance <= w``.
    """
    seqs = ds.sequences
    user = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    position = np.arange(seqs.num_events, dtype=np.int64) - seqs.offsets[user]
    key = seqs.items if cfg.label_rule == "recall" else truth.item_topic[seqs.items]
    order = np.lexsort((position, key, user))
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (user[order][1:] == user[order][:-1]) & (key[order][1:] == key[order][:-1])
    distance = np.full(len(order), -1, dtype=np.int64)
    gaps = np.diff(position[order])
    distance[order[1:][same[1:]]] = gaps[same[1:]]
    return distance
