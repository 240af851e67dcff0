"""``malloc serve``: the replay over time equals the evaluation, the budget is kept, a killed replay resumes
exactly, workers on a real Redis equal one worker, and bad input is one line.

One tiny model is trained per module (smoke-sized; ``model.max_len=64`` covers every user's history, so the replay
and the evaluation write the same events). Its synthetic users' events are a day apart on average, so many users
are active at once and an allocator has to choose between them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from malloc.cli import main
from malloc.config import load_config
from malloc.eval.replay import replay_ctr, replay_retrieval
from malloc.runner import load_trained, run
from malloc.serve import ServeError, ServeOptions, serve
from malloc.serve.allocator import Allocator, Step
from malloc.serve.journal import UndoLog, load_checkpoint, read_records
from malloc.serve.requests import build_requests, worker_of
from malloc.serve.run import file_digest
from malloc.serve.worker import next_batch
from malloc.serving.engine import Engine
from malloc.serving.store import decode, entry_identity, open_store
from redis_server import redis_server

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
OVERRIDES = ("model.max_len=64", "train.epochs=1", "data.synthetic.mean_gap_seconds=86400")


def overrides(results: Path, task: str = "ctr") -> list[str]:
    return [f"results_dir={results}", f"task={task}", *OVERRIDES]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(config, results folder)`` of a trained tiny CTR run."""
    results = tmp_path_factory.mktemp("serve-results")
    cfg = load_config(SMOKE, overrides(results))
    run(cfg, show_progress=False)
    return cfg, results


def predictions(result: dict) -> dict[str, np.ndarray]:
    with np.load(Path(result["out"]) / "predictions.npz") as data:
        return {name: data[name] for name in data.files}


def quiet(**options) -> ServeOptions:
    return ServeOptions(anchors=False, threads=1, **options)


# -- the replay equals the evaluation ------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 8])
def test_ctr_replay_equals_the_feedback_evaluation(trained, batch: int) -> None:
    cfg, _ = trained
    result = serve(cfg, ServeOptions(threads=1, batch=batch, anchors=batch > 1), show_progress=False)
    served = predictions(result)
    model, view, _ = load_trained(cfg)
    mine = {(u, e): v for u, e, v in zip(served["user"].tolist(), served["event"].tolist(), served["logit"].tolist(),
                                         strict=True)}
    for name in ("valid", "test"):
        rows = view.split(name)
        logits, _ = replay_ctr(Engine(model), view.sequences, rows, cfg.model.max_len, 16, protocol="feedback")
        replayed = np.array([mine[(u, e)] for u, e in zip(rows.user.tolist(), rows.history_len.tolist(),
                                                           strict=True)])
        np.testing.assert_allclose(replayed, logits, atol=1e-5, rtol=0)
    # requests in time order, each served once; the store holds exactly Native's bytes at the end
    times = view.sequences.timestamps[view.sequences.offsets[served["user"]] + served["event"]]
    assert np.all(np.diff(times) >= 0)
    counts = result["counts"]
    assert counts["requests"] == result["requests"] == counts["hits"] + counts["recomputes"]
    assert counts["misses"]["cold"] == result["users"] and counts["misses"]["dropped"] == 0
    assert result["store_bytes"]["final"] == result["store_bytes"]["native_total"] == result["store_bytes"]["peak"]
    assert set(result["metrics"]) == {"all", "valid", "test"} and 0 < result["metrics"]["all"]["auc"] < 1
    if batch > 1:
        assert set(result["anchors"]) == {"item-mean", "item-mean+user-rate", "mf"}


def test_retrieval_replay_equals_the_evaluation(tmp_path: Path) -> None:
    cfg = load_config(SMOKE, overrides(tmp_path, "retrieval"))
    run(cfg, show_progress=False)
    result = serve(cfg, ServeOptions(threads=1), show_progress=False)
    served = predictions(result)
    model, view, _ = load_trained(cfg)
    for code, name in ((1, "valid"), (2, "test")):
        ranks, _ = replay_retrieval(Engine(model), view.sequences, view.target_index(name), cfg.model.max_len, 1, 16)
        mine = served["split"] == code
        assert np.array_equal(served["rank"][mine][np.argsort(served["user"][mine])], ranks)
    assert set(result["anchors"]) == {"popular", "mf"} and "ndcg@10" in result["metrics"]["all"]


