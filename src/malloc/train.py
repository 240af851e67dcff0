"""Training with the plain full forward, early stopping on the validation metric, resumable.

Losses: binary cross-entropy on target tokens for CTR; for retrieval, cross-entropy of the next item over the
full catalogue (``train.negatives = 0``) or a sampled softmax with ``k`` uniform negatives shared by the batch.
After each epoch the model is evaluated on the validation split (:func:`malloc.eval.evaluate.forward_metrics`: the
numbers of the serving replay, computed with one batched full forward, which is equal for every trained model;
skipped when ``train.epochs`` is 1, where there is nothing to choose); the best epoch by ``eval.monitor`` is
checkpointed, and ``last.pt`` (model, optimiser, random states, epoch) lets an interrupted run resume exactly where
it stopped.

Data-parallel (``torchrun``, :mod:`malloc.distributed`): each rank takes its contiguous share of every global batch
(``train.batch_size`` windows, as in one process), sums its loss over its targets and divides by the global count of
targets (all ranks' counts gathered), times the world size, since DistributedDataParallel averages the ranks'
gradients: every step is then the gradient of the global batch's mean loss, the step of one process up to
floating-point order. Every random draw of the recipe is made for the whole global batch on every rank (the order of
the batches, the blind cuts, the negatives: per-target negatives are drawn for all the global batch's targets and
each rank takes its rows), so it does not depend on the world size; dropout does: each rank draws its own masks,
seeded per (seed, epoch, rank). A rank whose share of a short last batch is empty steps on a copy of the batch's
first window at weight 0, so that every rank joins every gradient reduction. Validation splits its batches over the
ranks and sums the per-row results (:func:`~malloc.eval.evaluate.forward_metrics`), so every rank takes the same
decisions (best epoch, early stop). Rank 0 alone reads and writes checkpoints; the resume state and the best
weights reach the other ranks by broadcast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from malloc.config import RunConfig
from malloc.configio import ConfigError
from malloc.data.batching import CTRWindowRows, TrainingBatch, ctr_training_batch, retrieval_training_batch
from malloc.data.sequences import DataError
from malloc.data.tasks import CTRView, RetrievalView, Window, windows
from malloc.device import resolve_device
from malloc.distributed import World
from malloc.errors import CheckpointError, TrainingError
from malloc.eval.anchors import base_log_odds, item_log_odds
from malloc.eval.evaluate import forward_metrics
from malloc.memory.registry import build_model_for
from malloc.models import SequentialRecommender
from malloc.results import atomic_torch_save, load_checkpoint

log = logging.getLogger("malloc.train")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def training_windows(view: CTRView | RetrievalView, cfg: RunConfig) -> list[Window]:
    """The training windows of a view (see :mod:`malloc.data.tasks`), ``train.window`` (default ``model.max_len``)
    events long at most."""
    window = min(cfg.train.window or cfg.model.max_len, cfg.model.max_len)
    if isinstance(view, CTRView):
        train = view.split("train")
        ends = np.zeros(view.sequences.num_users, dtype=np.int64)
        np.maximum.at(ends, train.user, train.history_len)
        found = windows(ends, window)
    else:
        found = windows(view.train_ends(), window, overlap=1)
        found = [w for w in found if w.stop - w.start >= 2]
    if cfg.train.max_train_users:
        found = [w for w in found if w.user < cfg.train.max_train_users]
    return found


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of windows of similar length (attention cost is quadratic in the padded length), in random order.

    Windows are sorted by length with random tie-breaking, cut into batches, and the batches shuffled.
    """
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def parameter_groups(model: SequentialRecommender, cfg: RunConfig) -> list[dict]:
    """The optimiser's groups: every parameter at ``train.lr`` and ``train.weight_decay``, but the CTR item prior,
    at ``train.prior_lr`` without weight decay (a decay would pull each item's base rate towards the global one)."""
    prior = [] if model.item_bias is None else [model.item_bias.weight]
    others = [p for p in model.parameters() if all(p is not q for q in prior)]
    groups: list[dict] = [{"params": others}]
    if prior:
        groups.append({"params": prior, "lr": cfg.train.prior_lr, "weight_decay": 0.0})
    return groups


def blind_cuts(windows: list[Window], cfg: RunConfig, rng: np.random.Generator) -> np.ndarray | None:
    """``(B,)`` where each CTR training window's events stop carrying labels (``train.blind_windows``): a share of
    the windows get a cut uniform over their last ``train.blind_span``, the others none (their length)."""
    if cfg.train.blind_windows == 0.0:
        return None
    lengths = np.array([w.stop - w.start for w in windows])
    span = np.ceil(cfg.train.blind_span * lengths).astype(np.int64)
    cuts = lengths - rng.integers(0, span + 1)
    blind = rng.random(len(windows)) < cfg.train.blind_windows
    return np.where(blind, cuts, lengths)


