"""``experiments/serve_budget.py``: the budget sweep of ``malloc serve`` on a tiny run, its curves, the replay's
locality, and its bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from malloc.config import load_config
from malloc.runner import run

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def test_sweep_writes_the_curves_then_reuses_its_items(tmp_path: Path, experiment_script, capsys) -> None:
    sweep = experiment_script("serve_budget")
    overrides = [f"results_dir={tmp_path / 'results'}", "train.epochs=1", "data.synthetic.mean_gap_seconds=86400"]
    run(load_config(SMOKE, overrides), show_progress=False)
    argv = ["--config", SMOKE, *[x for o in overrides for x in ("--set", o)], "--out", str(tmp_path / "sweep"),
            "--schemes", "random", "--budgets", "1/2,1/8", "--max-requests", "60", "--quiet"]
    assert sweep.main([*argv, "--shard", "1/2"]) == 0
    assert "left to run" in capsys.readouterr().out
    assert sweep.main([*argv, "--shard", "0/2"]) == 0
    curves = json.loads((tmp_path / "sweep" / "curves.json").read_text())
    ids = [r["id"] for r in curves["rows"]]
    # at 1/8 the smoke model's entries are mostly fixed bytes: no uniform ratio meets the budget
    assert ids == ["native", "lru-native-b1over2", "uniform-random-b1over2", "adaptive-random-b1over2",
                   "lru-native-b1over8", "adaptive-random-b1over8"]
    assert "leaves nothing" in curves["unreachable"]["uniform-random-b1over8"]
    for r in curves["rows"][1:]:
        assert r["requests"] == 60 and 0 <= r["auc"] <= 1 and r["paired"]["se"] >= 0
        if r["allocator"] != "uniform":  # the allocators with a cap never exceed it
            assert r["peak_fraction"] <= r["budget_fraction"] + 1e-12
    assert {"mf", "item-mean"} <= set(curves["anchors"])
    lru = next(r for r in curves["rows"] if r["id"] == "lru-native-b1over2")
    assert abs(lru["paired"]["delta"]) < 1e-6  # a dropped user is recomputed exactly
    markdown = (tmp_path / "sweep" / "curves.md").read_text()
    assert (tmp_path / "sweep" / "curves.png").stat().st_size > 0 and "| native |" in markdown
    assert "| budget | uniform random | lru native | adaptive random |" in markdown and "unreachable" in markdown
    assert "Locality: 60 requests" in markdown and curves["locality"]["requests"] == 60
    # each item records the commit that ran it (None outside a git checkout)
    assert set(curves["code"]) == {*ids, "uniform-random-b1over8"}
    assert all((tmp_path / "sweep" / item / "code.json").is_file() for item in curves["code"])
    before = (tmp_path / "sweep" / "native" / "result.json").stat().st_mtime_ns
    assert sweep.main(argv) == 0  # every item is read back, not replayed
    assert (tmp_path / "sweep" / "native" / "result.json").stat().st_mtime_ns == before


def test_bad_input_is_one_line(tmp_path: Path, experiment_script, capsys) -> None:
    sweep = experiment_script("serve_budget")
    for extra, words in ((["--budgets", "3"], "--budgets must be a fraction"),
                         (["--allocators", "fifo"], "expected --allocators"),
                         (["--shard", "2/2"], "--shard I/N")):
        assert sweep.main(["--config", SMOKE, "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_stack_distances_count_the_other_users_between_a_users_requests(experiment_script) -> None:
    sweep = experiment_script("serve_budget")
    users = np.random.default_rng(0).integers(0, 12, size=300)
    expected = []
    for i, user in enumerate(users.tolist()):
        earlier = np.flatnonzero(users[:i] == user)
        if len(earlier):
            expected.append(len(set(users[earlier[-1] + 1:i].tolist())))
    assert sweep.stack_distances(users).tolist() == expected
    stats = sweep.locality(np.array([0, 0, 1, 0, 2, 1]), windows=(2, 10))
    assert stats["repeats"] == 3 and stats["users"] == 3  # distances 0, 1 (user 1), 2 (users 0 and 2)
    assert stats["stack_distance"]["max"] == 2 and stats["share_below"]["1"] == 1 / 3
    assert stats["window_users"] == {"2": {"mean": 5 / 3, "max": 2}}  # blocks (0, 0), (1, 0), (2, 1); none of 10
