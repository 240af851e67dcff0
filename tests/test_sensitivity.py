"""The memory-sensitivity curve: truncation through the serving path, anchors, bootstrap, outputs and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_dirs
from malloc.cli import main
from malloc.config import load_config
from malloc.configio import ConfigError
from malloc.data.batching import events
from malloc.data.sequences import DataError
from malloc.eval.anchors import item_mean_logits, popularity_ranks
from malloc.eval.evaluate import replay
from malloc.eval.metrics import auc, ctr_metrics, retrieval_metrics, target_ranks
from malloc.eval.statistics import UserScores, ctr_user_scores, metrics_with_counts
from malloc.results import read_json
from malloc.runner import load_trained, run
from malloc.sensitivity import (
    Truncation,
    default_truncations,
    parse_dataset,
    sensitivity,
    sensitivity_config,
    sensitivity_path,
)
from malloc.serving.engine import Engine

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def smoke(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"results_dir={tmp_path}", *overrides])


def test_truncation_keeps_the_most_recent_events() -> None:
    written = np.array([0, 1, 5, 16, 17, 200])
    assert Truncation().keep_last(written).tolist() == written.tolist()
    assert Truncation(fraction=4).keep_last(written).tolist() == [0, 1, 2, 4, 5, 50]  # ceil(n / 4), at least 1
    assert Truncation(fraction=64).keep_last(written).tolist() == [0, 1, 1, 1, 1, 4]
    assert Truncation(length=8).keep_last(written).tolist() == [0, 1, 5, 8, 8, 8]
    labels = [p.label for p in default_truncations(200)]
    assert labels == ["full", "1/2", "1/4", "1/8", "1/16", "1/32", "1/64", "last 8", "last 16", "last 32",
                      "last 64", "last 128"]
    with pytest.raises(ValueError, match="not both"):
        Truncation(fraction=2, length=8)
    with pytest.raises(ValueError, match="length must be >= 1"):
        Truncation(length=0)


def test_bootstrap_metrics_match_the_plain_metrics() -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 12, 300)
    labels = rng.integers(0, 2, 300)
    logits = np.round(rng.normal(size=300) + labels, 1)  # rounded: ties
    scores = ctr_user_scores(users, labels, logits)
    ones = np.ones(scores.num_users)
    got, want = metrics_with_counts(scores, ones), ctr_metrics(users, labels, logits)
    for key in ("gauc", "auc", "logloss"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # counting a user twice equals duplicating its rows
    counts = rng.integers(0, 3, scores.num_users)
    uniq = np.unique(users)
    rows = np.concatenate([np.flatnonzero(users == u) for u, c in zip(uniq, counts, strict=True) for _ in range(c)])
    assert metrics_with_counts(scores, counts)["auc"] == pytest.approx(auc(labels[rows], logits[rows]), abs=1e-12)

    ranks = rng.integers(1, 40, 50)
    got = metrics_with_counts(UserScores("retrieval", ranks=ranks), np.ones(50))
    want = retrieval_metrics(ranks, (10,))
    assert got == pytest.approx({k: want[k] for k in ("hr@10", "ndcg@10", "mrr")})


def test_truncated_replay_equals_writing_the_recent_events(tmp_path: Path) -> None:
    cfg = smoke(tmp_path, "task=retrieval", "model.max_len=32")
    run(cfg, show_progress=False)
    model, view, _ = load_trained(cfg)
    full = replay(cfg, model, view, "test")
    assert np.array_equal(replay(cfg, model, view, "test", keep_last=lambda n: n).ranks, full.ranks)
    kept = 5
    truncated = replay(cfg, model, view, "test", keep_last=lambda n: np.minimum(n, kept))
    # by hand: write only the `kept` events before the request, append the request, rank the target
    seqs, engine = view.sequences, Engine(model)
    stop = view.target_index("test")
    users = np.arange(seqs.num_users)
    split = stop - 1
    start = np.maximum(np.maximum(0, stop - cfg.model.max_len), split - kept)
    states = engine.append(engine.write(events(seqs, users, start, split)), events(seqs, users, split, stop))
    with torch.no_grad():
        scores = engine.retrieve(states)
    exclude = torch.zeros_like(scores, dtype=torch.bool)
    for u in users.tolist():
        exclude[u, torch.as_tensor(seqs.items[seqs.offsets[u]:seqs.offsets[u] + stop[u]])] = True
    by_hand = target_ranks(scores, seqs.items[seqs.offsets[users] + stop], exclude)
    assert np.array_equal(truncated.ranks, by_hand)
    assert not np.array_equal(truncated.ranks, full.ranks)
    assert np.all(truncated.layer_tokens <= kept + 1)  # the stored state holds the kept events and the request


def test_anchors_by_hand(tmp_path: Path) -> None:
    cfg = smoke(tmp_path)
    from malloc.runner import build_view

    view = build_view(cfg)
    train = view.rows.select(view.rows.split == 0)
    test = view.split("test")
    logits = item_mean_logits(view, "test", prior=0.0)
    item = int(test.item[0])
    mean = train.label[train.item == item].mean()
    assert 1 / (1 + np.exp(-logits[0])) == pytest.approx(np.clip(mean, 1e-6, 1 - 1e-6))  # prior 0: the plain mean

    rview = build_view(smoke(tmp_path, "task=retrieval"))
    seqs = rview.sequences
    ranks = popularity_ranks(rview, "test")
    u = 3
    ends = rview.train_ends()
    counts = np.zeros(seqs.num_items + 1)
    for v in range(seqs.num_users):
        np.add.at(counts, seqs.items[seqs.offsets[v]:seqs.offsets[v] + ends[v]], 1)
    target = seqs.items[seqs.offsets[u] + rview.target_index("test")[u]]
    history = set(seqs.items[seqs.offsets[u]:seqs.offsets[u] + rview.target_index("test")[u]].tolist())
    others = [i for i in range(1, seqs.num_items + 1) if i not in history and i != target]
    assert ranks[u] == 1 + sum(counts[i] >= counts[target] for i in others)  # ties count against the target


@pytest.mark.parametrize("task", ["ctr", "retrieval"])
def test_cli_writes_table_plot_and_json_then_skips(tmp_path: Path, capsys, task: str) -> None:
    args = ["sensitivity", "synthetic", "--task", task, "--config", SMOKE, "--set", f"results_dir={tmp_path}",
            "--bootstrap", "20", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    (run_dir,) = run_dirs(tmp_path)
    path = sensitivity_path(run_dir, "test")
    for suffix in (".json", ".md", ".png"):
        assert path.with_suffix(suffix).is_file(), suffix
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    result = read_json(path)
    primary = "gauc" if task == "ctr" else "ndcg@10"
    labels = [p["label"] for p in result["points"]]
    assert labels == ["full", "1/2", "1/4", "1/8", "1/16", "1/32", "1/64", "last 8"]
    assert [a["label"] for a in result["anchors"]] == (["item-mean", "item-mean+user-rate", "mf"] if task == "ctr"
                                                       else ["popular", "mf"])
    full = result["points"][0]
    assert full["metrics"][primary] == pytest.approx(result["native_test_metrics"][primary])  # the run's own test
    assert all(p["se"][primary] > 0 for p in result["points"] + result["anchors"])
    kept = [p["kept_mean"] for p in result["points"][:7]]
    assert kept == sorted(kept, reverse=True) and kept[-1] >= 1
    assert f"| full | {full['kept_mean']:.1f} | {full['metrics'][primary]:.4f} +- " in out
    assert "anchor: " in out and "wrote " in out
    before = path.stat().st_mtime_ns
    assert main(args) == 0  # identical call: skipped
    assert path.stat().st_mtime_ns == before


@pytest.mark.parametrize("args, words", [
    (["sensitivity", "ml-5k"], "unknown data set 'ml-5k'; known: ml-100k"),
    (["sensitivity", "synthetic:nope"], "only synthetic takes a preset, one of default, long-range"),
    (["sensitivity", "ml-100k:long-range"], "only synthetic takes a preset"),
    (["sensitivity", "ml-1m"], "source 'ml-1m' needs a path"),
    (["sensitivity", "synthetic", "--bootstrap", "1"], "bootstrap resamples must be in 2..10,000"),
    (["sensitivity", "synthetic", "--set", "model.layers=0"], "model: layers must be in 1..256"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, capsys, args: list[str], words: str) -> None:
    assert main([*args, "--set", f"results_dir={tmp_path}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not any(tmp_path.iterdir())  # nothing written before the input was checked


def test_bad_task(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sensitivity", "synthetic", "--task", "ranking"])
    assert exit_info.value.code == 2 and "invalid choice: 'ranking'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="task must be one of ctr, retrieval, got 'ranking'"):
        sensitivity_config("synthetic", "ranking")
    with pytest.raises(ConfigError, match="split must be 'valid' or 'test'"):
        sensitivity(smoke(tmp_path), split="train")


def test_config_names_and_presets() -> None:
    assert parse_dataset("synthetic:long-range") == ("synthetic", "long-range")
    with pytest.raises(DataError):
        parse_dataset("nope")
    cfg = sensitivity_config("synthetic:short", "retrieval", overrides=["data.synthetic.num_users=10"])
    assert cfg.name == "synthetic-short-hstu-retrieval" and cfg.task == "retrieval"
    assert cfg.data.synthetic.preset == "short" and cfg.data.synthetic.topic_stickiness == 0.75
    assert cfg.data.synthetic.num_users == 10
    # a config file keeps its name for its own data set, not for another one (nor against an override)
    assert sensitivity_config("synthetic", "ctr", config=SMOKE).name == "smoke"
    assert sensitivity_config("ml-100k", "ctr", config=SMOKE).name == "ml-100k-hstu-ctr"
    assert sensitivity_config("ml-100k", "ctr", config=SMOKE, overrides=["name=mine"]).name == "mine"


# -- calibration of the synthetic presets ----------------------------------------------------------------------------
# The run of `calibration_config` (seed 0 here) under the blind CTR protocol. The margins come from its seeds 0-3
# (`experiments/calibrate_presets.py`; the values measured are in experiments/README.md): seed 0 is the weakest
# long-range draw, so the check is a drop of 0.03 and of 1.5 paired SE; the small model barely learns the burst rule
# of `short`, so "close" is a loose check: within 0.06.
LONG_RANGE_MIN_DROP = 0.03
LONG_RANGE_MIN_SE = 1.5
SHORT_MAX_DELTA = 0.06


def _calibration(tmp_path: Path, preset: str) -> dict:
    from malloc.sensitivity import calibration_config

    result = sensitivity(calibration_config(preset, seed=0, results_dir=str(tmp_path)),
                         points=[Truncation(), Truncation(fraction=16)], resamples=100, show_progress=False)
    return result["points"][1]


def test_calibration_long_range_needs_the_whole_history(tmp_path: Path) -> None:
    cut = _calibration(tmp_path, "long-range")
    assert cut["delta"]["gauc"] < -LONG_RANGE_MIN_DROP
    assert cut["delta"]["gauc"] < -LONG_RANGE_MIN_SE * cut["delta_se"]["gauc"]


def test_calibration_short_needs_only_recent_events(tmp_path: Path) -> None:
    cut = _calibration(tmp_path, "short")
    assert abs(cut["delta"]["gauc"]) < SHORT_MAX_DELTA
