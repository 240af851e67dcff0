"""The memory-sensitivity curve: how much of a data set's accuracy needs long-range memory.

Native is trained once (:func:`malloc.runner.run`; an existing run is reused), then its test split is served
through the serving path (:func:`malloc.eval.evaluate.replay`) again and again with each user's *written* history
truncated to its most recent events: a fraction of it (1/2, 1/4, ..., 1/64) or a fixed length (8, 16, 32, ...
events). The appended events and the scored candidates stay as they are, so only the stored memory shrinks, as
under a compression scheme that keeps the most recent events (StreamingLLM without sinks). The history mask of
retrieval still covers every earlier event (a fleet filters consumed items from its log, not from the model).

"The written history" is what Native would write: the ``model.max_len`` events before the first scored row
(CTR) or before the request (retrieval). A fraction ``1/k`` keeps ``ceil(n / k)`` of its ``n`` events (at least
one); a length ``m`` keeps ``min(n, m)``.

Next to the curve, the anchors that use no sequence model at all (:mod:`malloc.eval.anchors`), on the same rows
and under the same CTR protocol: CTR ``item-mean``, ``item-mean+user-rate`` and ``mf`` (logistic matrix
factorisation); retrieval ``popular`` and ``mf`` (softmax matrix factorisation over the catalogue).

Standard errors come from a per-user bootstrap: :data:`BOOTSTRAP` resamples of the served users with
replacement (seeded), the same resamples for every point, so that the delta of a point to ``full`` gets a
paired standard error. CTR metrics: GAUC, AUC, Logloss; retrieval: HR@10, NDCG@10, MRR.

Results go to ``<run>/sensitivity/<split>.json`` (and ``.md``, a table, and ``.png``, the plot), written
atomically, next to the run's other results; an identical call is skipped unless forced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malloc.config import RunConfig
from malloc.configio import ConfigError, to_dict
from malloc.data.tasks import CTRView
from malloc.eval.anchors import ANCHORS_VERSION, ctr_anchor_logits, retrieval_anchor_ranks
from malloc.eval.statistics import (
    RETRIEVAL_K,
    UserScores,
    bootstrap_counts,
    bootstrapped,
    ctr_user_scores,
    metrics_with_counts,
    paired_comparison,
)
from malloc.results import atomic_file, atomic_write_text, cached

log = logging.getLogger("malloc.sensitivity")

TASKS = ("ctr", "retrieval")
FRACTIONS: tuple[int, ...] = (2, 4, 8, 16, 32, 64)  # keep 1/k of the written history
MIN_LENGTH = 8  # fixed lengths 8, 16, 32, ... below model.max_len
BOOTSTRAP = 200
MAX_BOOTSTRAP = 10_000  # a (resamples x users) count matrix is held in memory
PRIMARY = {"ctr": "gauc", "retrieval": f"ndcg@{RETRIEVAL_K}"}
SECONDARY = {"ctr": "auc", "retrieval": f"hr@{RETRIEVAL_K}"}


@dataclass(frozen=True)
class Truncation:
    """One point of the curve: keep the most recent ``1 / fraction`` of the written history, or ``length`` events
    (exactly one of the two; neither: the full history)."""

    fraction: int | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and self.length is not None:
            raise ValueError("a truncation keeps a fraction or a length, not both")
        for name in ("fraction", "length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def label(self) -> str:
        if self.fraction is not None:
            return f"1/{self.fraction}"
        return f"last {self.length}" if self.length is not None else "full"

    def keep_last(self, written: np.ndarray) -> np.ndarray:
        """``(B,)`` events kept of ``(B,)`` written history lengths."""
        written = np.asarray(written, dtype=np.int64)
        if self.fraction is not None:
            return np.minimum(written, np.maximum(1, -(-written // self.fraction)))
        if self.length is not None:
            return np.minimum(written, self.length)
        return written


def default_truncations(max_len: int, fractions: Sequence[int] = FRACTIONS) -> list[Truncation]:
    """``full``, ``1/k`` for each k of ``fractions``, and lengths 8, 16, ... below ``max_len``."""
    points = [Truncation()] + [Truncation(fraction=k) for k in fractions]
    length = MIN_LENGTH
    while length < max_len:
        points.append(Truncation(length=length))
        length *= 2
    return points


# -- the curve -------------------------------------------------------------------------------------------------------
def parse_dataset(name: str) -> tuple[str, str | None]:
    """``"ml-100k"`` -> ``("ml-100k", None)``; ``"synthetic:long-range"`` -> ``("synthetic", "long-range")``.

    Raises:
        DataError: an unknown source or preset (the message lists the known ones).
    """
    from malloc.data.sequences import DataError
    from malloc.data.sources import SOURCES
    from malloc.data.sources.synthetic import PRESETS

    source, colon, preset = name.partition(":")
    if colon and not preset:
        raise DataError(f"data set {name!r} names no preset after the colon; presets: {', '.join(PRESETS)}")
    if source not in SOURCES:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(SOURCES)}, or synthetic:<preset> with a "
                        f"preset from {', '.join(PRESETS)}")
    if preset and (source != "synthetic" or preset not in PRESETS):
        raise DataError(f"unknown data set {name!r}: only synthetic takes a preset, one of {', '.join(PRESETS)}")
    return source, preset or None


def sensitivity_config(dataset: str, task: str, *, path: str | None = None, config: str | None = None,
                       overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of ``malloc sensitivity``: the config file (default: the built-in defaults) with the data
    set, path and task set; named ``<data set>-<backbone>-<task>`` unless an override names it, or the file does
    and its data set is the one asked for.

    Raises:
        DataError: unknown data set; ConfigError: unknown task or a bad override.
    """
    from dataclasses import replace

    from malloc.config import load_config

    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    source, preset = parse_dataset(dataset)
    given = {"task": "--task", "data.source": "the data set argument", "data.path": "--path",
             "data.synthetic.preset": "the data set argument (synthetic:<preset>)"}
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in given:
            raise ConfigError(f"--set {key}=... conflicts with {given[key]} of malloc sensitivity: use that instead")
    extra = [f"task={task}", f"data.source={source}"]
    if path is not None:
        extra.append(f"data.path={path}")
    if preset is not None:
        extra.append(f"data.synthetic.preset={preset}")
    try:
        cfg = load_config(config, [*overrides, *extra])
    except ConfigError as exc:
        if preset is None or "data.synthetic" not in str(exc):
            raise
        raise ConfigError(f"preset {preset!r} does not fit the config's data.synthetic settings ({exc})") from exc
    named = any(o.strip().startswith("name=") for o in overrides)
    if not named and (config is None or load_config(config).data.source != source):
        # a file's name is kept only for its own data set (configs/bench/hstu-ctr.yaml names ml100k runs)
        cfg = replace(cfg, name=f"{dataset.replace(':', '-')}-{cfg.model.backbone}-{task}")
    return cfg


