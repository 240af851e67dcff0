"""One run end to end: data -> task view -> train -> evaluate the test split through the serving path -> results.

``results/<name>-<hash>/`` holds ``config.yaml``, ``best.pt``, ``last.pt``, ``metrics.json``, ``meters.json``,
``schemes/native-predictions-test.npz`` (the test replay's per-user predictions and bytes) and, written last,
``done.json``. The hash covers what determines the trained model (task, data and the digest of its files, model,
train), so changing only evaluation settings re-evaluates the same checkpoint instead of retraining, and editing a
data file trains a new run. A run folder whose recorded identity or ``config.yaml`` disagrees with the resolved
config is an error, never reused.

Under torchrun (``torchrun --nproc-per-node N -m malloc train ...``, :mod:`malloc.distributed`) every process runs
:func:`run`: rank 0 holds the run's lock and alone reads and writes the folder, every rank trains on its share of
each batch and replays its share of the test users, and every rank returns rank 0's result. The identity does not
hold the world size: the recipe (global batch, seed, every random draw but dropout's masks) is the same on any
number of processes, as it is on any device, so a run started on one process resumes on several and the other way
round; ``meters.json`` records the world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from malloc.config import AUTO_MONITOR, EvalConfig, RunConfig
from malloc.configio import ConfigError, config_hash, from_dict, load_yaml, to_dict
from malloc.data.fingerprint import data_digest
from malloc.data.sequences import DataError
from malloc.data.sources import load_dataset
from malloc.data.tasks import CTRView, RetrievalView, ctr_rows
from malloc.device import environment, resolve_device
from malloc.distributed import World, joined, launch_from_environment, rank_device
from malloc.errors import CheckpointError, ResultsError
from malloc.eval.anchors import ANCHORS_VERSION, anchor_metrics
from malloc.eval.evaluate import model_meters, native_identity, native_predictions_path, replay
from malloc.memory.registry import build_model_for
from malloc.models import SequentialRecommender
from malloc.results import RunDir, cached, check_writable, load_checkpoint, same_identity
from malloc.train import train

log = logging.getLogger("malloc.run")


def training_identity(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config that determine the trained model and its stored test numbers (and so the run
    directory's hash).

    A Native model's identity leaves out the scheme fields (at their defaults they change nothing), and a real
    data set's leaves out the synthetic generator's settings, and ``train.window`` at its default is left out, so
    adding a field to any of them keeps other runs' hashes. The evaluation settings the run's numbers depend on
    (:func:`evaluation_identity`) enter only where they differ from the defaults, for the same reason.
    ``data_digest`` is the content digest of the data files (:func:`malloc.data.fingerprint.data_digest`; absent
    for generated data).

    Raises:
        DataError: a data file is missing or unreadable.
    """
    model, data = to_dict(cfg.model), to_dict(cfg.data)
    if model["scheme"] == "native" and model["memory_ratio"] == 1.0 and not model["knobs"]:
        for key in ("scheme", "memory_ratio", "knobs"):
            del model[key]
    if cfg.data.source != "synthetic":  # the generator's settings do not touch real data
        del data["synthetic"]
    train = to_dict(cfg.train)
    if train["window"] == 0:  # the default window (model.max_len)
        del train["window"]
    identity = {"task": cfg.task, "data": data, "model": model, "train": train}
    evaluation = evaluation_identity(cfg)
    if evaluation:
        identity["eval"] = evaluation
    digest = data_digest(cfg.data.source, cfg.data.path)
    if digest is not None:
        identity["data_digest"] = digest
    return identity


def evaluation_identity(cfg: RunConfig) -> dict[str, Any]:
    """The ``eval`` settings that change what a run stores, where they differ from the defaults: the validation
    metric that picks the kept epoch (``monitor``, resolved), the validation and test protocol (CTR: ``protocol``;
    retrieval: ``mask_history``, ``ks``, ``append_events``). Batch and chunk sizes are left out: the replay is
    tested equal whatever they are. Without these, a run folder trained or tested under other settings would be
    returned as done."""
    defaults = EvalConfig()
    names = ("protocol",) if cfg.task == "ctr" else ("mask_history", "ks", "append_events")
    chosen = {name: getattr(cfg.eval, name) for name in names if getattr(cfg.eval, name) != getattr(defaults, name)}
    if cfg.monitor != AUTO_MONITOR[cfg.task]:
        chosen["monitor"] = cfg.monitor
    return to_dict(chosen)


def run_dir_for(cfg: RunConfig) -> RunDir:
    return RunDir.for_config(cfg.results_dir, cfg.name, training_identity(cfg))


