"""Data-parallel training under torchrun (gloo, 2 CPU processes) against one process on tiny configs.

The same loss at every step (1e-5) on CTR, on retrieval with per-target sampled negatives and on batches of one
window (a rank with an empty share), the same test replay and validation, bit for bit, from the same checkpoint
(the users split over the ranks and gathered), a killed rank that fails the job with one line instead of a hang,
and a rerun under torchrun that resumes and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from malloc.distributed import (
    DistributedError,
    Launch,
    World,
    _flatten,
    _unflatten,
    launch_from_environment,
    rank_device,
    timeout_seconds,
)
from malloc.results import load_checkpoint, read_json

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
WORKER = str(ROOT / "tests" / "distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
EXACT = ["model.dropout=0", "train.threads=1"]  # no dropout (its masks are per rank) and one thread everywhere
# long enough that a rank can be killed in the middle of an epoch (about 38 steps per epoch)
CTR = [*EXACT, "train.epochs=3", "train.patience=5", "data.synthetic.num_users=200", "train.batch_size=8"]
CASES = {
    "ctr": CTR,
    "retrieval": [*EXACT, "task=retrieval", "train.negatives=8", "train.negative_sampling=per_target"],
    "one-window-batches": [*EXACT, "train.epochs=1", "train.batch_size=1", "train.max_train_users=6"],
    # windows of about 440 events: the validation forward has 2 batches and the replay 4, split over the ranks
    "long-windows": [*EXACT, "train.epochs=1", "train.max_train_users=2", "train.window=32", "model.max_len=400",
                     "data.synthetic.num_users=30", "data.synthetic.min_len=400", "data.synthetic.max_len=450",
                     "eval.user_batch=8"],
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "MALLOC_DIST_TIMEOUT": "60", **extra}


def _worker(tmp: Path, tag: str, launcher: list[str], checkpoints: dict[str, str] | None = None) -> dict:
    cases = [{"name": name, "config": SMOKE, "overrides": [f"results_dir={tmp / tag}", *sets]}
             for name, sets in CASES.items()]
    (tmp / f"{tag}-cases.json").write_text(json.dumps(cases))
    args = [str(tmp / f"{tag}-cases.json"), str(tmp / f"{tag}.json")]
    if checkpoints is not None:
        (tmp / f"{tag}-checkpoints.json").write_text(json.dumps(checkpoints))
        args.append(str(tmp / f"{tag}-checkpoints.json"))
    done = subprocess.run([*launcher, WORKER, *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return read_json(tmp / f"{tag}.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path]:
    """The cases trained by one process, then by 2 torchrun ranks that also serve the first's checkpoints."""
    tmp = tmp_path_factory.mktemp("ddp")
    single = _worker(tmp, "single", [sys.executable])
    checkpoints = {name: case["checkpoint"] for name, case in single["cases"].items()}
    ranks = _worker(tmp, "ranks", TORCHRUN, checkpoints)
    assert single["world_size"] == 1 and ranks["world_size"] == 2
    return single["cases"], ranks["cases"], tmp


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_follow_the_loss_curve_of_one_process(runs, name):
    single, ranks, _ = runs
    one, two = single[name]["losses"], ranks[name]["losses"]
    assert [step[:2] for step in one] == [step[:2] for step in two]  # the same epochs and steps
    assert np.abs(np.array([s[2] for s in one]) - np.array([s[2] for s in two])).max() < 1e-5
    assert single[name]["epochs_run"] == ranks[name]["epochs_run"]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_serve_a_checkpoint_exactly_as_one_process(runs, name):
    single, ranks, _ = runs
    assert ranks[name]["served"] == single[name]["checkpoint"]
    assert single[name]["threads"] == ranks[name]["threads"] == 1
    for key in ("test", "valid", "predictions", "users", "state_bytes"):
        assert ranks[name][key] == single[name][key], key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_killed_rank_fails_the_job_in_one_line_and_torchrun_resumes_it(runs, tmp_path):
    _, ranks, _ = runs
    results = tmp_path / "results"
    command = ["-m", "malloc", "train", "--config", SMOKE, "--quiet", *(f"--set={s}" for s in CTR),
               f"--set=results_dir={results}"]
    # two processes given torchrun's variables by hand, without its agent: nothing else stops the survivor
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, *command], env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not list(results.glob("*/last.pt")):  # the first epoch is checkpointed: kill rank 1 in the second
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert time.monotonic() - killed_at < 60  # no hang: the closed connection (or the 60 s timeout) ends it
    assert procs[0].returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("malloc train: error:")]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "rerun the same command to resume" in lines[0], err
    (run_dir,) = (p.parent for p in results.glob("*/last.pt"))
    stopped_at = load_checkpoint(run_dir / "last.pt")["progress"]["epoch"]
    assert 1 <= stopped_at < 3 and not (run_dir / "done.json").exists()

    rerun = subprocess.run([*TORCHRUN, *command], env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"at epoch {stopped_at} (2 processes)" in rerun.stderr
    assert rerun.stdout.count(": test (ctr)") == 1  # one rank prints the result
    assert read_json(run_dir / "meters.json")["world_size"] == 2
    history = read_json(run_dir / "metrics.json")["valid_history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # the interrupted and resumed run ends where the uninterrupted one (same config, 2 ranks) did
    resumed, whole = load_checkpoint(run_dir / "best.pt"), load_checkpoint(ranks["ctr"]["checkpoint"])
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_launch_comes_from_torchruns_variables():
    assert launch_from_environment({}) is None
    assert launch_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None  # one process: a plain run
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert launch_from_environment(env) == Launch(rank=3, size=4, local_rank=1)


@pytest.mark.parametrize(("change", "message"), [
    ({"RANK": "4"}, "RANK=4 must be below WORLD_SIZE=4"),
    ({"RANK": "-1"}, "RANK must be an integer >= 0, got '-1'"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer >= 1, got 'two'"),
    ({"LOCAL_RANK": None}, "LOCAL_RANK is not set"),
    ({"MASTER_PORT": None}, "MASTER_PORT is not set"),
])
def test_a_malformed_launch_is_one_line_naming_the_variable(change, message):
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    env = {k: v for k, v in {**env, **change}.items() if v is not None}
    with pytest.raises(DistributedError, match=message):
        launch_from_environment(env)


def test_the_timeout_and_each_ranks_device():
    assert timeout_seconds({}) == 1800.0 and timeout_seconds({"MALLOC_DIST_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-3", "nan", "soon"):
        with pytest.raises(DistributedError, match="MALLOC_DIST_TIMEOUT must be a number of seconds > 0"):
            timeout_seconds({"MALLOC_DIST_TIMEOUT": bad})
    launch = Launch(rank=3, size=4, local_rank=1)
    assert rank_device("cpu", launch) == "cpu" and rank_device("cuda", launch) == "cuda:1"
    with pytest.raises(DistributedError, match="names one GPU for 4 processes"):
        rank_device("cuda:0", launch)


@pytest.mark.parametrize("size", [1, 2, 3, 8])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 32])
def test_the_shares_of_a_batch_tile_it_in_rank_order(size, count):
    shares = [World(Launch(rank, size, rank), "gloo", torch.device("cpu"), 1.0).shard(count) for rank in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


def test_a_broadcast_tree_keeps_keys_kinds_and_tensors():
    tree = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "state": {0: {"step": torch.tensor(3.0)}},
            "groups": [{"betas": (0.9, 0.999), "params": [0, 1], "fused": None, "amsgrad": False}],
            "progress": {"best_metric": float("-inf"), "history": [{"epoch": 1, "loss": 0.5}], "count": np.int64(7)}}
    tensors: list[torch.Tensor] = []
    skeleton = json.loads(json.dumps(_flatten(tree, tensors)))  # what travels: JSON, then each tensor
    back = _unflatten(skeleton, tensors)
    assert torch.equal(back["model"]["w"], tree["model"]["w"]) and list(back["state"]) == [0]
    assert back["groups"][0]["betas"] == (0.9, 0.999) and back["progress"]["best_metric"] == float("-inf")
    assert back["progress"]["count"] == 7 and back["groups"][0]["fused"] is None
    with pytest.raises(TypeError, match="only tensors and plain values"):
        _flatten({"f": len}, [])
