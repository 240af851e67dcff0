"""``malloc serve``: a trained run's data set replayed over time as requests against a state store.

:func:`serve` loads the run's best checkpoint (as ``malloc eval`` does), builds the requests
(:mod:`malloc.serve.requests`), the budget (:mod:`malloc.serve.budget`) and the workers' tasks, checks the store
(a fresh replay needs an empty store, or ``--force`` to empty it; ``--resume`` needs the checkpoints of the same
replay), serves (:mod:`malloc.serve.worker`), and writes the result (:mod:`malloc.serve.result`) atomically:

- ``<out>/result.json``: accuracy, anchors, latency per stage, requests per second, store bytes, counts;
- ``<out>/predictions.npz``: per request, in serving order: user, event, split, label, CTR logit, retrieval rank;
- ``<out>/checkpoints/worker-<w>/``: each worker's checkpoint and undo log (persistent stores only).

``<out>`` is ``<run>/serve/<allocator>-<scheme>-<hash>/`` unless ``--out`` names it; the hash covers the replay's
identity (model, data, scheme and knobs, allocator, budget, store URL, workers, requests), so a different replay
never resumes another's checkpoints.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from malloc.config import RunConfig
from malloc.configio import config_hash, to_dict
from malloc.core.state import LayerState
from malloc.data.batching import events
from malloc.device import environment
from malloc.memory.policy import EvictionPolicy
from malloc.memory.registry import build_policy
from malloc.results import atomic_file, atomic_write_json, check_writable
from malloc.runner import load_trained, training_identity
from malloc.serve.allocator import level_ratio
from malloc.serve.budget import (
    event_bytes,
    eviction_bytes,
    final_events,
    linear_bytes,
    native_entry_bytes,
    uniform_ratio,
)
from malloc.serve.meters import RequestMeters
from malloc.serve.options import ServeError, ServeOptions
from malloc.serve.requests import Requests, build_requests, worker_of
from malloc.serve.result import accuracy, anchors, meters_result, store_bytes
from malloc.serve.server import Levels, check_levels
from malloc.serve.worker import WorkerPart, WorkerTask, run_worker, run_workers
from malloc.serving.engine import Engine
from malloc.serving.store import encode, entry_identity, open_store
from malloc.serving.store.url import shown_url


def file_digest(path: Path) -> str:
    """blake2b-160 (hex) of a file's bytes: the model identity of the entries (the checkpoint's digest)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replay_identity(cfg: RunConfig, options: ServeOptions, model_id: str) -> dict[str, Any]:
    """What a replay's result depends on (its folder's hash and its checkpoints' identity)."""
    training = training_identity(cfg)
    return {"model": model_id, "task": cfg.task, "data": training["data"], "data_digest": training.get("data_digest"),
            "max_len": cfg.model.max_len,
            "eval": {k: v for k, v in to_dict(cfg.eval).items()
                     if k in ("prefill_chunk", "candidate_chunk", "hstu_normaliser", "mask_history")},
            "scheme": options.scheme, "knobs": options.knobs, "memory_ratio": options.memory_ratio,
            "allocator": options.allocator, "budget": options.budget, "decay": options.decay,
            "store": shown_url(options.store), "workers": options.workers, "batch": options.batch,
            "max_requests": options.max_requests, "hot_bytes": options.hot_bytes}


def out_dir(run_root: Path, options: ServeOptions, identity: dict[str, Any]) -> Path:
    if options.out is not None:
        return Path(options.out)
    return run_root / "serve" / f"{options.allocator}-{options.scheme}-{config_hash(identity)}"