def build_view(cfg: RunConfig) -> CTRView | RetrievalView:
    """Load the configured data set and cut the configured task view."""
    d = cfg.data
    ds = load_dataset(d.source, d.path, label_threshold=d.label_threshold, min_events=d.min_events,
                      synthetic=d.synthetic)
    if cfg.task == "ctr":
        return CTRView(ds.sequences, ctr_rows(ds, d.test_fraction, d.valid_fraction))
    return RetrievalView(ds.sequences)


def run(cfg: RunConfig, force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train and test one configuration, or return the stored result if the run is already done.

    Holds the run's lock (:meth:`RunDir.lock`) throughout, so processes that share a results folder train each
    run once. In a torchrun job of several processes, every rank calls it (module docstring).

    Returns:
        ``{"run_id", "metrics", "meters"}``.
    """
    launch = launch_from_environment()
    if launch is None:
        run_dir = run_dir_for(cfg)
        check_writable(run_dir.root.parent)
        with run_dir.lock():
            return _run_locked(cfg, run_dir, force, show_progress)
    cfg = dataclasses.replace(cfg, device=rank_device(cfg.device, launch))
    run_dir = run_dir_for(cfg)
    if launch.rank == 0:
        check_writable(run_dir.root.parent)
    with joined(launch, resolve_device(cfg.device)) as world, \
            run_dir.lock() if world.is_main else contextlib.nullcontext():
        return _run_locked(cfg, run_dir, force, show_progress, world)


def _run_locked(cfg: RunConfig, run_dir: RunDir, force: bool, show_progress: bool, world: World | None = None
                ) -> dict[str, Any]:
    main = world is None or world.is_main
    stored = _open_run_dir(cfg, run_dir, force) if main else None
    if world is not None:
        stored = world.broadcast(stored, "sharing the state of the run folder")
    if stored is not None:
        return stored
    try:
        view = build_view(cfg)
        check_splits(cfg, view)
        model, trained = train(cfg, view, run_dir.root, show_progress=show_progress, world=world)
        # saved as the run's policy-free test replay, which schemes and suites compare against
        replayed = replay(cfg, model, view, "test", world=world)
        check_finite(replayed.metrics, "test", run_dir)
        if main:
            replayed.save(native_predictions_path(run_dir.root, "test"), native_identity(cfg, "test"))
        result = {"metrics": replayed.metrics,
                  "meters": {**replayed.meters, **model_meters(cfg, model, view, "test", replayed)}}
        anchors = anchors_for(cfg, view) if main else {}
    except Exception as exc:
        if main:
            run_dir.record_error(exc)
        raise
    finished = None
    if main:
        meters = {
            **result["meters"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "best_epoch": trained.best_epoch, "epochs_run": trained.epochs_run,
            "train_seconds_per_epoch": trained.seconds_per_epoch,
            "train_events_per_second": trained.events_per_second,
            "environment": environment(cfg.device),
            "world_size": 1 if world is None else world.size,
        }
        run_dir.write_metrics({**result["metrics"], "split": "test", "valid_history": trained.history,
                               "anchors": anchors["test"], "valid_anchors": anchors["valid"]})
        run_dir.write_meters(meters)
        run_dir.mark_done({"run_id": run_dir.run_id})
        finished = {"run_id": run_dir.run_id, "metrics": result["metrics"], "meters": meters,
                    "anchors": anchors["test"]}
    return finished if world is None else world.broadcast(finished, "sharing the run's result")


def _open_run_dir(cfg: RunConfig, run_dir: RunDir, force: bool) -> dict[str, Any] | None:
    """Check and claim the run folder (cleared first with ``force``): the stored result of a done run, else None
    (the folder is ready for training, with its identity and config written)."""
    if force:
        run_dir.clear()
    identity = training_identity(cfg)
    if run_dir.root.is_dir():
        check_stored_config(run_dir, cfg)
        run_dir.claim(identity)
    if run_dir.is_done():
        log.info("%s is done; skipping (use --force to rerun)", run_dir.root)
        metrics, meters = run_dir.read_result()
        return {"run_id": run_dir.run_id, "metrics": metrics, "meters": meters, "anchors": metrics.get("anchors", {})}
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.claim(identity)
    run_dir.write_config(cfg)
    return None


def anchors_for(cfg: RunConfig, view: CTRView | RetrievalView) -> dict[str, dict[str, dict[str, float]]]:
    """``{"valid", "test": {anchor: metrics}}`` (:mod:`malloc.eval.anchors`) for the run's data, task and protocol,
    computed once per results folder and reused by every run on the same data
    (``<results_dir>/anchors/<source>-<task>-<hash>.json``)."""
    identity = training_identity(cfg)
    identity = {"task": cfg.task, "data": identity["data"], "data_digest": identity.get("data_digest"),
                "protocol": cfg.eval.protocol if cfg.task == "ctr" else None, "seed": cfg.train.seed,
                "ks": list(cfg.eval.ks), "mask_history": cfg.eval.mask_history, "version": ANCHORS_VERSION}
    path = Path(cfg.results_dir) / "anchors" / f"{cfg.data.source}-{cfg.task}-{config_hash(identity)}.json"

    def compute() -> dict[str, Any]:
        return {"identity": identity, "value": anchor_metrics(
            view, ("valid", "test"), protocol=cfg.eval.protocol, ks=cfg.eval.ks, mask_history=cfg.eval.mask_history,
            seed=cfg.train.seed)}

    return cached(path, compute, lambda stored: same_identity(identity)(stored) and "value" in stored)["value"]


def check_stored_config(run_dir: RunDir, cfg: RunConfig) -> None:
    """The run folder's ``config.yaml``, where there is one, must describe the same trained model as ``cfg``.

    Raises:
        ResultsError: it cannot be read as a config, or its training identity differs (an edited file).
    """
    if not run_dir.config_path.is_file():
        return
    try:
        stored = from_dict(RunConfig, load_yaml(run_dir.config_path))
    except ConfigError as exc:
        raise ResultsError(f"{run_dir.config_path}: not a config of this version ({exc}); delete the folder or "
                           "rerun with --force") from exc
    if training_identity(stored) != training_identity(cfg):
        raise ResultsError(f"{run_dir.config_path} describes another run than the resolved config (edited by hand?); "
                           "delete the folder or rerun with --force")


def check_splits(cfg: RunConfig, view: CTRView | RetrievalView) -> None:
    """Every split a run uses has rows, and for CTR both labels (else AUC and GAUC are undefined).

    Raises:
        DataError: naming the split and the data set (source and path).
    """
    where = f"{cfg.data.source}" + (f" ({cfg.data.path})" if cfg.data.path else "")
    if isinstance(view, RetrievalView):
        return
    for split in ("train", "valid", "test"):
        rows = view.split(split)
        if len(rows) == 0:
            raise DataError(f"data set {where}: the {split} split has no rows" + _split_file_hint(cfg, split))
        if split == "train":
            continue
        hint = " (check data.label_threshold)" if cfg.data.source.startswith("ml-") else ""
        positives = int((rows.label == 1).sum())
        if positives in (0, len(rows)):
            kind = "positive" if positives == 0 else "negative"
            raise DataError(f"data set {where}: the {split} split has no {kind} labels ({len(rows)} rows), so AUC "
                            f"and GAUC are undefined{hint}")
        users = np.unique(rows.user)
        positive_users = np.unique(rows.user[rows.label == 1])
        negative_users = np.unique(rows.user[rows.label != 1])
        if len(np.intersect1d(positive_users, negative_users)) == 0:
            raise DataError(f"data set {where}: no user of the {split} split has both labels ({len(users)} users), so "
                            f"GAUC is undefined{hint}")


def _split_file_hint(cfg: RunConfig, split: str) -> str:
    if cfg.data.source in ("microvideo", "kuaivideo"):
        return f" (file {split}.parquet)"
    if cfg.data.source == "amazon-electronics":
        return f" (file {split}.csv)"
    return ""


def check_finite(metrics: dict[str, Any], split: str, run_dir: RunDir) -> None:
    """Metrics that are NaN or infinite are an error, not a result: nothing is marked done.

    Raises:
        ResultsError: naming the metrics, the split and the likely cause.
    """
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise ResultsError(f"{run_dir.root}: {', '.join(bad)} of the {split} split are not finite (no user of the "
                           "split has both labels, or the model's outputs are not finite); nothing was marked done")


def load_trained(cfg: RunConfig) -> tuple[SequentialRecommender, CTRView | RetrievalView, RunDir]:
    """The best checkpoint of a finished (or at least once checkpointed) training run for ``cfg``."""
    run_dir = run_dir_for(cfg)
    if not run_dir.checkpoint_path.is_file():
        raise ResultsError(f"no checkpoint for this config at {run_dir.checkpoint_path}: run `malloc train` with "
                           "the same config first")
    check_stored_config(run_dir, cfg)
    view = build_view(cfg)
    return load_model(cfg, view.sequences.num_items, run_dir.checkpoint_path), view, run_dir


def load_model(cfg: RunConfig, num_items: int, checkpoint: Path) -> SequentialRecommender:
    """A ``cfg.model`` with the weights saved at ``checkpoint``, on ``cfg.device``, in eval mode.

    Raises:
        CheckpointError: the file is refused or unreadable (:func:`~malloc.results.load_checkpoint`), or its
            weights do not fit the configured model.
    """
    model = build_model_for(cfg.model, num_items)
    weights = load_checkpoint(checkpoint)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{checkpoint}: its weights do not fit the configured model "
                              f"({str(exc).splitlines()[0]}); delete it, or rerun with --force") from exc
    return model.to(resolve_device(cfg.device)).eval()
