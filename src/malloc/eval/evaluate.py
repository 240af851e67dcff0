"""Evaluation through the serving path: task metrics plus the meters of the replay.

:func:`evaluate` replays a split under one cache policy (Native by default). :func:`evaluate_scheme` replays it
under a memory scheme *and* under Native on the same users, and reports accuracy, meters (bytes, measured memory
ratio, latency, analytic MACs) and fidelity to Native (:mod:`malloc.eval.fidelity`). Native's predictions are
cached per run directory (``schemes/native-predictions-<split>.npz``) so a sweep computes them once.
:func:`forward_metrics` computes the replay's numbers with one batched full forward (validation during training).

In a torchrun job (``world``, :mod:`malloc.distributed`) both split the work over the ranks and gather the
per-row and per-user results on every rank: each rank computes the same batches of users that one process would
(every ``size``-th batch of the same order), so every prediction, and so every metric, equals the single process's
bit for bit with the same thread count; only the timings differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from malloc.config import EvalConfig, RunConfig
from malloc.configio import config_hash, to_dict
from malloc.data.batching import ctr_batch, history_tokens
from malloc.data.sequences import CTRRows, Sequences
from malloc.data.tasks import CTRView, RetrievalView, Window
from malloc.distributed import World
from malloc.eval.fidelity import FIDELITY_TOP_K, fidelity, per_user_delta
from malloc.eval.metrics import ctr_metrics, history_exclusion, retrieval_metrics, target_ranks
from malloc.eval.replay import (
    KeepLast,
    Replay,
    ReplayMeters,
    _user_groups,
    per_user_arrays,
    replay_ctr,
    replay_retrieval,
)
from malloc.memory.architecture import native_event_bytes
from malloc.memory.policy import CachePolicy
from malloc.models import ModelConfig, SequentialRecommender
from malloc.models.macs import recompute_macs, request_macs
from malloc.serving.engine import Engine
from malloc.serving.prefill_cache import PrefillCache


def replay(cfg: RunConfig, model: SequentialRecommender, view: CTRView | RetrievalView, split: str,
           policy: CachePolicy | None = None, keep_last: KeepLast | None = None,
           prefill_cache: PrefillCache | None = None, world: World | None = None) -> Replay:
    """Replay split ``split`` through an :class:`~malloc.serving.engine.Engine` under ``policy`` (None: Native) and
    score it.

    ``keep_last`` truncates each written history to its most recent events (:mod:`malloc.eval.replay`);
    ``prefill_cache`` shares uncompressed writes with other replays of ``model`` (the result is the same);
    ``world``: every rank of a torchrun job calls it, serves its share of the user batches and returns the whole
    replay (module docstring).
    """
    was_training = model.training
    engine = Engine(model, policy, prefill_chunk=cfg.eval.prefill_chunk, candidate_chunk=cfg.eval.candidate_chunk,
                    renormalise=cfg.eval.hstu_normaliser == "kept", prefill_cache=prefill_cache)
    try:
        if isinstance(view, CTRView):
            rows = view.split(split)
            if world is None:
                logits, meters = replay_ctr(engine, view.sequences, rows, cfg.model.max_len, cfg.eval.user_batch,
                                            keep_last=keep_last, protocol=cfg.eval.protocol)
            else:
                mine = _rank_rows(rows, cfg.eval.user_batch, world)
                part, meters = replay_ctr(engine, view.sequences, rows.select(mine), cfg.model.max_len,
                                          cfg.eval.user_batch, keep_last=keep_last, protocol=cfg.eval.protocol)
                logits = np.zeros(len(rows), dtype=np.float64)
                logits[mine] = part
                logits = world.all_reduce_sum(logits, "gathering the replay's logits")
                meters = _gather_meters(meters, np.arange(view.sequences.num_users), world)
            metrics = ctr_metrics(rows.user, rows.label, logits)
            metrics["rows"] = len(rows)
            return Replay(metrics, meters.summary(), logits=logits, requests=meters.requests, **per_user_arrays(meters))
        if world is None:
            ranks, meters, top = replay_retrieval(engine, view.sequences, view.target_index(split),
                                                  cfg.model.max_len, cfg.eval.append_events, cfg.eval.user_batch,
                                                  cfg.eval.mask_history, top_k=FIDELITY_TOP_K, keep_last=keep_last)
        else:
            ranks, meters, top = _replay_retrieval_share(cfg, engine, view, split, keep_last, world)
        metrics = retrieval_metrics(ranks, cfg.eval.ks)
        metrics["users"] = len(ranks)
        return Replay(metrics, meters.summary(), ranks=ranks, top=top, requests=meters.requests,
                      **per_user_arrays(meters))
    finally:
        model.train(was_training)


def _rank_rows(rows: CTRRows, user_batch: int, world: World) -> np.ndarray:
    """``(R_rank,)`` the indices of the rows of this rank's users: those of every ``world.size``-th batch of
    ``user_batch`` users, in the serving order of :func:`~malloc.eval.replay.replay_ctr`. The replay of these rows
    alone serves exactly those batches: a subset keeps the order of the whole (longest history, then user)."""
    _, users, _, serving_order = _user_groups(rows)
    batches = [serving_order[i:i + user_batch] for i in range(0, len(serving_order), user_batch)]
    mine = np.concatenate([np.zeros(0, dtype=np.int64), *batches[world.rank::world.size]])
    return np.flatnonzero(np.isin(rows.user, users[mine]))


def _replay_retrieval_share(cfg: RunConfig, engine: Engine, view: RetrievalView, split: str,
                            keep_last: KeepLast | None, world: World) -> tuple[np.ndarray, ReplayMeters, np.ndarray]:
    """:func:`~malloc.eval.replay.replay_retrieval` of this rank's users (every ``world.size``-th batch of its
    serving order, by target index), gathered: ``(U,)`` ranks, the meters of every user, ``(U, k)`` top items."""
    seqs, target = view.sequences, view.target_index(split)
    order = np.argsort(target, kind="stable")
    batches = [order[i:i + cfg.eval.user_batch] for i in range(0, len(order), cfg.eval.user_batch)]
    users = np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *batches[world.rank::world.size]]))
    part, meters, part_top = replay_retrieval(engine, _select_users(seqs, users), target[users], cfg.model.max_len,
                                              cfg.eval.append_events, cfg.eval.user_batch, cfg.eval.mask_history,
                                              top_k=FIDELITY_TOP_K, keep_last=keep_last)
    ranks = np.zeros(seqs.num_users, dtype=np.int64)
    ranks[users] = part
    top = np.zeros((seqs.num_users, part_top.shape[1]), dtype=np.int64)
    top[users] = part_top
    ranks = world.all_reduce_sum(ranks, "gathering the replay's ranks")
    top = world.all_reduce_sum(top, "gathering the replay's top items")
    return ranks, _gather_meters(meters, users, world), top


def _select_users(seqs: Sequences, users: np.ndarray) -> Sequences:
    """The histories of ``users`` (ascending) alone, as a :class:`Sequences` of ``len(users)`` users (the
    catalogue unchanged)."""
    lengths = seqs.lengths[users]
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    events = np.repeat(seqs.offsets[users] - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    return Sequences(name=seqs.name, offsets=offsets, items=seqs.items[events], timestamps=seqs.timestamps[events],
                     labels=seqs.labels[events], num_items=seqs.num_items, user_ids=seqs.user_ids[users],
                     item_ids=seqs.item_ids)


def _gather_meters(meters: ReplayMeters, users: np.ndarray, world: World) -> ReplayMeters:
    """Every rank's meters in one, on every rank; ``users`` maps this rank's served user indices (as its replay
    numbered them) to the data set's."""
    gathered = ReplayMeters()
    lists = {"users": np.asarray(users, dtype=np.int64)[np.asarray(meters.users, dtype=np.int64)],
             "state_bytes": np.asarray(meters.state_bytes, dtype=np.int64),
             "state_tokens": np.asarray(meters.state_tokens, dtype=np.int64),
             "request_seconds": np.asarray(meters.request_seconds, dtype=np.float64),
             "layer_bytes": np.asarray(meters.layer_bytes, dtype=np.int64),
             "layer_tokens": np.asarray(meters.layer_tokens, dtype=np.float64),
             "history_events": np.asarray(meters.history_events, dtype=np.int64)}
    for name, values in lists.items():
        parts = world.all_gather(values, f"gathering the replay's {name}")
        setattr(gathered, name, [v.item() for part in parts for v in part])
    gathered.requests = int(world.all_reduce_sum(np.array([meters.requests], dtype=np.int64))[0])
    return gathered


