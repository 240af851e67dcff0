"""One run end to end: data -> task view -> train -> evaluate the test split through the serving path -> results.

``results/<name>-<hash>/`` holds ``config.yaml``, ``best.pt``, ``last.pt``, ``metrics.json``, ``meters.json``,
``schemes/native-predictions-test.npz`` (the test replay's per-user predictions and bytes) and, written last,
``done.json``. The hash covers what determines the trained model (task, data, model, train), so
changing only evaluation settings re-evaluates the same checkpoint instead of retraining.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import torch

from malloc import __version__
from malloc.bench.results import RunDir, read_json
from malloc.config import RunConfig
from malloc.configio import to_dict
from malloc.data.sources import load_dataset
from malloc.data.tasks import CTRView, RetrievalView, ctr_rows
from malloc.device import device_name, resolve_device
from malloc.evaluate import model_meters, native_identity, native_predictions_path, replay
from malloc.models import SequentialRecommender, build_model
from malloc.train import train

log = logging.getLogger("malloc.run")


def training_identity(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config that determine the trained model (and so the run directory's hash).

    A Native model's identity leaves out the scheme fields (at their defaults they change nothing), and a real
    data set's leaves out the synthetic generator's settings, and ``train.window`` at its default is left out, so
    adding a field to any of them keeps other runs' hashes.
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
    return {"task": cfg.task, "data": data, "model": model, "train": train}


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


def environment(device: str = "cpu") -> dict[str, Any]:
    """Library versions, the processor, torch's thread count and the device (``cfg.device``) of a run."""
    return {"malloc": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "device": device_name(resolve_device(device))}


def run(cfg: RunConfig, force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train and test one configuration, or return the stored result if the run is already done.

    Holds the run's lock (:meth:`RunDir.lock`) throughout, so processes that share a results folder train each
    run once.

    Returns:
        ``{"run_id", "metrics", "meters"}``.
    """
    run_dir = run_dir_for(cfg)
    with run_dir.lock():
        return _run_locked(cfg, run_dir, force, show_progress)


def _run_locked(cfg: RunConfig, run_dir: RunDir, force: bool, show_progress: bool) -> dict[str, Any]:
    if force:
        run_dir.clear()
    if run_dir.is_done():
        log.info("%s is done; skipping (use --force to rerun)", run_dir.root)
        return {"run_id": run_dir.run_id, "metrics": read_json(run_dir.metrics_path),
                "meters": read_json(run_dir.meters_path)}
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.write_config(cfg)
    try:
        view = build_view(cfg)
        model, trained = train(cfg, view, run_dir.root, show_progress=show_progress)
        # saved as the run's policy-free test replay, which schemes and suites compare against
        replayed = replay(cfg, model, view, "test")
        replayed.save(native_predictions_path(run_dir.root, "test"), native_identity(cfg, "test"))
        result = {"metrics": replayed.metrics,
                  "meters": {**replayed.meters, **model_meters(cfg, model, view, "test", replayed)}}
    except Exception as exc:
        run_dir.record_error(exc)
        raise
    meters = {
        **result["meters"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "best_epoch": trained.best_epoch, "epochs_run": trained.epochs_run,
        "train_seconds_per_epoch": trained.seconds_per_epoch,
        "train_events_per_second": trained.events_per_second,
        "environment": environment(cfg.device),
    }
    run_dir.write_metrics({**result["metrics"], "split": "test", "valid_history": trained.history})
    run_dir.write_meters(meters)
    run_dir.mark_done({"run_id": run_dir.run_id})
    return {"run_id": run_dir.run_id, "metrics": result["metrics"], "meters": meters}


def load_trained(cfg: RunConfig) -> tuple[SequentialRecommender, CTRView | RetrievalView, RunDir]:
    """The best checkpoint of a finished (or at least once checkpointed) training run for ``cfg``."""
    run_dir = run_dir_for(cfg)
    if not run_dir.checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint for this config at {run_dir.checkpoint_path}: run `malloc train` "
                                "with the same config first")
    view = build_view(cfg)
    return load_model(cfg, view.sequences.num_items, run_dir.checkpoint_path), view, run_dir


def load_model(cfg: RunConfig, num_items: int, checkpoint: Path) -> SequentialRecommender:
    """A ``cfg.model`` with the weights saved at ``checkpoint``, on ``cfg.device``, in eval mode."""
    model = build_model(cfg.model, num_items)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.to(resolve_device(cfg.device)).eval()