# -- allocators ----------------------------------------------------------------------------------------------------
def test_lru_recomputes_dropped_users_exactly(trained) -> None:
    cfg, _ = trained
    native = predictions(serve(cfg, quiet(), show_progress=False))["logit"]
    result = serve(cfg, quiet(allocator="lru", budget=1 / 8), show_progress=False)
    bytes_ = result["store_bytes"]
    assert bytes_["peak"] <= result["budget_bytes"] == int(bytes_["native_total"] / 8)
    assert result["allocator_counts"]["drops"] > 0 and result["counts"]["misses"]["dropped"] > 0
    # a dropped user is recomputed from its event log: the same state, so the same predictions
    np.testing.assert_allclose(predictions(result)["logit"], native, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["random", "h2o"])
def test_adaptive_keeps_the_budget_by_recompressing(trained, scheme: str) -> None:
    cfg, _ = trained
    result = serve(cfg, quiet(allocator="adaptive", budget=1 / 4, scheme=scheme), show_progress=False)
    assert result["store_bytes"]["peak"] <= result["budget_bytes"]
    assert result["allocator_counts"]["recompressions"] > 0
    assert np.isfinite(predictions(result)["logit"]).all()
    # every stored entry decodes at the level the allocator says (or it would be counted stale)
    assert result["counts"]["misses"]["stale"] == result["counts"]["misses"]["corrupt"] == 0


def test_adaptive_stores_a_requester_larger_than_the_budget_compressed(trained) -> None:
    """At 1/256 of Native's bytes no user's whole state fits: every requester is stored at the highest level that
    fits (not left unstored and recomputed at its next request), and later requests decode it at that level."""
    cfg, _ = trained
    result = serve(cfg, quiet(allocator="adaptive", budget=1 / 256, scheme="random"), show_progress=False)
    counts = result["allocator_counts"]
    assert counts["not_stored"] == 0 and counts["requester_cuts"] == result["requests"]
    assert result["store_bytes"]["peak"] <= result["budget_bytes"]
    assert result["counts"]["hits"] > 0
    assert result["counts"]["misses"]["stale"] == result["counts"]["misses"]["corrupt"] == 0


def test_uniform_budget_chooses_one_ratio(trained) -> None:
    cfg, _ = trained
    result = serve(cfg, quiet(allocator="uniform", budget=1 / 2, scheme="recency"), show_progress=False)
    assert 0.2 < result["memory_ratio"] < 0.5
    # the ratio is solved for the final total, each user keeping what the eviction rule keeps for its history
    assert 0.9 < result["store_bytes"]["peak"] / result["budget_bytes"] <= 1.0
    assert result["allocator_counts"]["drops"] == 0


def test_lru_victims_are_the_least_recently_requested() -> None:
    alloc = Allocator("lru", 4, budget=300, start_time=0)
    for user, when in ((0, 5), (1, 3), (2, 9)):
        alloc.requested(user, when, seq=when)
        alloc.stored(user, 0, 100, None)
    assert not alloc.fits(3, 100) and alloc.fits(0, 100)
    alloc.requested(3, 10, seq=10)
    assert alloc.victim(3) == (1, None)  # requested at 3, the oldest
    alloc.dropped(1)
    assert alloc.fits(3, 100) and alloc.victim(3) == (0, None)


def test_adaptive_victim_minimises_loss_per_byte_and_survives_a_restore() -> None:
    def build() -> Allocator:
        alloc = Allocator("adaptive", 5, budget=1000, start_time=0, decay=100.0)
        steps = {0: Step(1, 0.7, 100), 1: Step(1, 0.7, 400), 2: Step(2, 2.0, 50), 3: Step(1, 0.7, 100)}
        for user, step in steps.items():
            alloc.requested(user, 10 * user, seq=user)
            alloc.stored(user, 0, 200, step)
        return alloc

    alloc = build()
    # keys t/T + log(loss) - log(freed): user 1 frees most per loss; user 3's later request outweighs its bytes
    order = []
    while (choice := alloc.victim(4)) is not None:
        order.append(choice)
    assert order[:4] == [(1, 1), (0, 1), (3, 1), (2, 2)]
    again = build()
    restored = Allocator("adaptive", 5, budget=1000, start_time=0, decay=100.0)
    restored.restore(again.arrays(), again.scalars())
    assert [restored.victim(4) for _ in range(4)] == order[:4]


def test_batches_keep_each_users_requests_in_order() -> None:
    users = np.array([1, 2, 3, 2, 4, 5, 6])
    assert next_batch(users, 0, 8) == [0, 1, 2]
    assert next_batch(users, 3, 2) == [3, 4]
    counts = np.bincount(worker_of(np.arange(3000), 3), minlength=3)
    assert counts.sum() == 3000 and counts.min() > 900  # a stable hash that spreads users evenly