def sensitivity_path(run_root: str | Path, split: str = "test") -> Path:
    return Path(run_root) / "sensitivity" / f"{split}.json"


def _identity(cfg: RunConfig, split: str, points: Sequence[Truncation], resamples: int, seed: int) -> dict[str, Any]:
    return {"split": split, "points": [p.label for p in points], "bootstrap": resamples, "seed": seed,
            "anchors": ANCHORS_VERSION, "eval": to_dict(cfg.eval), "max_len": cfg.model.max_len}


def sensitivity(cfg: RunConfig, *, split: str = "test", points: Sequence[Truncation] | None = None,
                resamples: int = BOOTSTRAP, seed: int = 0, force: bool = False, show_progress: bool = True
                ) -> dict[str, Any]:
    """Train Native once (or reuse the run), serve ``split`` at every truncation, and compare with the anchors.

    Returns (and writes, see the module docstring) ``{"dataset", "task", "run_id", "split", "identity",
    "primary", "secondary", "points": [...], "anchors": [...], "written_mean", "users"}``; each point and anchor
    holds ``label``, ``kind``, ``kept_mean`` (events written per user, mean), ``metrics``, ``se`` and (points)
    ``delta`` and ``delta_se`` to ``full``.

    Raises:
        ConfigError: an unknown task or split, or fewer than 2 bootstrap resamples.
    """
    from malloc.eval.evaluate import replay
    from malloc.runner import build_view, load_model, run, run_dir_for

    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if split not in ("valid", "test"):
        raise ConfigError(f"split must be 'valid' or 'test', got {split!r}")
    if not 2 <= resamples <= MAX_BOOTSTRAP:
        raise ConfigError(f"bootstrap resamples must be in 2..{MAX_BOOTSTRAP:,}, got {resamples}")
    if seed < 0:
        raise ConfigError(f"the bootstrap seed must be >= 0, got {seed}")
    points = list(points) if points is not None else default_truncations(cfg.model.max_len)
    identity = _identity(cfg, split, points, resamples, seed)
    view = build_view(cfg)  # a bad data set fails here, before the run writes anything
    trained = run(cfg, show_progress=show_progress)
    run_dir = run_dir_for(cfg)
    path = sensitivity_path(run_dir.root, split)

    def compute() -> dict[str, Any]:
        model = load_model(cfg, view.sequences.num_items, run_dir.checkpoint_path)
        per_point: list[tuple[Truncation, UserScores]] = []
        for point in points:
            result = replay(cfg, model, view, split, keep_last=None if point == Truncation() else point.keep_last)
            if isinstance(view, CTRView):
                rows = view.split(split)
                scores = ctr_user_scores(rows.user, rows.label, result.logits)
            else:
                scores = UserScores("retrieval", ranks=result.ranks)
            per_point.append((point, scores))
            log.info("%s %s: %s %.4f", run_dir.run_id, point.label, PRIMARY[cfg.task],
                     metrics_with_counts(scores, np.ones(scores.num_users))[PRIMARY[cfg.task]])

        if isinstance(view, CTRView):
            rows = view.split(split)
            anchors = [(name, ctr_user_scores(rows.user, rows.label, logits)) for name, logits
                       in ctr_anchor_logits(view, split, cfg.eval.protocol, cfg.train.seed).items()]
            written = _written_lengths(rows.user, rows.history_len, cfg.model.max_len)
        else:
            anchors = [(name, UserScores("retrieval", ranks=ranks)) for name, ranks
                       in retrieval_anchor_ranks(view, split, cfg.eval.mask_history, cfg.train.seed).items()]
            stop = view.target_index(split)
            written = np.minimum(np.maximum(0, stop - cfg.eval.append_events), cfg.model.max_len)
        num_users = per_point[0][1].num_users
        counts = bootstrap_counts(num_users, resamples, seed)
        full = bootstrapped(per_point[0][1], counts)

        out_points = []
        for point, scores in per_point:
            kept = point.keep_last(written)
            out_points.append({
                "label": point.label, "kind": "length" if point.length else "fraction" if point.fraction else "full",
                "fraction": None if point.fraction is None else 1.0 / point.fraction, "length": point.length,
                "kept_mean": float(kept.mean()) if len(kept) else 0.0,
                **paired_comparison(bootstrapped(scores, counts), full),
            })
        out_anchors = [{"label": name, "kind": "anchor", "kept_mean": 0.0,
                        **paired_comparison(bootstrapped(scores, counts), full)} for name, scores in anchors]
        result = {
            "dataset": cfg.data.source if cfg.data.source != "synthetic" else f"synthetic:{cfg.data.synthetic.preset}",
            "task": cfg.task, "backbone": cfg.model.backbone, "run_id": run_dir.run_id, "split": split,
            "identity": identity, "primary": PRIMARY[cfg.task], "secondary": SECONDARY[cfg.task],
            "users": num_users, "written_mean": float(written.mean()) if len(written) else 0.0,
            "written_p50": float(np.median(written)) if len(written) else 0.0,
            "native_test_metrics": trained["metrics"], "points": out_points, "anchors": out_anchors,
        }
        return result

    result = cached(path, compute, lambda done: done.get("identity") == identity and isinstance(done.get("points"),
                                                                                           list), force=force)
    write_figures(result, path)
    return result


