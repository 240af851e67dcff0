"""The command line and the runner end to end on tiny data: results, skipping, resume, exact repeats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_dirs
from malloc.cli import main
from malloc.config import load_config
from malloc.results import read_json
from malloc.runner import build_view, run, run_dir_for, training_identity
from malloc.train import train

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
SUITES = Path(__file__).resolve().parents[1] / "configs" / "suites"


def smoke(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"results_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("task", ["ctr", "retrieval"])
@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_train_writes_results_then_skips(tmp_path, capsys, task, backbone):
    args = ["train", "--config", SMOKE, "--quiet", "--set", f"results_dir={tmp_path}", "--set", f"task={task}",
            "--set", f"model.backbone={backbone}"]
    assert main(args) == 0
    (run_dir,) = run_dirs(tmp_path)
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.json", "meters.json", "done.json"):
        assert (run_dir / name).is_file(), name
    metrics = read_json(run_dir / "metrics.json")
    keys = ("auc", "gauc", "logloss") if task == "ctr" else ("hr@10", "ndcg@10", "mrr")
    assert all(0.0 <= metrics[k] for k in keys)
    meters = read_json(run_dir / "meters.json")
    assert meters["state_bytes_mean"] > 0 and meters["users"] > 0
    before = (run_dir / "done.json").stat().st_mtime_ns
    assert main(args) == 0  # done: skipped, not retrained
    assert (run_dir / "done.json").stat().st_mtime_ns == before
    assert "test" in capsys.readouterr().out


@pytest.mark.parametrize(("task", "overrides"), [
    ("ctr", ["eval.protocol=feedback"]), ("ctr", ["eval.monitor=logloss"]),
    ("retrieval", ["eval.mask_history=false"]), ("retrieval", ["eval.ks=[5]"]), ("retrieval", ["eval.append_events=2"]),
])
def test_a_done_run_is_not_returned_for_other_evaluation_settings(tmp_path, task, overrides):
    """The settings that change a run's kept epoch or its test numbers name another run folder (not the done one
    of the defaults); batch sizes and the defaults spelled out (``monitor`` auc for CTR) name the same one."""
    default = smoke(tmp_path, f"task={task}")
    other = smoke(tmp_path, f"task={task}", *overrides)
    same = smoke(tmp_path, f"task={task}", "eval.user_batch=7",
                 f"eval.monitor={'auc' if task == 'ctr' else 'ndcg@10'}")
    assert "eval" not in training_identity(default) and "eval" in training_identity(other)
    assert run_dir_for(other).root != run_dir_for(default).root
    assert run_dir_for(same).root == run_dir_for(default).root


def test_force_reruns(tmp_path):
    cfg = smoke(tmp_path)
    run(cfg, show_progress=False)
    done = run_dir_for(cfg).done_path
    before = done.stat().st_mtime_ns
    run(cfg, force=True, show_progress=False)
    assert done.stat().st_mtime_ns != before


def test_training_repeats_exactly_and_resumes(tmp_path):
    cfg = smoke(tmp_path / "a", "train.epochs=3", "train.patience=5")
    view = build_view(cfg)
    full, _ = train(cfg, view, tmp_path / "a", show_progress=False)
    # the same run interrupted after 1 epoch, then restarted: picks up from last.pt and ends identical
    (tmp_path / "b").mkdir()
    train(smoke(tmp_path / "b", "train.epochs=1", "train.patience=5"), view, tmp_path / "b", show_progress=False)
    resumed, result = train(cfg, view, tmp_path / "b", show_progress=False)
    assert result.epochs_run == 3 and [h["epoch"] for h in result.history] == [1, 2, 3]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_eval_reads_the_checkpoint(tmp_path, capsys):
    base = ["--config", SMOKE, "--set", f"results_dir={tmp_path}"]
    assert main(["train", "--quiet", *base]) == 0
    assert main(["eval", *base, "--split", "valid"]) == 0
    (run_dir,) = run_dirs(tmp_path)
    result = json.loads((run_dir / "eval-valid.json").read_text())
    assert set(result) == {"metrics", "meters"} and "gauc" in result["metrics"]


def test_data_stats_prints_movielens(capsys):
    pytest.importorskip("recbole")
    assert main(["data", "stats", "ml-100k", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 943 and stats["events"] == 100_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "model.layerz=3"], "model.layerz"),
        (["train", "--set", "model.layers=0"], "layers"),
        (["train", "--set", "task=ranking"], "task"),
        (["train", "--set", "data.source=netflix"], "netflix"),
        (["train", "--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
        (["eval", "--set", "results_dir=/nonexistent-results"], "malloc train"),
        (["data", "stats", "ml-1m"], "ratings.dat"),
        (["train", "--set", "modellayers"], "key.sub=value"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, capsys, args, message):
    if args[0] == "train" and "--config" not in args:
        args = [*args, "--config", SMOKE, "--set", f"results_dir={tmp_path}", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("malloc ") and message in err and "\n" not in err


def test_bench_runs_a_suite_file_and_skips_it_when_done(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(Path(SUITES / "smoke.yaml").read_text().replace("name: smoke", "name: tiny")
                     .replace("schemes: [recency, h2o, int8, gqa]", "schemes: [recency]")
                     .replace("ratios: [1/2, 1/4]", "ratios: [1/2]").replace("  retrieval: {}\n", ""))
    args = ["bench", "--suite", str(suite), "--results", str(tmp_path / "res"), "--quiet"]
    assert main(args) == 0
    assert "2 run, 0 already done, 0 failed" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 run, 2 already done" in capsys.readouterr().out


def test_bench_suite_with_a_wrong_key_is_an_error(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("name: bad\nseed: [1]\n")
    assert main(["bench", "--suite", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key 'seed'" in capsys.readouterr().err