# tokens x tokens per batch of the full-forward evaluation (bounds its attention temporaries)
FORWARD_BUDGET = 1 << 22


def forward_metrics(cfg: RunConfig, model: SequentialRecommender, view: CTRView | RetrievalView, split: str,
                    world: World | None = None) -> dict[str, float]:
    """The metrics :func:`replay` reports for ``split`` with no cache policy, computed with the full forward.

    Each user's replay (write the ``max_len`` events before the window, append the rest, score) is one window of the
    plain forward over the same events (under the blind protocol, the window's own events without labels) with the
    rows as candidate tokens; an uncompressed state, or a trained-in scheme's own state, serves exactly that forward
    (tested), so the numbers are the same, at the cost of one batched forward instead of one append per step.
    Training uses it for validation; reported test numbers always go through :func:`replay`. ``world``: each rank
    of a torchrun job computes every ``world.size``-th batch and the results are summed over the ranks (each row
    or user filled by one rank, zeros elsewhere: an exact gather).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(view, CTRView):
                return _forward_ctr(cfg, model, view, split, world)
            return _forward_retrieval(cfg, model, view, split, world)
    finally:
        model.train(was_training)


def _forward_batches(lengths: np.ndarray) -> list[np.ndarray]:
    """Indices of windows sorted by length, cut so that each batch holds at most :data:`FORWARD_BUDGET` token
    pairs (padded)."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for stop in range(1, len(order) + 1):
        if stop == len(order) or (stop + 1 - start) * int(lengths[order[stop]]) ** 2 > FORWARD_BUDGET:
            batches.append(order[start:stop])
            start = stop
    return batches


