"""Running a suite (:mod:`malloc.bench.suite`): every planned item once, resumable, failures recorded.

Every item is served through the serving path on the test split and records (``<out>/items/<item id>.json``,
written atomically, ``<out> = <results>/<suite name>``): metrics, Native's metrics, meters (stored bytes per user
mean/p50/p99, measured memory ratio, analytic MACs per request, of Native and of recomputing the history, batched
and per-request latency, training seconds per epoch, thread count), fidelity to Native and the per-user metric
deltas to Native (for the paired test of :mod:`malloc.eval.statistics`), and the git commit of the code that ran it
(read when the process starts). The Native item also times one user's cached request against recomputing the
history, at the median and the longest history.

The training-free items of one checkpoint share its uncompressed writes (:mod:`malloc.serving.prefill_cache`):
each batch of users is prefilled once per observation kind, and each item pays its own compression, appends and
reads; a policy item's record counts the writes it reused (``prefill_cache``: hits and misses). The results are
bit for bit those of fresh writes (tested).

A failed item records its error (type, first line of the message, traceback) and the suite goes on; a rerun
skips the items whose record says ``done`` and retries the others, so an interrupted suite resumes where it
stopped (a run interrupted mid-training resumes from its ``last.pt``). Training runs live in ``<out>/runs/``;
``<out>/suite.json`` holds the spec, the planned items, the command, the machine, library versions and the git
commit: everything ``malloc report`` needs besides the item records. Progress is logged as ``[i/N]`` with the
elapsed time and an ETA (each remaining item costs the mean time of the items of its kind run so far).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from malloc.bench.meters import request_latency_served
from malloc.bench.suite import Item, Setting, SuiteSpec, plan, select_items
from malloc.config import RunConfig
from malloc.configio import ConfigError, to_dict
from malloc.data.tasks import CTRView, RetrievalView
from malloc.device import environment
from malloc.errors import ResultsError
from malloc.eval.evaluate import evaluate_scheme, native_replay
from malloc.eval.fidelity import fidelity, per_user_delta
from malloc.memory.policy import SchemeError
from malloc.memory.registry import build_architecture, build_policy
from malloc.models import SequentialRecommender
from malloc.profiling.latency import request_latency
from malloc.results import atomic_write_json, check_writable, read_json, read_json_object
from malloc.runner import build_view, load_model, run, run_dir_for
from malloc.serving.engine import Engine
from malloc.serving.prefill_cache import PrefillCache

log = logging.getLogger("malloc.bench")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit(cwd: str | Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the code that runs: the git checkout that holds this package (an editable
    install), or of ``cwd`` when given; both None where git is missing or the package is not a tracked file of a
    checkout (an installed wheel)."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    if cwd is None and git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"commit": None, "dirty": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


@dataclass
class SuiteOutcome:
    """What one ``run_suite`` call did. ``failed``: item id -> one-line error; ``unreachable``: the same for items
    whose scheme cannot reach their ratio or apply to the model (a SchemeError: a documented outcome, not a
    fault)."""

    out_dir: Path
    planned: int = 0
    ran: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class _Loaded:
    """The current setting's data view and trained models, loaded once for all its items, and each model's
    :class:`PrefillCache` (its training-free items share one uncompressed write per batch of users)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.view: CTRView | RetrievalView | None = None
        self.models: dict[str, SequentialRecommender] = {}
        self.prefills: dict[str, PrefillCache] = {}

    def view_for(self, cfg: RunConfig) -> CTRView | RetrievalView:
        key = (cfg.task, json.dumps(to_dict(cfg.data), sort_keys=True))
        if key != self.key:
            self.key, self.view, self.models, self.prefills = key, build_view(cfg), {}, {}
        assert self.view is not None
        return self.view

    def prefill_cache_for(self, cfg: RunConfig) -> PrefillCache:
        model = self.model_for(cfg)
        run_id = run_dir_for(cfg).run_id
        if run_id not in self.prefills or self.prefills[run_id].model is not model:
            self.prefills[run_id] = PrefillCache(model)
        return self.prefills[run_id]

    def model_for(self, cfg: RunConfig) -> SequentialRecommender:
        view = self.view_for(cfg)
        run_dir = run_dir_for(cfg)
        if run_dir.run_id not in self.models:
            self.models[run_dir.run_id] = load_model(cfg, view.sequences.num_items, run_dir.checkpoint_path)
        return self.models[run_dir.run_id]