# -- resuming ------------------------------------------------------------------------------------------------------
def test_undo_log_restores_the_checkpointed_entries(tmp_path: Path) -> None:
    store = open_store(f"lmdb://{tmp_path / 's.lmdb'}")
    store.put("a", b"old-a")
    undo = UndoLog(tmp_path, 3)
    undo.record("a", b"old-a")
    store.put("a", b"new-a")
    undo.record("a", b"new-a")  # the first pre-image of the epoch is the one kept
    undo.record("b", None)
    store.put("b", b"new-b")
    undo.close()
    with open(undo.path, "ab") as handle:  # a record cut short by a kill: never applied
        handle.write(b"\x05\x00\x00")
    assert [key for key, _ in read_records(undo.path)] == ["a", "b"]
    assert UndoLog(tmp_path, 3).restore(store) == 2
    assert store.get("a") == b"old-a" and store.get("b") is None and not undo.path.exists()
    store.close()


KILLED = {"native": [], "adaptive-h2o": ["--allocator", "adaptive", "--scheme", "h2o", "--budget", "1/4"]}


@pytest.mark.parametrize("case", list(KILLED))
def test_a_replay_killed_mid_way_resumes_with_no_lost_or_repeated_request(trained, tmp_path: Path, case: str) -> None:
    cfg, results = trained
    extra = KILLED[case]
    options = {} if not extra else {"allocator": "adaptive", "scheme": "h2o", "budget": 0.25}
    whole_result = serve(cfg, quiet(**options), show_progress=False)
    whole = predictions(whole_result)
    store, out = tmp_path / "states.lmdb", tmp_path / "replay"
    command = [sys.executable, "-m", "malloc", "serve", "--config", SMOKE, "--quiet", "--no-anchors", "--threads", "1",
               "--store", f"lmdb://{store}", "--out", str(out), "--checkpoint-every", "10", *extra]
    for pair in overrides(results):
        command += ["--set", pair]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = out / "checkpoints" / "worker-0"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        # frozen while we look: killed once the store is ahead of its last checkpoint (the epoch's undo log exists)
        os.kill(process.pid, signal.SIGSTOP)
        loaded = load_checkpoint(folder)
        if loaded is not None and (folder / f"undo-{loaded[0]['epoch']}.log").is_file():
            break
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.005)
    if process.poll() is None:  # else the replay ended first: the returncode assertion below says so
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    header, _ = load_checkpoint(folder)
    assert 0 < header["cursor"] < len(whole["logit"])
    assert (folder / f"undo-{header['epoch']}.log").is_file()  # entries changed after the checkpoint
    assert main([*command[3:], "--resume"]) == 0
    resumed = predictions({"out": str(out)})
    assert np.array_equal(resumed["logit"], whole["logit"])
    result = json.loads((out / "result.json").read_text())
    assert result["counts"]["requests"] == whole_result["counts"]["requests"]
    assert result["served_by_this_process"] == len(whole["logit"]) - header["cursor"]
    assert result["allocator_counts"] == whole_result["allocator_counts"]
    assert result["store_bytes"]["final"] == whole_result["store_bytes"]["final"]
    if extra:
        return
    # each user's state saw each of its events exactly once
    model, view, run_dir = load_trained(cfg)
    requests = build_requests(view, cfg.model.max_len)
    last = np.full(requests.num_users, -1)
    np.maximum.at(last, requests.user, requests.event)
    identity = entry_identity(Engine(model), model=file_digest(run_dir.checkpoint_path))
    with open_store(f"lmdb://{store}") as states:
        for user in np.flatnonzero(last >= 0).tolist():
            state = decode(states.get(f"u{user}"), identity)
            assert state.next_position == last[user] + 1 - requests.log_start[user]


def test_resuming_another_replays_checkpoint_is_refused(trained, tmp_path: Path) -> None:
    cfg, _ = trained
    options = {"store": f"lmdb://{tmp_path / 's.lmdb'}", "out": str(tmp_path / "replay"), "max_requests": 30}
    serve(cfg, quiet(**options), show_progress=False)
    with pytest.raises(ServeError, match=r"checkpoint is of another replay \(identity differs in memory_ratio"):
        serve(cfg, quiet(**options, scheme="recency", memory_ratio=0.5, resume=True), show_progress=False)