def _share(batches: list[np.ndarray], world: World | None) -> list[np.ndarray]:
    """This rank's batches: every ``world.size``-th from its rank on (all of them without a world)."""
    return batches if world is None else batches[world.rank::world.size]


def _forward_ctr(cfg: RunConfig, model: SequentialRecommender, view: CTRView, split: str, world: World | None
                 ) -> dict[str, float]:
    rows = view.split(split)
    order = np.lexsort((rows.history_len, rows.user))
    users, first = np.unique(rows.user[order], return_index=True)
    bounds = np.append(first, len(order))
    picked = np.split(order, bounds[1:-1])
    window_start = np.array([max(0, int(rows.history_len[p[0]]) - cfg.model.max_len) for p in picked])
    window_stop = np.array([int(rows.history_len[p[-1]]) for p in picked])
    blind = cfg.eval.protocol == "blind"
    logits = np.zeros(len(rows), dtype=np.float64)
    device = model.device
    for batch in _share(_forward_batches(window_stop - window_start + np.array([len(p) for p in picked])), world):
        windows_ = [Window(int(users[b]), int(window_start[b]), int(window_stop[b])) for b in batch]
        chosen = [picked[b] for b in batch]
        blind_from = np.array([int(rows.history_len[p[0]]) - w.start for p, w in zip(chosen, windows_, strict=True)])
        tokens = ctr_batch(view.sequences, windows_, rows, chosen, blind_from if blind else None).to(device)
        scores = model.ctr_logits(model(tokens.tokens), tokens.tokens.items)[tokens.target_mask]
        logits[np.concatenate(chosen)] = scores.double().cpu().numpy()
    if world is not None:
        logits = world.all_reduce_sum(logits, "gathering the validation logits")
    return ctr_metrics(rows.user, rows.label, logits)


def _forward_retrieval(cfg: RunConfig, model: SequentialRecommender, view: RetrievalView, split: str,
                       world: World | None) -> dict[str, float]:
    seqs = view.sequences
    stop = view.target_index(split)
    start = np.maximum(0, stop - cfg.model.max_len)
    ranks = np.zeros(seqs.num_users, dtype=np.int64)
    device = model.device
    for batch in _share(_forward_batches(stop - start), world):
        tokens = history_tokens(seqs, [Window(int(u), int(start[u]), int(stop[u])) for u in batch]).to(device)
        hidden = model(tokens)
        last = torch.as_tensor(stop[batch] - start[batch] - 1, device=device)
        scores = model.item_logits(hidden[torch.arange(len(batch), device=device), last])
        targets = torch.as_tensor(seqs.items[seqs.offsets[batch] + stop[batch]], device=device)
        exclude = (history_exclusion(seqs, batch, stop[batch], scores.shape[1], device)
                   if cfg.eval.mask_history else None)
        ranks[batch] = target_ranks(scores, targets, exclude)
    if world is not None:
        ranks = world.all_reduce_sum(ranks, "gathering the validation ranks")
    return retrieval_metrics(ranks, cfg.eval.ks)


