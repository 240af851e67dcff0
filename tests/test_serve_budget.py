"""``experiments/serve_budget.py``: the budget sweep of ``malloc serve`` on a tiny run, its curves, and its bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    assert (tmp_path / "sweep" / "curves.png").stat().st_size > 0 and "| native |" in (
        tmp_path / "sweep" / "curves.md").read_text()
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
