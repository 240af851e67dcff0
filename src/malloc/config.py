"""Typed run configuration: what YAML files under ``configs/`` and ``--set`` overrides are loaded into.

Precedence: dataclass defaults < YAML file < ``--set a.b=value`` overrides. Unknown keys and out-of-range values
are errors naming the dotted key (see :mod:`malloc.configio`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from malloc.configio import apply_overrides, from_dict, load_yaml
from malloc.data.sources.synthetic import SyntheticConfig
from malloc.device import check_device_name
from malloc.models.config import ModelConfig

MAX_LR = 1000.0  # Adam learning rates live far below; above, float32 optimiser states overflow
CTR_MONITORS = ("auc", "gauc", "logloss")
# eval.monitor "auto", per task (docs/CHOICES.md)
AUTO_MONITOR = {"ctr": "auc", "retrieval": "ndcg@10"}
MINIMISED = ("logloss",)


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is cut.

    Attributes:
        source: a name from ``malloc.data.sources.SOURCES`` (``ml-100k`` is embedded).
        path: file or directory for sources that are not embedded.
        min_events: users with fewer events are dropped (and counted in the log).
        label_threshold: MovieLens click label is ``rating >= label_threshold``.
        test_fraction: CTR, per user: the last ``ceil(test_fraction * n)`` events are test rows.
        valid_fraction: CTR, per user: the ``ceil(valid_fraction * n)`` events before those are validation rows.
        synthetic: generator settings, used when ``source == "synthetic"``.
    """

    source: str = "ml-100k"
    path: str | None = None
    min_events: int = 3
    label_threshold: float = 4.0
    test_fraction: float = 0.1
    valid_fraction: float = 0.1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.min_events < 3:
            raise ValueError(f"min_events must be >= 3 (train, valid and test need one event each), "
                             f"got {self.min_events}")
        for name in ("test_fraction", "valid_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation.

    Attributes:
        epochs: maximum epochs.
        batch_size: training windows per step.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        patience: stop after this many epochs without a better validation metric.
        seed: seeds model init, shuffling and dropout; a CPU run repeats exactly with the same thread count.
        negatives: retrieval loss: 0 = full softmax over the catalogue; k > 0 = sampled softmax with k uniform
            negatives (see ``negative_sampling``).
        negative_sampling: "shared": one draw of k negatives for every target of a batch; "per_target": a draw of
            its own for each target (as generative-recommenders samples).
        threads: torch intra-op threads (0 = leave torch's default).
        max_train_users: 0 = all; else train on the first k users only (smoke runs).
        window: training window in events (0 = ``model.max_len``). A shorter window trains long-history models
            (serving writes up to ``model.max_len`` events) at the cost of ``window``-long attention; HSTU's
            normaliser stays ``model.max_len``, and relative distances beyond the window keep their initial bias.
        prior_lr: learning rate of the CTR item prior (``model.item_prior``; no weight decay); 0 freezes it at its
            initial log-odds.
        blind_windows: CTR: the fraction of training windows whose events from a random cut on carry no label, as
            the blind protocol serves a scored window (the cut is uniform over the window's last
            ``blind_span``); 0 trains on labelled histories only.
        blind_span: the share of a window, at its end, in which the cut of a blind window falls, in (0, 1].
        temperature: retrieval: the softmax's logits are divided by it (with ``model.l2_norm``, cosines; GR uses
            0.05); ranking does not depend on it.
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3
    seed: int = 0
    negatives: int = 0
    threads: int = 0
    max_train_users: int = 0
    window: int = 0
    prior_lr: float = 1e-3
    blind_windows: float = 0.0
    blind_span: float = 0.25
    temperature: float = 1.0
    negative_sampling: Literal["shared", "per_target"] = "shared"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"lr must be in (0, {MAX_LR:g}], got {self.lr}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.prior_lr >= 0:
            raise ValueError(f"prior_lr must be >= 0, got {self.prior_lr}")
        if not 0.0 <= self.blind_windows <= 1.0:
            raise ValueError(f"blind_windows must be in [0, 1], got {self.blind_windows}")
        if not 0.0 < self.temperature <= 100.0:
            raise ValueError(f"temperature must be in (0, 100], got {self.temperature}")
        if not 0.0 < self.blind_span <= 1.0:
            raise ValueError(f"blind_span must be in (0, 1], got {self.blind_span}")
        for name in ("negatives", "threads", "max_train_users", "window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class EvalConfig:
    """The serving replay.

    Attributes:
        append_events: retrieval: events of the history sent as the request (appended to the written state).
        user_batch: users served together in one batched step.
        prefill_chunk: events per chunk when writing a history.
        candidate_chunk: candidates per micro-batch when scoring.
        mask_history: retrieval: remove items already in the history from the ranking.
        ks: retrieval cut-offs for HR@K and NDCG@K.
        monitor: validation metric for early stopping ("auto": auc for CTR, ndcg@10 for retrieval; AUC is the
            measured choice: GAUC on the small validation windows stops early, at low-AUC epochs; docs/CHOICES.md).
        hstu_normaliser: after eviction, "original" keeps HSTU's N (evicted events contribute 0) and "kept"
            scales the stored events' contributions by events seen / events stored (docs/DESIGN.md,
            "Eviction and HSTU's normaliser").
        protocol: CTR replay: "blind" appends a user's window of scored events without their labels (every row
            scored from the labels before the window; GAUC unbiased), "feedback" with them (each label known before
            the next row; GAUC biased by the window's own labels). See :mod:`malloc.eval.replay`.
    """

    append_events: int = 1
    user_batch: int = 256
    prefill_chunk: int = 1024
    candidate_chunk: int = 256
    mask_history: bool = True
    ks: tuple[int, ...] = (10, 50, 200)
    monitor: str = "auto"
    hstu_normaliser: Literal["original", "kept"] = "original"
    protocol: Literal["blind", "feedback"] = "blind"

    def __post_init__(self) -> None:
        for name in ("append_events", "user_batch", "prefill_chunk", "candidate_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {self.ks}")


@dataclass(frozen=True)
class RunConfig:
    """One training + evaluation run.

    Attributes:
        name: run name; results go to ``<results_dir>/<name>-<config hash>/``.
        task: "ctr" (AUC, GAUC, Logloss) or "retrieval" (HR@K, NDCG@K, MRR over the full catalogue).
        results_dir: root folder of results.
        device: "cpu", "cuda", "cuda:N" or "auto" (see :mod:`malloc.device`); not part of the run's hash.
    """

    name: str = "run"
    task: Literal["ctr", "retrieval"] = "ctr"
    results_dir: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.task == "retrieval" and self.model.max_len < 2:
            raise ValueError("retrieval needs model.max_len >= 2 (a training window holds an input and its target)")
        if self.eval.monitor != "auto" and self.eval.monitor not in self.monitors():
            raise ValueError(f"eval.monitor {self.eval.monitor!r} is not a {self.task} metric; one of "
                             f"{', '.join(['auto', *self.monitors()])}")

    def monitors(self) -> tuple[str, ...]:
        """The validation metrics early stopping can follow for this task."""
        if self.task == "ctr":
            return CTR_MONITORS
        return (*(f"{m}@{k}" for m in ("ndcg", "hr") for k in self.eval.ks), "mrr")

    @property
    def monitor(self) -> str:
        return self.eval.monitor if self.eval.monitor != "auto" else AUTO_MONITOR[self.task]

    @property
    def monitor_sign(self) -> float:
        """+1 where a larger monitored metric is better, -1 where smaller is (logloss)."""
        return -1.0 if self.monitor in MINIMISED else 1.0


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then ``a.b=value`` overrides, validated."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))