def evaluate(cfg: RunConfig, model: SequentialRecommender, view: CTRView | RetrievalView, split: str,
             policy: CachePolicy | None = None) -> dict:
    """Replay split ``split`` ("valid" or "test") through an :class:`~malloc.serving.engine.Engine` under ``policy``
    and score it.

    Returns:
        ``{"metrics": {...}, "meters": {...}}``; CTR metrics are auc, gauc, logloss; retrieval metrics are
        hr@K, ndcg@K, mrr. The meters include the model's own cost next to Native's (:func:`model_meters`).
    """
    result = replay(cfg, model, view, split, policy)
    return {"metrics": result.metrics, "meters": {**result.meters, **model_meters(cfg, model, view, split, result)}}


def model_meters(cfg: RunConfig, model: SequentialRecommender, view: CTRView | RetrievalView, split: str,
                 result: Replay) -> dict[str, Any]:
    """What the model's own architecture stores and computes, against a Native model of the same size.

    ``memory_ratio`` is the stored layers' bytes over the bytes Native's layers would store for the same users'
    histories (:func:`native_layer_bytes`); MACs are the analytic costs of a mean request of the split (the
    scheme's own formula), of Native's, and of recomputing the history.
    """
    shape = _request_shape(cfg, view, split)
    history = float(result.history_events.mean()) if len(result.history_events) else 0.0
    scheme = model.scheme
    keys = history if scheme is None else scheme.stored_keys(cfg.model, round(history))
    native = np.array([native_layer_bytes(cfg.model, int(n)) for n in result.history_events], dtype=np.int64)
    return {
        "scheme": cfg.model.scheme,
        "scheme_knobs": {} if scheme is None else scheme.knob_values(cfg.model),
        "history_events_mean": history,
        "layer_bytes_mean": float(result.layer_bytes.mean()) if len(result.layer_bytes) else 0.0,
        "native_layer_bytes_mean": float(native.mean()) if len(native) else 0.0,
        "memory_ratio": _ratio(result.layer_bytes, native),
        "macs_per_request": request_macs(cfg.model, keys, **shape, scheme=scheme,
                                         history_len=None if scheme is None else round(history)),
        "native_macs_per_request": request_macs(cfg.model, history, **shape),
        "recompute_macs_per_request": recompute_macs(cfg.model, round(history), shape["new_events"],
                                                     shape["candidates"], cfg.eval.prefill_chunk,
                                                     shape["candidate_chunk"], shape["catalogue"],
                                                     shape.get("candidate_times")),
        "macs_request_shape": shape,
    }


def native_layer_bytes(cfg: ModelConfig, history_len: int) -> int:
    """Bytes a Native model of ``cfg``'s size stores in its layers for ``history_len`` events."""
    return cfg.layers * history_len * native_event_bytes(cfg)


# -- schemes ------------------------------------------------------------------------------------------------------
def scheme_result_path(run_root: str | Path, name: str, memory_ratio: float, knobs: dict[str, Any],
                       split: str = "test", eval_cfg: EvalConfig | None = None) -> Path:
    """``<run>/schemes/<name>-r<ratio>[-<knob hash>][-e<eval hash>][-<split>].json``: the eval hash only when the
    evaluation settings differ from the defaults, the split only when not "test"."""
    stem = f"{name}-r{memory_ratio:g}"
    if knobs:
        stem += f"-{config_hash(knobs)}"
    if eval_cfg is not None and eval_cfg != EvalConfig():
        stem += f"-e{config_hash(eval_cfg)}"
    if split != "test":
        stem += f"-{split}"
    return Path(run_root) / "schemes" / f"{stem}.json"


def native_predictions_path(run_root: str | Path, split: str = "test") -> Path:
    return Path(run_root) / "schemes" / f"native-predictions-{split}.npz"


def native_identity(cfg: RunConfig, split: str) -> dict[str, Any]:
    """What Native's cached predictions depend on besides the checkpoint (the run directory's hash covers that)."""
    return {"split": split, "max_len": cfg.model.max_len, "eval": to_dict(cfg.eval)}