def _prepare_store(options: ServeOptions, folders: list[Path]) -> None:
    """A fresh replay starts from an empty store and no checkpoints (``--force`` empties both); a resumed one
    needs every worker's checkpoint.

    Raises:
        ServeError: a store that holds entries, checkpoints that would be overwritten, or nothing to resume.
    """
    has_checkpoint = [f for f in folders if (f / "checkpoint.npz").is_file()]
    if options.resume:
        missing = [f for f in folders if f not in has_checkpoint]
        if missing:
            raise ServeError(f"nothing to resume: no checkpoint in {missing[0]} (run without --resume)")
        return
    if has_checkpoint and not options.force:
        raise ServeError(f"{has_checkpoint[0].parent} holds the checkpoints of this replay: pass --resume to continue "
                         "it or --force to start afresh")
    with open_store(options.store) as store:
        first = next(iter(store.keys()), None)
        if first is not None:
            if not options.force:
                count = len(store)
                raise ServeError(f"store {shown_url(options.store)} holds {count:,} entries; a replay starts from an "
                                 "empty store: pass --force to empty it (or --resume to continue a replay)")
            for key in list(store.keys()):
                store.delete(key)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _budget(model: Any, options: ServeOptions, model_id: str, requests: Requests, view: Any,
            engine_args: dict[str, Any]) -> tuple[np.ndarray | None, int | None, float]:
    """``(Native's entry bytes per user (None for a model whose layers store their own state), the budget in
    bytes (None: no budget), the ratio of the uniform and LRU allocators)``.

    Raises:
        ServeError: a budget on a model that is not Native underneath, or one below the entries' fixed bytes.
    """
    native_engine = Engine(model, build_policy("native"), **engine_args)
    held = final_events(requests)
    try:
        native = native_entry_bytes(native_engine, entry_identity(native_engine, model=model_id), held)
    except ServeError:
        if options.budget is not None:
            raise
        native = None
    ratio = options.memory_ratio if options.memory_ratio is not None else 1.0
    if options.budget is None or native is None:
        return native, None, ratio
    budget = int(options.budget * int(native.sum()))
    if options.allocator != "uniform":
        return native, budget, ratio
    # the one ratio whose final entries meet the budget. The bytes compression leaves alone (header, last hidden
    # state, counters) are measured on a real entry: the user with the most events (the most digits in its
    # shapes), at the ratio found (its digits are in the header too), so the estimate bounds every entry's.
    user = int(np.argmax(held))
    written = events(view.sequences, np.array([user]), np.array([requests.log_start[user]]),
                     np.array([requests.log_start[user] + held[user]]))
    ratio = 0.5
    for _ in range(2):
        probe = Levels(model, options.scheme, options.knobs, ratio, 1, model_id, engine_args)
        state = probe.engine(0).write(written)[0]
        overhead = len(encode(state, probe.identity(0))) - sum(layer.nbytes() for layer in state.layers)
        policy, layer = probe.engine(0).policy, state.layers[0]
        if isinstance(policy, EvictionPolicy) and isinstance(layer, LayerState):
            final = eviction_bytes(held, policy, layer, len(state.layers), overhead)
        else:
            final = linear_bytes(held, event_bytes(native_engine) * held, overhead)
        ratio = uniform_ratio(budget, final, int((held > 0).sum()), overhead)
    return native, budget, ratio