def _written_lengths(users: np.ndarray, history_len: np.ndarray, max_len: int) -> np.ndarray:
    """``(U,)`` CTR: events written before each user's first scored row (users in ascending id order)."""
    order = np.lexsort((history_len, users))
    first = np.unique(users[order], return_index=True)[1]
    return np.minimum(history_len[order][first], max_len)


# -- calibration of the synthetic presets ---------------------------------------------------------------------------
def calibration_config(preset: str, seed: int = 0, results_dir: str = "results", epochs: int | None = None
                       ) -> RunConfig:
    """The small, seeded CTR run behind the preset calibration (``tests/test_sensitivity.py``,
    ``experiments/calibrate_presets.py``): a 1-layer HSTU (D = 32) trained with batches of 4 windows.

    Sizes are shrunk so that it trains quickly on a CPU; every topic has one item. ``long-range``: 64 users of 128
    events, 16 topics, all of them every user's interests (a topic recurs after 16 events on average, so the last
    8 events, 1/16 of 128, hold the evidence for ``1 - (15/16) ** 8 = 40%`` of the rows, the full history for
    all). ``short``: the same users and lengths, 512 topics in bursts (stickiness 0.75; mean length 4), so the
    previous event is the evidence for 75% of the rows; it learns what it can in fewer epochs (``epochs=5``).
    Validation (early stopping only) uses the last 2% of each user's events before the 10% of test rows.
    """
    from malloc.config import load_config

    sizes = {"long-range": (16, 64, 128), "short": (512, 64, 128)}  # topics, users, events per user
    if preset not in sizes:
        raise ConfigError(f"calibrated presets: {', '.join(sizes)}; got {preset!r}")
    topics, users, length = sizes[preset]
    epochs = epochs if epochs is not None else {"long-range": 8, "short": 5}[preset]
    overrides = [
        "task=ctr", "data.source=synthetic", f"data.synthetic.preset={preset}", f"data.synthetic.seed={seed}",
        f"data.synthetic.num_users={users}", f"data.synthetic.min_len={length}", f"data.synthetic.max_len={length}",
        f"data.synthetic.num_topics={topics}", f"data.synthetic.num_items={topics}",
        f"data.synthetic.interests_per_user={topics}", "data.valid_fraction=0.02",
        "model.dim=32", "model.layers=1", "model.heads=4", "model.head_dim=8", "model.dropout=0.0",
        f"model.max_len={length}", f"train.epochs={epochs}", f"train.patience={epochs}", "train.batch_size=4",
        "train.lr=0.01", f"train.seed={seed}", "eval.user_batch=128", f"results_dir={results_dir}",
        f"name=calibration-{preset}",
    ]
    return load_config(None, overrides)


