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
            negatives shared by the batch.
        threads: torch intra-op threads (0 = leave torch's default).
        max_train_users: 0 = all; else train on the first k users only (smoke runs).
        window: training window in events (0 = ``model.max_len``). A shorter window trains long-history models
            (serving writes up to ``model.max_len`` events) at the cost of ``window``-long attention; HSTU's
            normaliser stays ``model.max_len``, and relative distances beyond the window keep their initial bias.
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

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
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
        monitor: validation metric for early stopping ("auto": gauc for CTR, ndcg@10 for retrieval).
        hstu_normaliser: after eviction, "original" keeps HSTU's N (evicted events contribute 0) and "kept"
            scales the stored events' contributions by events seen / events stored (METHODS.md R3).
    """

    append_events: int = 1
    user_batch: int = 256
    prefill_chunk: int = 1024
    candidate_chunk: int = 256
    mask_history: bool = True
    ks: tuple[int, ...] = (10, 50, 200)
    monitor: str = "auto"
    hstu_normaliser: Literal["original", "kept"] = "original"

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

    @property
    def monitor(self) -> str:
        if self.eval.monitor != "auto":
            return self.eval.monitor
        return "gauc" if self.task == "ctr" else "ndcg@10"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then ``a.b=value`` overrides, validated."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))