class SuiteRunner:
    """Runs the items of a suite into ``<results_dir>/<suite name>/``.

    Args:
        spec: the suite.
        results_dir: root of results.
        force: rerun every item (and retrain every run) even if done.
        data_paths: data set label -> path (for data sets with ``needs_path``).
        command: the command line to record (default: this process's).
        show_progress: progress bars of training and replays (terminal only).
        shard: ``(i, n)``: run only the items whose plan index is ``i`` modulo ``n``. ``n`` processes with
            ``i = 0..n-1`` sharing the results folder run the whole suite between them (on one machine's cores and
            GPU, or on the nodes of a cluster with a shared file system); a training run several of them need is
            trained once under its lock (:meth:`~malloc.results.RunDir.lock`) while the others wait.
        only: item-id globs (:func:`~malloc.bench.suite.select_items`): run only the matching items of the shard,
            in the order of the patterns (``["*-r0.25", "*"]``: every ratio-1/4 item first, then the rest).
    """

    def __init__(self, spec: SuiteSpec, results_dir: str | Path = "results", force: bool = False,
                 data_paths: Mapping[str, str] | None = None, command: str | None = None,
                 show_progress: bool = False, shard: tuple[int, int] = (0, 1), only: Sequence[str] = ()) -> None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
        self.spec = spec
        self.out_dir = Path(results_dir) / spec.name
        self.force = force
        self.show_progress = show_progress
        self.command = command if command is not None else " ".join(["malloc", *sys.argv[1:]])
        self.items = plan(spec, results_dir, data_paths)
        if not self.items:
            raise ConfigError(f"suite {spec.name} plans no items: every data set needs a path (give --data "
                              f"{next(iter(spec.datasets))}=PATH)")
        self.shard_items = select_items([item for k, item in enumerate(self.items) if k % count == index], only,
                                        among=self.items)
        self.skipped_datasets = sorted(set(spec.datasets) - {i.setting.dataset for i in self.items})
        self._loaded = _Loaded()
        self._forced: set[str] = set()
        self.git = git_commit()  # the code this process imported; the checkout may move on while the suite runs

    def record_path(self, item: Item) -> Path:
        return self.out_dir / "items" / f"{item.id}.json"

    def is_done(self, item: Item) -> bool:
        """Whether the item's record says done and a report can use it (a corrupt one is logged and rerun)."""
        record = read_json_object(self.record_path(item))
        if record is None or record.get("status") != "done":
            return False
        problem = record_problem(record, item.describe())
        if problem is not None:
            log.warning("%s: %s; rerunning the item", self.record_path(item), problem)
        return problem is None

    def write_manifest(self) -> None:
        atomic_write_json(self.out_dir / "suite.json", {
            "suite": to_dict(self.spec), "command": self.command, "started_at": _now(), "git": self.git,
            "environment": environment(), "items": [item.describe() for item in self.items],
            "skipped_datasets": self.skipped_datasets,
            "runs": {item.setting.key: {"config": to_dict(item.setting.cfg)} for item in self.items
                     if item.kind == "native"},
        })

    def run(self, on_item: Callable[[Item], None] | None = None) -> SuiteOutcome:
        """Run every item not yet done; returns what happened. ``on_item`` is called before each item runs."""
        outcome = SuiteOutcome(self.out_dir, planned=len(self.shard_items))
        check_writable(self.out_dir)
        check_writable(self.out_dir / "runs")
        self.write_manifest()
        if self.skipped_datasets:
            log.info("%s: data sets without a path, left out: %s (give --data NAME=PATH)", self.spec.name,
                     ", ".join(self.skipped_datasets))
        started = time.perf_counter()
        durations: dict[str, list[float]] = {}
        total = len(self.shard_items)
        pending = [self.force or not self.is_done(item) for item in self.shard_items]
        for index, item in enumerate(self.shard_items, start=1):
            if not pending[index - 1]:
                outcome.skipped += 1
                continue
            if on_item is not None:
                on_item(item)
            log.info("[%d/%d] %s ...", index, total, item.id)
            tic = time.perf_counter()
            record = self._attempt(item)
            seconds = time.perf_counter() - tic
            record["seconds"] = seconds
            atomic_write_json(self.record_path(item), record)
            durations.setdefault(item.kind, []).append(seconds)
            outcome.ran += 1
            if record["status"] != "done":
                error = f"{record['error']['type']}: {record['error']['message']}"
                (outcome.unreachable if record["error"]["type"] == "SchemeError" else outcome.failed)[item.id] = error
            eta = _eta([i for i, todo in zip(self.shard_items[index:], pending[index:], strict=True) if todo],
                       durations)
            status = "done" if record["status"] == "done" else (
                f"FAILED ({outcome.failed[item.id]})" if item.id in outcome.failed
                else f"not reachable ({outcome.unreachable[item.id]})")
            log.info("[%d/%d] %s %s in %.1f s; elapsed %s, ETA %s", index, total, item.id, status, seconds,
                     _clock(time.perf_counter() - started), _clock(eta))
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _attempt(self, item: Item) -> dict[str, Any]:
        record: dict[str, Any] = {**item.describe(), "started_at": _now()}
        try:
            if item.plan_error is not None:
                raise SchemeError(item.plan_error)
            threads = item.setting.cfg.train.threads
            if threads:
                torch.set_num_threads(threads)
            record.update(self._execute(item))
            record["status"] = "done"
        except Exception as exc:  # recorded; the suite goes on
            record["status"] = "failed"
            record["error"] = {"type": type(exc).__name__, "message": str(exc).splitlines()[0] if str(exc) else "",
                               "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
            log.debug("item %s failed", item.id, exc_info=True)
        record["environment"] = environment(item.setting.cfg.device)
        record["git"] = self.git  # a resumed suite may span commits; each record names the one it ran at
        record["finished_at"] = _now()
        return record

    def _execute(self, item: Item) -> dict[str, Any]:
        if item.kind == "native":
            return self._native(item)
        if item.kind == "policy":
            return self._policy(item)
        return self._trained(item)

    # -- the three kinds --------------------------------------------------------------------------------------
    def _train(self, cfg: RunConfig) -> dict[str, Any]:
        """:func:`malloc.runner.run` (forced once per suite call with ``force``)."""
        run_id = run_dir_for(cfg).run_id
        force = self.force and run_id not in self._forced
        self._forced.add(run_id)
        if force:
            self._loaded.models.pop(run_id, None)
        result = run(cfg, force=force, show_progress=self.show_progress)
        return {**result, "metrics": task_metrics(result["metrics"])}

    def _native_run(self, setting: Setting) -> dict[str, Any]:
        """The setting's Native run, trained if missing (a done run is read back, its identity checked)."""
        return self._train(setting.cfg)

    def _latency(self, cfg: RunConfig, model: SequentialRecommender, policy: Any = None,
                 prefill_cache: PrefillCache | None = None) -> dict[str, Any]:
        engine = Engine(model, policy, prefill_chunk=cfg.eval.prefill_chunk, candidate_chunk=cfg.eval.candidate_chunk,
                        renormalise=cfg.eval.hstu_normaliser == "kept", prefill_cache=prefill_cache)
        return request_latency_served(engine, self._loaded.view_for(cfg), "test", cfg.model.max_len,
                                      self.spec.latency, seed=cfg.train.seed)

    def _native(self, item: Item) -> dict[str, Any]:
        cfg = item.setting.cfg
        result = self._native_run(item.setting)
        model = self._loaded.model_for(cfg)
        view = self._loaded.view_for(cfg)
        # the latency users' Native writes are the ones a policy that observes nothing compresses: shared
        meters = {**result["meters"], **self._latency(cfg, model, prefill_cache=self._loaded.prefill_cache_for(cfg))}
        # cached request against recomputing the history, one user at the median and the longest history
        lengths = np.minimum(view.sequences.lengths, cfg.model.max_len)
        recompute = [request_latency(model, history_len=int(n), candidates=self.spec.latency.candidates,
                                     append_events=1, prefill_chunk=cfg.eval.prefill_chunk, warmup=1,
                                     min_repeats=3, min_seconds=0.0, max_repeats=3)
                     for n in sorted({int(np.median(lengths)), int(lengths.max())})]
        meters["recompute_latency"] = recompute
        return {"run_id": result["run_id"], "metrics": result["metrics"], "native_metrics": result["metrics"],
                "meters": meters, "fidelity": {}, "knobs_in_force": {}, "anchors": result.get("anchors", {})}

    def _policy(self, item: Item) -> dict[str, Any]:
        cfg = item.setting.cfg
        policy = build_policy(item.scheme, item.ratios[0], **item.knobs)  # an unreachable ratio fails here
        native = self._native_run(item.setting)
        model = self._loaded.model_for(cfg)
        prefills = self._loaded.prefill_cache_for(cfg)
        hits, misses = prefills.hits, prefills.misses
        result = evaluate_scheme(cfg, model, self._loaded.view_for(cfg), "test", policy, item.scheme, item.knobs,
                                 run_dir_for(cfg).root, prefill_cache=prefills)
        meters = {**result["meters"], **self._latency(cfg, model, policy, prefills),
                  "train_seconds_per_epoch": native["meters"].get("train_seconds_per_epoch")}
        return {"run_id": native["run_id"], "metrics": result["metrics"], "native_metrics": native["metrics"],
                "meters": meters, "fidelity": result["fidelity"], "per_user": result["per_user"],
                "policy": result["policy"], "knobs_in_force": item.knobs,
                "prefill_cache": {"hits": prefills.hits - hits, "misses": prefills.misses - misses}}

    def _trained(self, item: Item) -> dict[str, Any]:
        native_cfg = item.setting.cfg
        cfg = replace(native_cfg, name=f"{native_cfg.name}-{item.label}",
                      model=replace(native_cfg.model, scheme=item.scheme, memory_ratio=item.ratios[0],
                                    knobs=item.knobs))
        native = self._native_run(item.setting)
        result = self._train(cfg)
        view = self._loaded.view_for(cfg)
        model = self._loaded.model_for(cfg)
        # each run's test replay, saved by the run (or by this call where a run predates saving it)
        mine = native_replay(cfg, model, view, "test", run_dir_for(cfg).root)
        reference = native_replay(native_cfg, self._loaded.model_for(native_cfg), view, "test",
                                  run_dir_for(native_cfg).root)
        arch = build_architecture(cfg.model)
        return {"run_id": result["run_id"], "metrics": result["metrics"], "native_metrics": native["metrics"],
                "meters": {**result["meters"], **self._latency(cfg, model)},
                "fidelity": fidelity(view, "test", mine, reference),
                "per_user": per_user_delta(view, "test", mine, reference),
                "knobs_in_force": {} if arch is None else arch.knob_values(cfg.model)}


def _eta(todo: Sequence[Item], durations: dict[str, list[float]]) -> float:
    """Seconds left: each item costs the mean of the items of its kind run so far (a trained-in item, before any
    ran, what a Native item cost: both are a training run; otherwise the mean of every item)."""
    every = [s for values in durations.values() for s in values]
    means = {kind: float(np.mean(values)) for kind, values in durations.items()}
    if "trained" not in means and "native" in means:
        means["trained"] = means["native"]
    fallback = float(np.mean(every)) if every else 0.0
    return sum(means.get(item.kind, fallback) for item in todo)


def task_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a ``metrics.json`` (leaves out the split name and the validation history)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_MANIFEST_KEYS = {"suite": dict, "command": str, "started_at": str, "git": dict, "environment": dict, "items": list}
_TASK_METRICS = {"ctr": ("auc", "gauc", "logloss"), "retrieval": ("hr@10", "ndcg@10", "mrr")}
_PLANNED_KEYS = ("item", "label", "family", "dataset", "backbone", "task")
FAMILIES = ("reference", "training-free", "trained-in")


def read_suite(out_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``suite.json`` and the item records of a suite's results folder, in the manifest's order.

    A planned item without a record is returned as ``{"status": "missing", ...}``; a record that is not readable
    JSON, or whose numbers are impossible (:func:`record_problem`), as ``{"status": "unreadable", "error": ...}``
    with the item's planned description, so a report lists it and reports the rest.

    Raises:
        ResultsError: the folder has no ``suite.json``, or it is not a suite manifest.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "suite.json"
    if not manifest_path.is_file():
        raise ResultsError(f"{out_dir} is not a suite's results folder (no suite.json): run `malloc bench --suite "
                           "NAME` first and pass <results>/<NAME>")
    manifest = read_json(manifest_path)
    wrong = [key for key, kind in _MANIFEST_KEYS.items()
             if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind)]
    if wrong:
        raise ResultsError(f"{manifest_path}: not a suite manifest (missing or malformed: {', '.join(wrong)})")
    for index, planned in enumerate(manifest["items"]):
        missing = [key for key in _PLANNED_KEYS if not isinstance(planned, dict) or not isinstance(planned.get(key),
                                                                                                  str)]
        if missing:
            raise ResultsError(f"{manifest_path}: items[{index}] is not a planned item (missing or malformed: "
                               f"{', '.join(missing)})")
    if not manifest["items"]:
        raise ResultsError(f"{manifest_path}: the suite plans no items")
    records = []
    for planned in manifest["items"]:
        path = out_dir / "items" / f"{planned['item']}.json"
        if not path.is_file():
            records.append({**planned, "status": "missing"})
            continue
        try:
            record = read_json(path)
            problem = record_problem(record, planned)
        except ResultsError as exc:
            problem = str(exc)
        if problem is not None:
            log.warning("%s: %s; listed as unreadable", path, problem)
            record = {**planned, "status": "unreadable", "error": {"type": "unreadable record", "message": problem}}
        records.append(record)
    return manifest, records


def record_problem(record: Any, planned: Mapping[str, Any]) -> str | None:
    """What makes an item record unusable by a report, or None: not an object, another item's record, one made
    under another config of its setting (the suite file changed: the item reruns), or (for a done record) a task
    metric or a meter that is missing, not a number, or out of its range (memory ratio and bytes > 0, MACs and
    latencies >= 0, metrics in [0, 1] but logloss >= 0)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if record.get("item") != planned["item"]:
        return f"the record is of item {record.get('item')!r}"
    if "config" in planned and record.get("config") != planned["config"]:
        return (f"the record was made under another config of its setting ({record.get('config')!r}, planned "
                f"{planned['config']!r}): the suite file changed since")
    for key in _PLANNED_KEYS:
        if not isinstance(record.get(key), str):
            return f"{key} is {record.get(key)!r}, expected a string"
    if record["family"] not in FAMILIES:
        return f"family is {record['family']!r}, expected one of {', '.join(FAMILIES)}"
    targets = record.get("memory_ratio_targets")
    if not isinstance(targets, list) or not targets or not all(_number(r) and 0 < r <= 1 for r in targets):
        return f"memory_ratio_targets is {targets!r}, expected a list of numbers in (0, 1]"
    if record.get("status") != "done":
        error = record.get("error")
        if not isinstance(error, dict) or not {"type", "message"} <= set(error):
            return f"a {record.get('status')!r} record without an error type and message"
        return None
    for part in ("metrics", "native_metrics", "meters", "fidelity"):
        if not isinstance(record.get(part), dict):
            return f"no {part} object"
    for name in _TASK_METRICS.get(planned["task"], ()):
        for part in ("metrics", "native_metrics"):
            value = record[part].get(name)
            limit = math.inf if name == "logloss" else 1.0
            if not _number(value) or not 0.0 <= value <= limit:
                return f"{part}.{name} is {value!r}, expected a number in [0, {limit:g}]"
    meters = record["meters"]
    for name, low in (("memory_ratio", 0.0), ("state_bytes_mean", 0.0)):
        if not _number(meters.get(name)) or not meters[name] > low:
            return f"meters.{name} is {meters.get(name)!r}, expected a number > {low:g}"
    for name in ("macs_per_request", "request_ms_p50", "request_ms_p99", "batched_request_ms_p50"):
        if name in meters and meters[name] is not None and not (_number(meters[name]) and meters[name] >= 0):
            return f"meters.{name} is {meters[name]!r}, expected a number >= 0"
    per_user = record.get("per_user")
    if per_user is not None:
        users, delta = (per_user.get(k) if isinstance(per_user, dict) else None for k in ("users", "delta"))
        if (not isinstance(users, list) or not isinstance(delta, list) or len(users) != len(delta)
                or not all(isinstance(u, int) for u in users)
                or not all(d is None or isinstance(d, (int, float)) for d in delta)):
            return "per_user is not two lists (users, delta) of the same length"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