def native_replay(cfg: RunConfig, model: SequentialRecommender, view: CTRView | RetrievalView, split: str,
                  run_root: str | Path) -> Replay:
    """Native's replay of the split, read from the run's cache or computed and cached."""
    path, identity = native_predictions_path(run_root, split), native_identity(cfg, split)
    cached = Replay.load(path, identity)
    if cached is not None:
        return cached
    result = replay(cfg, model, view, split)
    result.save(path, identity)
    return result


def _request_shape(cfg: RunConfig, view: CTRView | RetrievalView, split: str) -> dict[str, float]:
    """New events, candidates and their distinct request times of a mean request of the split, for the MACs
    formula."""
    if isinstance(view, CTRView):
        rows = view.split(split)
        pairs = np.unique(np.stack([rows.user, rows.history_len]), axis=1)
        steps = max(pairs.shape[1], 1)
        users, first = np.unique(pairs[0], return_index=True)
        last = np.append(first[1:], pairs.shape[1]) - 1
        appended = int((pairs[1, last] - pairs[1, first]).sum())
        appends = max(steps - len(users), 1)
        times = np.unique(np.stack([rows.user, rows.history_len, rows.timestamp]), axis=1).shape[1]
        return {"new_events": max(1, round(appended / appends)), "candidates": max(1, round(len(rows) / steps)),
                "candidate_times": times / steps, "candidate_chunk": cfg.eval.candidate_chunk, "catalogue": 0}
    return {"new_events": cfg.eval.append_events, "candidates": 0, "candidate_chunk": cfg.eval.candidate_chunk,
            "catalogue": view.sequences.num_items + 1}


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    total = float(np.sum(den))
    return float(np.sum(num)) / total if total else float("nan")


def evaluate_scheme(cfg: RunConfig, model: SequentialRecommender, view: CTRView | RetrievalView, split: str,
                    policy: CachePolicy, scheme: str, knobs: dict[str, Any], run_root: str | Path,
                    prefill_cache: PrefillCache | None = None) -> dict[str, Any]:
    """Replay the split under ``policy`` and under Native; accuracy, meters and fidelity to Native.

    ``prefill_cache`` shares the policy replay's uncompressed writes with other policies' (a sweep).

    Returns:
        ``{"scheme", "knobs", "policy", "memory_ratio_target", "split", "task", "metrics", "native":
        {"metrics", "meters"}, "meters", "fidelity"}`` (see the README's "Memory schemes" section).
    """
    native = native_replay(cfg, model, view, split, run_root)
    result = replay(cfg, model, view, split, policy, prefill_cache=prefill_cache)
    assert np.array_equal(result.users, native.users), "the scheme and Native must serve the same users"
    shape = _request_shape(cfg, view, split)
    stored = float(result.layer_tokens.mean()) if len(result.layer_tokens) else 0.0
    native_stored = float(native.layer_tokens.mean()) if len(native.layer_tokens) else 0.0
    per_user = result.layer_bytes / np.maximum(native.layer_bytes, 1)
    meters = {
        **result.meters,
        "layer_bytes_mean": float(result.layer_bytes.mean()) if len(result.layer_bytes) else 0.0,
        "memory_ratio": _ratio(result.layer_bytes, native.layer_bytes),
        "memory_ratio_state": _ratio(result.state_bytes, native.state_bytes),
        "memory_ratio_user_p50": float(np.percentile(per_user, 50)) if len(per_user) else float("nan"),
        "memory_ratio_user_max": float(per_user.max()) if len(per_user) else float("nan"),
        "stored_tokens_mean": stored,
        "native_stored_tokens_mean": native_stored,
        "macs_per_request": request_macs(cfg.model, stored, **shape),
        "native_macs_per_request": request_macs(cfg.model, native_stored, **shape),
        "recompute_macs_per_request": recompute_macs(
            cfg.model, round(native_stored), shape["new_events"], shape["candidates"], cfg.eval.prefill_chunk,
            shape["candidate_chunk"], shape["catalogue"], shape.get("candidate_times")),
        "macs_request_shape": shape,
        "threads": torch.get_num_threads(),
    }
    return {
        "scheme": scheme, "knobs": knobs, "policy": repr(policy), "memory_ratio_target": policy.memory_ratio,
        "split": split, "task": cfg.task, "eval": to_dict(cfg.eval), "metrics": result.metrics,
        "native": {"metrics": native.metrics, "meters": native.meters}, "meters": meters,
        "fidelity": fidelity(view, split, result, native), "per_user": per_user_delta(view, split, result, native),
    }