def batch_loss(model: SequentialRecommender, batch: TrainingBatch, task: str, negatives: int,
               generator: torch.Generator, temperature: float = 1.0, per_target: bool = False,
               reduction: str = "mean", draw: tuple[int, int] | None = None) -> torch.Tensor:
    """The loss of a training batch over its ``N`` targets: their mean (``reduction="mean"``), or their sum
    (``"sum"``: a rank's share of a global batch, which the caller divides by the global count of targets).

    ``draw = (offset, total)``: per-target negatives are drawn for ``total`` targets and this batch's ``N`` targets
    take rows ``offset:offset + N`` of the draw (a rank's targets within its global batch), so the draw does not
    depend on how the global batch is split; None draws for this batch's targets alone.
    """
    if task == "ctr":
        start = batch.candidates_from
        mask = batch.target_mask[:, start:]
        hidden = model.candidate_outputs(batch.tokens, start)[mask]  # (N, D)
        items = batch.tokens.items[:, start:][mask]
        return F.binary_cross_entropy_with_logits(model.ctr_logits(hidden, items), batch.targets[:, start:][mask],
                                                  reduction=reduction)
    hidden = model(batch.tokens)[batch.target_mask]  # (N, D)
    targets = batch.targets[batch.target_mask]
    targets = targets.long()
    if negatives == 0:
        return F.cross_entropy(model.item_logits(hidden) / temperature, targets, reduction=reduction)
    user = model.user_vector(hidden)
    positive = (user * model.item_vectors(targets)).sum(-1, keepdim=True)
    if per_target:  # (N, k) negatives, each target its own draw (generative-recommenders' local sampling)
        rows = len(targets) if draw is None else draw[1]
        sampled = torch.randint(1, model.num_items + 1, (rows, negatives), generator=generator)
        if draw is not None:
            sampled = sampled[draw[0]:draw[0] + len(targets)]
        sampled = sampled.to(hidden.device)
        negative = torch.einsum("nd,nkd->nk", user, model.item_vectors(sampled))
        negative = negative.masked_fill(sampled == targets[:, None], float("-inf"))
    else:  # (k,) negatives shared by every target of the batch
        sampled = torch.randint(1, model.num_items + 1, (negatives,), generator=generator).to(hidden.device)
        negative = user @ model.item_vectors(sampled).T
        negative = negative.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
    return F.cross_entropy(torch.cat([positive, negative], dim=1) / temperature, torch.zeros_like(targets),
                           reduction=reduction)


class ShardLoss(torch.nn.Module):
    """What DistributedDataParallel wraps: a module whose forward is a rank's summed :func:`batch_loss`, so that
    DDP's gradient reduction runs on every step whatever methods of the model the loss calls."""

    def __init__(self, model: SequentialRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: TrainingBatch, task: str, negatives: int, generator: torch.Generator,
                temperature: float, per_target: bool, draw: tuple[int, int]) -> torch.Tensor:
        return batch_loss(self.model, batch, task, negatives, generator, temperature, per_target, "sum", draw)


def _shard_step(trainer: DistributedDataParallel, batch: TrainingBatch, weight: float, world: World,
                optimiser: torch.optim.Optimizer, generator: torch.Generator, cfg: RunConfig) -> float:
    """One optimiser step on a global batch split over the ranks; this rank's ``batch`` counts ``weight`` times
    (0: a stand-in for an empty share). Returns the global batch's mean loss, the same on every rank.

    The gradient is the global batch's mean loss: each rank's summed loss over the global count of targets, times
    the world size that DDP's average of the ranks' gradients divides by.
    """
    local = int(batch.target_mask.sum()) if weight else 0
    counts = [int(c[0]) for c in world.all_gather(np.array([local], dtype=np.int64), "counting the batch's targets")]
    total, offset = max(1, sum(counts)), sum(counts[:world.rank])
    with world.guard("a training step (the gradient reduction)", only_collectives=True):
        summed = trainer(batch, cfg.task, cfg.train.negatives, generator, cfg.train.temperature,
                         cfg.train.negative_sampling == "per_target", (offset, total))
        optimiser.zero_grad(set_to_none=True)
        (summed * (weight * world.size / total)).backward()
    optimiser.step()
    return float(world.all_reduce_sum(np.array([summed.item() * weight]), "summing the batch's loss")[0]) / total


