"""One worker's replay: its users' requests in order, checkpointed, resumable; several workers in processes.

:func:`run_worker` serves the requests of worker ``w`` of ``W`` (users partitioned by
:func:`~malloc.serve.requests.worker_of`, so a user's requests stay in order in one process) and returns its
:class:`WorkerPart`. With a persistent store it checkpoints every ``checkpoint_every`` requests
(:mod:`malloc.serve.journal`); with ``resume`` it restores the store from the undo log and continues from the
cursor. A worker whose checkpoint is complete is not run again.

:func:`run_workers` starts ``W`` processes (``spawn``: each loads the model and data itself) that share the store
and writes each part to its checkpoint folder; the parent reads them back and shows one progress bar.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from malloc.config import RunConfig
from malloc.data.tasks import CTRView, RetrievalView
from malloc.errors import MallocError
from malloc.models.base import SequentialRecommender
from malloc.serve.allocator import Allocator
from malloc.serve.journal import UndoLog, load_checkpoint, save_checkpoint
from malloc.serve.meters import RequestMeters
from malloc.serve.options import ServeError, ServeOptions
from malloc.serve.requests import Requests, worker_of
from malloc.serve.server import Levels, Server
from malloc.serving.store import HotTier, open_store

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class WorkerTask:
    """What a worker needs besides the model, data and requests (picklable, for a spawned process).

    Attributes:
        cfg: the run's config; options: the replay's; identity: the replay's identity (checked on resume).
        worker, workers: this worker's index and the count; budget: its share of the budget in bytes (None: none).
        top, levels: the ladder (:class:`~malloc.serve.server.Levels`); model_id: the entries' model identity.
        folder: its checkpoint folder (None: an in-process store, no checkpoints).
    """

    cfg: RunConfig
    options: ServeOptions
    identity: dict[str, Any]
    worker: int
    workers: int
    budget: int | None
    top: float
    levels: int
    model_id: str
    folder: str | None


@dataclass
class WorkerPart:
    """A worker's outcome.

    Attributes:
        index: ``(r,)`` int64 the worker's requests as indices into the whole replay's requests.
        meters: their meters; logits, ranks: ``(r,)`` their predictions.
        sizes: ``(U,)`` int64 bytes of each user's entry at the end (0: not stored; only this worker's users).
        allocator: the allocator's counters (:meth:`~malloc.serve.allocator.Allocator.scalars`).
        seconds: wall seconds of this process's serving loop; checkpoint_seconds: of its checkpoints.
        served: requests this process served (fewer than ``r`` after a resume).
        store_bytes: the store's own count of its bytes when the worker ended.
        hot_hits, hot_misses: entries read from the hot tier's memory / from the store (0 without a hot tier).
    """

    index: np.ndarray
    meters: RequestMeters
    logits: np.ndarray
    ranks: np.ndarray
    sizes: np.ndarray
    allocator: dict[str, Any]
    seconds: float
    checkpoint_seconds: float
    served: int
    store_bytes: int
    hot_hits: int = 0
    hot_misses: int = 0


def worker_requests(requests: Requests, worker: int, workers: int) -> np.ndarray:
    """``(r,)`` int64 indices of worker ``worker``'s requests, in serving order."""
    if workers == 1:
        return np.arange(len(requests), dtype=np.int64)
    return np.flatnonzero(worker_of(requests.user, workers) == worker).astype(np.int64)


def next_batch(users: np.ndarray, start: int, size: int) -> list[int]:
    """The requests ``start, start + 1, ...`` served together: at most ``size``, of distinct users (a batch ends
    before a user's second request, so a user's requests stay in order)."""
    batch, seen = [start], {int(users[start])}
    for i in range(start + 1, min(start + size, len(users))):
        user = int(users[i])
        if user in seen:
            break
        batch.append(i)
        seen.add(user)
    return batch


def _arrays(server: Server, allocator: Allocator) -> dict[str, np.ndarray]:
    return {**{f"meters_{k}": v for k, v in server.meters.arrays().items()},
            **{f"alloc_{k}": v for k, v in allocator.arrays().items()},
            "logits": server.logits, "ranks": server.ranks}


def _header(task: WorkerTask, cursor: int, epoch: int, requests: int, allocator: Allocator,
            seconds: float) -> dict[str, Any]:
    return {"version": CHECKPOINT_VERSION, "identity": task.identity, "worker": task.worker,
            "workers": task.workers, "requests": requests, "cursor": cursor, "epoch": epoch,
            "allocator": allocator.scalars(), "seconds": seconds}