# -- workers on Redis ----------------------------------------------------------------------------------------------
def test_workers_sharing_redis_equal_one_worker(trained) -> None:
    cfg, _ = trained
    one = serve(cfg, quiet(max_requests=150), show_progress=False)
    with redis_server() as (url, _):
        tic = time.monotonic()
        many = serve(cfg, quiet(store=url, workers=2, max_requests=150, allocator="lru", budget=1.0),
                     show_progress=False)
        assert time.monotonic() - tic < 240  # a bounded load test: 150 requests, 2 processes, one server
        assert np.array_equal(predictions(many)["logit"], predictions(one)["logit"])
        assert many["counts"]["requests"] == 150 and many["counts"]["hits"] + many["counts"]["recomputes"] == 150
        with open_store(url) as store:
            assert store.nbytes() == many["store_bytes"]["final"] == one["store_bytes"]["final"]
        # a fresh replay on a store that holds entries is refused (one line), unless --force
        with pytest.raises(ServeError, match=r"holds \d+ entries"):
            serve(cfg, quiet(store=url, max_requests=10), show_progress=False)


# -- the hot tier --------------------------------------------------------------------------------------------------
def test_hot_tier_changes_no_prediction_and_serves_repeats_from_memory(trained, tmp_path: Path) -> None:
    """With the adaptive allocator, whose victims are read and rewritten too: the same predictions, entries and
    counts with the hot tier as without it, and the store ends with the same bytes."""
    cfg, _ = trained
    options = {"max_requests": 200, "allocator": "adaptive", "scheme": "h2o", "budget": 1 / 8}
    cold = serve(cfg, quiet(store=f"lmdb://{tmp_path / 'a.lmdb'}", out=str(tmp_path / "a"), **options),
                 show_progress=False)
    hot = serve(cfg, quiet(store=f"lmdb://{tmp_path / 'b.lmdb'}", out=str(tmp_path / "b"), hot_bytes=1 << 20,
                           **options), show_progress=False)
    assert np.array_equal(predictions(hot)["logit"], predictions(cold)["logit"])
    assert hot["counts"] == cold["counts"] and hot["allocator_counts"] == cold["allocator_counts"]
    assert hot["store_bytes"]["final"] == cold["store_bytes"]["final"]
    assert hot["allocator_counts"]["recompressions"] > 0  # victims were read and rewritten through the tier
    assert cold["hot_tier"] is None
    tier = hot["hot_tier"]
    assert tier["bytes"] == 1 << 20 and tier["hits"] > 0 and tier["misses"] > 0
    assert tier["hits"] + tier["misses"] >= 200  # every request's get, plus the victims' reads


# -- bad input -----------------------------------------------------------------------------------------------------
BAD = [
    (["--budget", "2"], "--budget must be a fraction in (0, 1]"),
    (["--budget", "1/0"], "--budget must be a fraction"),
    (["--budget", "x"], "--budget must be a fraction"),
    (["--allocator", "fifo"], "--allocator must be one of uniform, lru, adaptive"),
    (["--allocator", "lru"], "--allocator lru needs --budget"),
    (["--allocator", "adaptive", "--budget", "1/8"], "--allocator adaptive compresses with a scheme"),
    (["--allocator", "adaptive", "--budget", "1/8", "--scheme", "snapkv"], "snapkv cannot"),
    (["--budget", "1/2"], "--allocator uniform meets a budget by compressing"),
    (["--allocator", "adaptive", "--budget", "1/8", "--scheme", "random", "--memory-ratio", "1/2"],
     "drop --memory-ratio"),
    (["--workers", "two"], "--workers must be a whole number"),
    (["--workers", "2"], "--workers 2 needs a store the processes share"),
    (["--batch", "0"], "--batch must be a whole number in [1, 4096]"),
    (["--resume"], "--resume needs a persistent store"),
    (["--hot-bytes", "64XB"], "--hot-bytes must be a whole number of bytes with an optional unit"),
    (["--hot-bytes", "-1"], "--hot-bytes must be a whole number of bytes"),
    (["--hot-bytes", "64MiB"], "--hot-bytes keeps entries in process in front of a persistent store"),
    (["--scheme", "nope"], "nope"),
    (["--store", "ftp://x"], "unknown scheme 'ftp'"),
]


@pytest.mark.parametrize(("args", "words"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(trained, capsys, args: list[str], words: str) -> None:
    _, results = trained
    command = ["serve", "--config", SMOKE, "--quiet", *[x for p in overrides(results) for x in ("--set", p)], *args]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("malloc serve: error:") and words in err, err


def test_resume_with_nothing_to_resume_and_no_checkpoint(trained, tmp_path: Path, capsys) -> None:
    _, results = trained
    base = ["serve", "--config", SMOKE, "--quiet", *[x for p in overrides(results) for x in ("--set", p)]]
    assert main([*base, "--store", f"lmdb://{tmp_path / 'x.lmdb'}", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    untrained = ["serve", "--config", SMOKE, "--quiet", "--set", f"results_dir={tmp_path / 'none'}"]
    assert main(untrained) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint for this config" in err and "malloc train" in err