# -- outputs ---------------------------------------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per point and anchor, metrics with their standard errors; the delta to the full
    history (an anchor's too) with its paired SE: the same users' resamples on both sides."""
    primary, secondary = result["primary"], result["secondary"]
    third = "logloss" if result["task"] == "ctr" else "mrr"
    lines = [f"{result['dataset']} {result['task']} ({result['backbone']}, {result['run_id']}, {result['split']} "
             f"split, {result['users']} users, written history mean {result['written_mean']:.1f} / median "
             f"{result['written_p50']:.0f} events; +- = per-user bootstrap SE, {result['identity']['bootstrap']} "
             "resamples)", "",
             f"| history kept | events kept (mean) | {primary} | delta to full | {secondary} | {third} |",
             "|---|---:|---:|---:|---:|---:|"]
    for entry in result["points"] + result["anchors"]:
        m, se = entry["metrics"], entry["se"]
        delta = (f"{entry['delta'][primary]:+.4f} +- {entry['delta_se'][primary]:.4f}"
                 if "delta" in entry and entry["kind"] != "full" else "")
        label = entry["label"] if entry["kind"] != "anchor" else f"anchor: {entry['label']}"
        kept = f"{entry['kept_mean']:.1f}" if entry["kind"] != "anchor" else "-"
        lines.append(f"| {label} | {kept} | {m[primary]:.4f} +- {se[primary]:.4f} | {delta} | "
                     f"{m[secondary]:.4f} +- {se[secondary]:.4f} | {m[third]:.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """The curve as a PNG (metric against mean events kept, log scale; +-1 SE bars; anchors as lines).

    Returns False (and writes nothing) when matplotlib is not installed (the ``plots`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        log.warning("matplotlib is not installed (pip install -e '.[plots]'): no plot written")
        return False
    metrics = (result["primary"], result["secondary"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, metrics, strict=True):
        for kind, style, name in (("fraction", "o-", "fraction of history"), ("length", "s--", "last m events")):
            pts = sorted([p for p in result["points"] if p["kind"] in (kind, "full")], key=lambda p: p["kept_mean"])
            ax.errorbar([p["kept_mean"] for p in pts], [p["metrics"][metric] for p in pts],
                        yerr=[p["se"][metric] for p in pts], fmt=style, capsize=3, label=name)
        full = next(p for p in result["points"] if p["kind"] == "full")
        for anchor, colour in zip(result["anchors"], ("tab:red", "tab:purple", "tab:brown"), strict=False):
            value, se = anchor["metrics"][metric], anchor["se"][metric]
            ax.axhline(value, color=colour, linestyle=":", label=f"anchor: {anchor['label']}")
            ax.axhspan(value - se, value + se, color=colour, alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("events written per user (mean, log scale)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: full {full['metrics'][metric]:.4f}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['dataset']} {result['task']}: memory sensitivity ({result['backbone']}, "
                 f"{result['split']}, +-1 SE)")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return True


def write_figures(result: dict[str, Any], path: Path) -> None:
    """``<path>`` with ``.md`` (the table) and ``.png`` (the plot), each atomically, from the result (its JSON is
    ``path`` itself, written by :func:`malloc.results.cached`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path.with_suffix(".md"), format_table(result))
    plot(result, path.with_suffix(".png"))