def run_worker(task: WorkerTask, model: SequentialRecommender, view: CTRView | RetrievalView, requests: Requests,
               progress: Callable[[int], None] | None = None) -> WorkerPart:
    """Serve worker ``task.worker``'s requests (module docstring); ``progress(n)`` is told of each ``n`` served.

    Raises:
        ServeError: ``resume`` with no checkpoint, or a checkpoint of another replay.
    """
    cfg, options = task.cfg, task.options
    index = worker_requests(requests, task.worker, task.workers)
    mine = requests.take(index)
    allocator = Allocator(options.allocator, requests.num_users, task.budget, int(requests.timestamp[0]),
                          options.decay)
    meters = RequestMeters.empty(len(mine))
    folder = Path(task.folder) if task.folder is not None else None
    cursor, epoch, seconds_before = 0, 0, 0.0
    restored: dict[str, np.ndarray] | None = None
    if folder is not None and options.resume:
        loaded = load_checkpoint(folder)
        if loaded is None:
            raise ServeError(f"nothing to resume: no checkpoint in {folder}; run without --resume")
        header, restored = loaded
        _check_header(folder, header, task, len(mine))
        cursor, epoch, seconds_before = int(header["cursor"]), int(header["epoch"]), float(header["seconds"])
        allocator.restore({k.removeprefix("alloc_"): v for k, v in restored.items() if k.startswith("alloc_")},
                          header["allocator"])
        meters = RequestMeters.from_arrays({k.removeprefix("meters_"): v for k, v in restored.items()
                                            if k.startswith("meters_")})
    elif folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    store = open_store(options.store)
    undo = UndoLog(folder, epoch) if folder is not None else None
    try:
        if undo is not None and options.resume:
            undo.restore(store)
        if options.hot_bytes:
            store = HotTier(store, options.hot_bytes)
        levels = Levels(model, options.scheme, options.knobs, task.top, task.levels, task.model_id,
                        {"prefill_chunk": cfg.eval.prefill_chunk, "candidate_chunk": cfg.eval.candidate_chunk,
                         "renormalise": cfg.eval.hstu_normaliser == "kept"})
        server = Server(levels, allocator, store, view.sequences, mine, isinstance(view, RetrievalView),
                        cfg.eval.mask_history, options.allocator == "adaptive", undo, meters)
        if restored is not None:
            server.logits[:], server.ranks[:] = restored["logits"], restored["ranks"]
        if progress is not None and cursor:
            progress(cursor)
        served, checkpoint_seconds = 0, 0.0
        every = options.checkpoint_every or max(1000, len(mine) // 100)
        with torch.no_grad():
            tic = time.perf_counter()
            i = cursor
            while i < len(mine):
                batch = next_batch(mine.user, i, options.batch)
                server.serve(batch, [int(index[k]) for k in batch])
                served += len(batch)
                i = batch[-1] + 1
                if progress is not None:
                    progress(len(batch))
                if undo is not None and i // every > batch[0] // every and i < len(mine):
                    start = time.perf_counter()
                    epoch += 1
                    save_checkpoint(folder, _header(task, i, epoch, len(mine), allocator,
                                                    seconds_before + start - tic - checkpoint_seconds),
                                    _arrays(server, allocator))
                    undo.advance(epoch)
                    checkpoint_seconds += time.perf_counter() - start
            seconds = time.perf_counter() - tic - checkpoint_seconds
        if undo is not None:  # the final checkpoint: the worker's part, complete
            save_checkpoint(folder, _header(task, len(mine), epoch + 1, len(mine), allocator, seconds_before + seconds),
                            _arrays(server, allocator))
            undo.advance(epoch + 1)
        store_bytes = store.nbytes()
        hot_hits, hot_misses = (store.hits, store.misses) if isinstance(store, HotTier) else (0, 0)
    finally:
        if undo is not None:
            undo.close()
        store.close()
    return WorkerPart(index=index, meters=server.meters, logits=server.logits, ranks=server.ranks,
                      sizes=allocator.size.copy(), allocator=allocator.scalars(), seconds=seconds_before + seconds,
                      checkpoint_seconds=checkpoint_seconds, served=served, store_bytes=store_bytes,
                      hot_hits=hot_hits, hot_misses=hot_misses)


def _check_header(folder: Path, header: dict[str, Any], task: WorkerTask, requests: int) -> None:
    """A checkpoint resumes only the replay that wrote it.

    Raises:
        ServeError: naming the first difference.
    """
    expected = {"version": CHECKPOINT_VERSION, "identity": task.identity, "worker": task.worker,
                "workers": task.workers, "requests": requests}
    for key, value in expected.items():
        if header.get(key) != value:
            stored = header.get(key)
            if isinstance(value, dict) and isinstance(stored, dict):
                diff = sorted(k for k in set(value) | set(stored) if value.get(k) != stored.get(k))
                what = f"{key} differs in {', '.join(diff)}"
            else:
                what = f"{key} is {stored!r}, this replay's is {value!r}"
            raise ServeError(f"{folder}: the checkpoint is of another replay ({what}); rerun with the options it was "
                             "written with, or with --force to start afresh")


def read_part(task: WorkerTask, requests: Requests) -> WorkerPart | None:
    """A worker's part from its complete checkpoint, or None where the checkpoint is missing or incomplete."""
    assert task.folder is not None
    loaded = load_checkpoint(Path(task.folder))
    if loaded is None:
        return None
    header, arrays = loaded
    index = worker_requests(requests, task.worker, task.workers)
    if header.get("identity") != task.identity or header.get("cursor") != len(index):
        return None
    meters = RequestMeters.from_arrays({k.removeprefix("meters_"): v for k, v in arrays.items()
                                        if k.startswith("meters_")})
    return WorkerPart(index=index, meters=meters, logits=arrays["logits"], ranks=arrays["ranks"],
                      sizes=np.asarray(arrays["alloc_size"]), allocator=header["allocator"],
                      seconds=float(header["seconds"]), checkpoint_seconds=0.0, served=0, store_bytes=-1)


# -- processes ---------------------------------------------------------------------------------------------------
def _process_main(task: WorkerTask, counter: Any, errors: Any) -> None:
    """A spawned worker: load the model and data, serve, leave the part in its checkpoint; errors go to the
    parent as one line."""
    from malloc.runner import load_trained
    from malloc.serve.requests import build_requests

    try:
        if task.options.threads:
            torch.set_num_threads(task.options.threads)
        model, view, _ = load_trained(task.cfg)
        requests = build_requests(view, task.cfg.model.max_len, task.options.max_requests)

        def progress(n: int) -> None:
            with counter.get_lock():
                counter.value += n

        run_worker(task, model, view, requests, progress)
        errors.put((task.worker, None, None))
    except MallocError as exc:
        errors.put((task.worker, "user", " ".join(str(exc).split()) or type(exc).__name__))
    except BaseException as exc:  # a bug: the parent raises it with the worker's traceback
        import traceback

        errors.put((task.worker, "bug", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def run_workers(tasks: list[WorkerTask], requests: Requests, total: int, bar: Any) -> list[WorkerPart]:
    """Run each task in its own process (spawned), advance ``bar`` (a tqdm) as they serve, and return their parts
    read back from their checkpoints.

    Raises:
        ServeError: a worker that failed on a user error (its one line), or exited without a result;
        RuntimeError: a worker that failed on anything else (with its traceback).
    """
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    errors = context.Queue()
    processes = [context.Process(target=_process_main, args=(task, counter, errors), daemon=True) for task in tasks]
    for process in processes:
        process.start()
    failures: dict[int, tuple[str | None, str | None]] = {}
    try:
        shown = 0
        while len(failures) < len(tasks):
            try:
                worker, kind, message = errors.get(timeout=0.2)
                failures[worker] = kind, message
            except queue.Empty:
                if all(not p.is_alive() for p in processes) and errors.empty():
                    break
            with counter.get_lock():
                value = counter.value
            bar.update(value - shown)
            shown = value
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
    for worker, (kind, message) in sorted(failures.items()):
        if kind == "bug":
            raise RuntimeError(f"worker {worker} of {len(tasks)} failed: {message}")
        if kind == "user":
            raise ServeError(f"worker {worker} of {len(tasks)}: {message}")
    missing = sorted(set(range(len(tasks))) - set(failures))
    if missing:
        codes = ", ".join(f"worker {w} exit status {processes[w].exitcode}" for w in missing)
        raise ServeError(f"{codes}: ended without a result (killed?); rerun with --resume")
    parts = []
    for task in tasks:
        part = read_part(task, requests)
        if part is None:
            raise ServeError(f"worker {task.worker}: no complete result in {task.folder}; rerun with --resume")
        parts.append(part)
    return parts


__all__ = [
    "CHECKPOINT_VERSION",
    "WorkerPart",
    "WorkerTask",
    "next_batch",
    "read_part",
    "run_worker",
    "run_workers",
    "worker_requests",
]