def _load_weights(model: SequentialRecommender, path: Path, device: torch.device, world: World | None = None
                  ) -> None:
    """Load the weights saved at ``path``; in a torchrun job rank 0 reads the file and broadcasts them."""
    if world is None:
        weights = load_checkpoint(path, map_location=device)
    else:
        weights = world.broadcast(load_checkpoint(path) if world.is_main else None, f"sharing the weights of {path}")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: its weights do not fit the configured model ({str(exc).splitlines()[0]}); "
                              "delete it, or rerun with --force") from exc


def _resume(path: Path, model: SequentialRecommender, optimiser: torch.optim.Optimizer,
            generator: torch.Generator, device: torch.device) -> dict:
    """Restore model, optimiser and random states from ``last.pt`` (tensors and plain values only); returns the
    progress record (epoch, best metric and epoch, stale epochs, history)."""
    return _restore(load_checkpoint(path, map_location=device), path, model, optimiser, generator, device)


def _restore(saved: Any, path: Path, model: SequentialRecommender, optimiser: torch.optim.Optimizer,
             generator: torch.Generator, device: torch.device) -> dict:
    """:func:`_resume` from the contents ``saved`` of ``path``."""
    progress = saved.get("progress") if isinstance(saved, dict) else None
    if not isinstance(progress, dict) or not isinstance(progress.get("epoch"), int):
        raise CheckpointError(f"{path}: not a resume state (no progress record); delete it, or rerun with --force")
    try:
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        generator.set_state(saved["generator"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a resume state of this run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it, or rerun with --force"
                              ) from exc
    return progress


@dataclass
class TrainResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    seconds_per_epoch: float
    events_per_second: float
    history: list[dict]


StepHook = Callable[[int, int, float], None]


def train(cfg: RunConfig, view: CTRView | RetrievalView, run_dir: Path, show_progress: bool = True,
          world: World | None = None, on_step: StepHook | None = None) -> tuple[SequentialRecommender, TrainResult]:
    """Train ``cfg.model`` on ``view``; checkpoints go to ``run_dir`` (``best.pt``, ``last.pt``).

    Seeds (``train.seed``), builds the model (:func:`~malloc.memory.registry.build_model_for`), then :func:`fit`
    (``world``, ``on_step``: see there). Returns the model loaded with its best epoch's weights.
    """
    seed_everything(cfg.train.seed)
    return fit(build_model_for(cfg.model, view.sequences.num_items), cfg, view, run_dir, show_progress, world,
               on_step)


def fit(model: SequentialRecommender, cfg: RunConfig, view: CTRView | RetrievalView, run_dir: Path,
        show_progress: bool = True, world: World | None = None, on_step: StepHook | None = None
        ) -> tuple[SequentialRecommender, TrainResult]:
    """Train ``model`` (freshly built, after :func:`seed_everything`) with ``cfg``'s recipe: what :func:`train`
    does once it has built ``cfg.model``. Resumes from ``run_dir/last.pt``; returns the best epoch's weights.

    ``world``: this process's rank of a torchrun job (module docstring); every rank calls :func:`fit` with the same
    arguments, rank 0 alone touches ``run_dir``. ``on_step(epoch, step, loss)`` is called after every optimiser step
    with the 0-based epoch and step and the global batch's mean loss.
    """
    main = world is None or world.is_main
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.device)
    seqs = view.sequences
    if isinstance(view, CTRView) and model.item_bias is not None:
        model.set_item_prior(torch.as_tensor(item_log_odds(view), dtype=torch.float32), base_log_odds(view))
    model = model.to(device)
    optimiser = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    all_windows = training_windows(view, cfg)
    if not all_windows:
        raise DataError(f"data set {cfg.data.source}{f' ({cfg.data.path})' if cfg.data.path else ''}: the train "
                        "split has no training window (no user has training events"
                        + (" among the first train.max_train_users" if cfg.train.max_train_users else "") + ")")
    lengths = np.array([w.stop - w.start for w in all_windows])
    row_index = CTRWindowRows(view.split("train")) if isinstance(view, CTRView) else None
    generator = torch.Generator().manual_seed(cfg.train.seed)
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    state = {"epoch": 0, "best_metric": float("-inf"), "best_epoch": -1, "stale": 0, "history": []}
    if cfg.task == "retrieval" and cfg.train.negatives >= seqs.num_items:
        raise ConfigError(f"train.negatives ({cfg.train.negatives}) must be below the catalogue size "
                          f"({seqs.num_items} items); 0 trains a full softmax")
    if world is None and last_path.exists():
        state = _resume(last_path, model, optimiser, generator, device)
        log.info("resuming %s at epoch %d", run_dir, state["epoch"])
    elif world is not None:  # rank 0 reads last.pt, every rank restores it
        saved = world.broadcast(load_checkpoint(last_path) if main and last_path.exists() else None,
                                f"sharing the resume state {last_path}")
        if saved is not None:
            state = _restore(saved, last_path, model, optimiser, generator, device)
            if main:
                log.info("resuming %s at epoch %d (%d processes)", run_dir, state["epoch"], world.size)
    trainer = None
    if world is not None:  # its construction copies rank 0's parameters and buffers to every rank
        with world.guard("starting DistributedDataParallel"):
            trainer = DistributedDataParallel(ShardLoss(model), find_unused_parameters=True)

    while state["epoch"] < cfg.train.epochs and state["stale"] < cfg.train.patience:
        epoch = state["epoch"]
        model.train()
        rng = np.random.default_rng([cfg.train.seed, epoch])
        if world is not None:  # each rank its own dropout masks, the same after a resume
            torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, epoch, world.rank]).generate_state(1)[0]))
        batches = length_bucketed_batches(lengths, cfg.train.batch_size, rng)
        tic, total_loss, events_seen = time.perf_counter(), 0.0, 0
        # disable=None: a bar on a terminal only, no carriage-return noise in logs
        for step, batch_index in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                                                disable=None if show_progress and main else True, leave=False)):
            picked = [all_windows[i] for i in batch_index]
            if trainer is None:
                batch = (ctr_training_batch(seqs, picked, row_index, blind_cuts(picked, cfg, rng))
                         if row_index is not None else retrieval_training_batch(seqs, picked))
                loss = batch_loss(model, batch.to(device), cfg.task, cfg.train.negatives, generator,
                                  cfg.train.temperature, cfg.train.negative_sampling == "per_target")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                loss_value = loss.item()
            else:
                assert world is not None
                cuts = blind_cuts(picked, cfg, rng) if row_index is not None else None  # drawn for the whole batch
                lo, hi = world.shard(len(picked))
                share = slice(lo, hi) if hi > lo else slice(0, 1)  # an empty share: the first window at weight 0
                batch = (ctr_training_batch(seqs, picked[share], row_index, None if cuts is None else cuts[share])
                         if row_index is not None else retrieval_training_batch(seqs, picked[share]))
                loss_value = _shard_step(trainer, batch.to(device), 1.0 if hi > lo else 0.0, world, optimiser,
                                         generator, cfg)
            total_loss += loss_value * len(picked)
            events_seen += sum(w.stop - w.start for w in picked)
            if on_step is not None:
                on_step(epoch, step, loss_value)
        seconds = time.perf_counter() - tic
        # one epoch in all: nothing to choose between, so no validation replay (a capped suite's budget)
        metrics = forward_metrics(cfg, model, view, "valid", world) if cfg.train.epochs > 1 else {}
        metric = metrics.get(cfg.monitor, 0.0)
        if not np.isfinite(total_loss):
            raise TrainingError(f"{run_dir}: the training loss is not finite at epoch {epoch + 1} (lower train.lr?)")
        if not np.isfinite(metric):
            raise TrainingError(f"{run_dir}: the validation {cfg.monitor} is not finite at epoch {epoch + 1}")
        record = {"epoch": epoch + 1, "loss": total_loss / max(1, len(all_windows)), "seconds": seconds,
                  "events_per_second": events_seen / seconds, **{f"valid_{k}": v for k, v in metrics.items()}}
        state["history"].append(record)
        if main:
            log.info("epoch %d loss %.4f valid %s %s (%.1fs)", epoch + 1, record["loss"], cfg.monitor,
                     f"{metric:.4f}" if metrics else "not run (one epoch)", seconds)
        if cfg.monitor_sign * metric > state["best_metric"]:  # best_metric is signed: larger is better
            state.update(best_metric=cfg.monitor_sign * metric, best_epoch=epoch + 1, stale=0)
            if main:
                atomic_torch_save(model.state_dict(), best_path)
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        if main:
            atomic_torch_save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                               "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                               "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                               "progress": state}, last_path)

    _load_weights(model, best_path, device, world)
    history = state["history"]
    result = TrainResult(
        best_epoch=state["best_epoch"], best_metric=cfg.monitor_sign * state["best_metric"], epochs_run=state["epoch"],
        seconds_per_epoch=float(np.mean([h["seconds"] for h in history])) if history else 0.0,
        events_per_second=float(np.mean([h["events_per_second"] for h in history])) if history else 0.0,
        history=history,
    )
    return model.eval(), result