def serve(cfg: RunConfig, options: ServeOptions, show_progress: bool = True, command: str = "") -> dict[str, Any]:
    """Replay ``cfg``'s trained run under ``options`` (module docstring); returns the result written to
    ``<out>/result.json``, with ``"out"`` its folder.

    Raises:
        ResultsError: no checkpoint for ``cfg``; SchemeError: a bad scheme, ratio or knob; StoreError: a bad store
        URL or an unreachable server; ServeError: bad options, a non-empty store, nothing to resume.
    """
    build_policy(options.scheme, options.memory_ratio or 1.0, **options.knobs)  # a bad scheme fails before work
    if options.allocator == "adaptive" and options.scheme == "native":
        raise ServeError("--allocator adaptive compresses with a scheme: add --scheme (random, recency, "
                         "streaming_llm or h2o)")
    if options.allocator == "uniform" and options.budget is not None and options.scheme == "native":
        raise ServeError("--allocator uniform meets a budget by compressing every state: add --scheme (e.g. random, "
                         "h2o; see `malloc methods`); Native stores everything")
    top, levels = check_levels(options.scheme, options.knobs, options.allocator)
    model, view, run_dir = load_trained(cfg)
    model_id = file_digest(run_dir.checkpoint_path)
    identity = replay_identity(cfg, options, model_id)
    out = out_dir(run_dir.root, options, identity)
    check_writable(out)
    requests = build_requests(view, cfg.model.max_len, options.max_requests)
    engine_args = {"prefill_chunk": cfg.eval.prefill_chunk, "candidate_chunk": cfg.eval.candidate_chunk,
                   "renormalise": cfg.eval.hstu_normaliser == "kept"}
    native, budget, ratio = _budget(model, options, model_id, requests, view, engine_args)
    if options.allocator != "adaptive":
        top = ratio
    folders = [out / "checkpoints" / f"worker-{w}" for w in range(options.workers)] if options.persistent else []
    _prepare_store(options, folders)
    shares = _shares(native, budget, requests, options.workers)
    tasks = [WorkerTask(cfg=cfg, options=options, identity=identity, worker=w, workers=options.workers,
                        budget=shares[w], top=top, levels=levels, model_id=model_id,
                        folder=str(folders[w]) if folders else None) for w in range(options.workers)]
    threads = options.threads or max(1, torch.get_num_threads() // options.workers)
    bar = tqdm(total=len(requests), desc="serve", unit="request", disable=None if show_progress else True,
               leave=False, smoothing=0.05)
    tic = time.perf_counter()
    try:
        if options.workers == 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                parts = [run_worker(tasks[0], model, view, requests, bar.update)]
            finally:
                torch.set_num_threads(previous)
        else:
            parts = run_workers([_with_threads(t, threads) for t in tasks], requests, len(requests), bar)
    finally:
        bar.close()
    wall = time.perf_counter() - tic
    final = parts[0].store_bytes
    if options.workers > 1 or final < 0:
        with open_store(options.store) as store:
            final = store.nbytes()
    result = _result(cfg, options, view, requests, parts, native, budget, top, final, wall, run_dir.run_id, command,
                     threads)
    result["out"] = str(out)
    _write(out, result, requests, parts)
    return result


def _with_threads(task: WorkerTask, threads: int) -> WorkerTask:
    return replace(task, options=replace(task.options, threads=threads))


def _shares(native: np.ndarray | None, budget: int | None, requests: Requests, workers: int) -> list[int | None]:
    """Each worker's share of the budget: in proportion to its users' Native bytes (they sum to at most it)."""
    if budget is None or native is None:
        return [None] * workers
    if workers == 1:
        return [budget]
    owner = worker_of(np.arange(requests.num_users), workers)
    total = int(native.sum())
    return [int(budget * int(native[owner == w].sum()) // total) for w in range(workers)]


def _result(cfg: RunConfig, options: ServeOptions, view: Any, requests: Requests, parts: list[WorkerPart],
            native: np.ndarray | None, budget: int | None, top: float, final: int, wall: float, run_id: str,
            command: str, threads: int) -> dict[str, Any]:
    logits = np.full(len(requests), np.nan)
    ranks = np.zeros(len(requests), dtype=np.int64)
    for part in parts:
        logits[part.index], ranks[part.index] = part.logits, part.ranks
    meters = RequestMeters.merged([(p.index, p.meters) for p in parts], len(requests))
    sizes = np.sum([p.sizes for p in parts], axis=0)
    counters = {key: sum(int(p.allocator[key]) for p in parts)
                for key in ("recompressions", "requester_cuts", "drops", "not_stored", "peak", "byte_requests",
                            "requests")}
    # the loop's time: the slowest worker's (workers run side by side)
    seconds = max(p.seconds for p in parts)
    result: dict[str, Any] = {
        "command": command, "run_id": run_id, "task": cfg.task, "data": cfg.data.source, "protocol": "feedback"
        if cfg.task == "ctr" else "next-event", "scheme": options.scheme, "knobs": options.knobs,
        "allocator": options.allocator, "budget": options.budget, "budget_bytes": budget,
        "memory_ratio": top if options.allocator != "adaptive" else None,
        "ladder": {"top": top, "bottom": level_ratio(top, 16)} if options.allocator == "adaptive" else None,
        "store": shown_url(options.store), "workers": options.workers, "batch": options.batch,
        "requests": len(requests),
        "users": len(np.unique(requests.user)), "max_requests": options.max_requests,
        "metrics": accuracy(view, requests, logits, ranks, cfg.eval.ks),
        **meters_result(meters, seconds),
        "wall_seconds": wall, "serve_seconds": seconds,
        "served_by_this_process": sum(p.served for p in parts),
        "store_bytes": store_bytes(sizes, requests, counters["peak"],
                                   counters["byte_requests"] / max(counters["requests"], 1), final, native),
        "allocator_counts": {k: counters[k] for k in ("recompressions", "requester_cuts", "drops", "not_stored")},
        "hot_tier": {"bytes": options.hot_bytes, "hits": sum(p.hot_hits for p in parts),
                     "misses": sum(p.hot_misses for p in parts)} if options.hot_bytes else None,
        "environment": {**environment(cfg.device), "threads": threads},
    }
    if options.anchors:
        result["anchors"] = anchors(view, requests, cfg.eval.ks, cfg.eval.mask_history, cfg.train.seed)
    return result


def _write(out: Path, result: dict[str, Any], requests: Requests, parts: list[WorkerPart]) -> None:
    logits = np.full(len(requests), np.nan)
    ranks = np.zeros(len(requests), dtype=np.int64)
    for part in parts:
        logits[part.index], ranks[part.index] = part.logits, part.ranks
    with atomic_file(out / "predictions.npz", "wb") as handle:
        np.savez(handle, user=requests.user, event=requests.event, split=requests.split, label=requests.label,
                 logit=logits, rank=ranks)
    atomic_write_json(out / "result.json", result)


__all__ = ["file_digest", "out_dir", "replay_identity", "serve"]
