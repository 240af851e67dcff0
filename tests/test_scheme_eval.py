"""Scheme evaluation: fidelity helpers, the retrieval replay's top-k, and ``malloc methods`` / ``malloc eval --scheme``
on the smoke config (JSON layout, Native cache, skip, --force, one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_dirs
from malloc.cli import main, parse_knobs, parse_ratio
from malloc.eval.fidelity import ctr_fidelity, retrieval_fidelity
from malloc.eval.statistics import average_ranks, pearson, spearman
from malloc.memory.policy import SchemeError
from malloc.memory.registry import scheme_names, wrapper_names
from malloc.memory.schemes import ARCHITECTURES
from malloc.results import read_json

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


# -- fidelity helpers --------------------------------------------------------------------------------------------
def test_average_ranks_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 50).astype(float)  # many ties
    b = a + rng.normal(0, 1, 50)
    np.testing.assert_allclose(average_ranks(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic)
    assert np.isnan(pearson(np.ones(4), np.arange(4)))


def test_ctr_fidelity_by_hand():
    users = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array([1, 0, 0, 1, 0, 1])  # user 2 has one class: skipped
    native = np.array([3.0, 1.0, 2.0, 0.0, 1.0, 5.0])
    same = ctr_fidelity(users, labels, native, native)
    assert same["logit_pearson"] == pytest.approx(1.0) and same["logit_abs_delta_mean"] == 0.0
    assert same["user_auc_delta_mean"] == 0.0 and same["user_auc_delta_std"] == 0.0 and same["users_compared"] == 2
    scheme = np.array([0.5, 1.0, 2.0, 2.0, 1.0, 5.0])  # user 0: AUC 1 -> 0; user 1: AUC 0 -> 1
    got = ctr_fidelity(users, labels, scheme, native)
    assert got["user_auc_delta_mean"] == pytest.approx(0.0) and got["user_auc_delta_std"] == pytest.approx(1.0)
    assert got["logit_abs_delta_mean"] == pytest.approx((2.5 + 2.0) / 6)


def test_retrieval_fidelity_by_hand():
    native_top = np.tile(np.arange(10), (2, 1))
    top = native_top.copy()
    top[1, 5:] += 100  # user 1 shares half of its top 10
    ranks, native_ranks = np.array([1, 20]), np.array([1, 3])
    got = retrieval_fidelity(ranks, top, native_ranks, native_top)
    assert got["top10_overlap_mean"] == pytest.approx(0.75)
    deltas = np.array([0.0, 0.0 - 1 / np.log2(4)])
    assert got["ndcg@10_delta_mean"] == pytest.approx(deltas.mean())
    assert got["ndcg@10_delta_std"] == pytest.approx(deltas.std())
    assert got["target_rank_spearman"] == pytest.approx(1.0)


def test_parse_knobs_and_ratio():
    assert parse_knobs(["bits=4", "inner=h2o", "inner_knobs.window=8", "x=0.5", "flag=true"]) == {
        "bits": 4, "inner": "h2o", "inner_knobs": {"window": 8}, "x": 0.5, "flag": True}
    assert parse_ratio("1/8") == 0.125 and parse_ratio("0.25") == 0.25
    for bad in (["bits"], ["=3"]):
        with pytest.raises(SchemeError, match="KEY=VALUE"):
            parse_knobs(bad)
    with pytest.raises(SchemeError, match="memory-ratio"):
        parse_ratio("half")


# -- malloc methods ----------------------------------------------------------------------------------------------
def test_methods_table_and_json(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "granularity", "family"]
    for name in [*scheme_names(), *ARCHITECTURES, *wrapper_names()]:
        assert any(line.startswith(name + " ") for line in lines), name
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [*scheme_names(), *ARCHITECTURES, *wrapper_names()]
    assert {r["family"] for r in rows if r["name"] in wrapper_names()} == {"wrapper"}
    assert {r["family"] for r in rows if r["name"] in ARCHITECTURES} == {"trained-in"}
    assert set(rows[0]) == {"name", "granularity", "family", "knobs", "knob_rules", "keeps"}


# -- malloc eval --scheme ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Smoke runs (CTR and retrieval) trained once for this module."""
    root = tmp_path_factory.mktemp("runs")
    for task in ("ctr", "retrieval"):
        assert main(["train", "--config", SMOKE, "--quiet", "--set", f"results_dir={root}",
                     "--set", f"task={task}"]) == 0
    return root


def _base(root: Path, task: str = "ctr") -> list[str]:
    return ["eval", "--config", SMOKE, "--set", f"results_dir={root}", "--set", f"task={task}"]


def _run_dir(root: Path, task: str) -> Path:
    (run,) = [p for p in run_dirs(root) if f"task: {task}" in (p / "config.yaml").read_text()]
    return run


def test_eval_scheme_writes_json_caches_native_and_skips(trained, capsys):
    args = [*_base(trained), "--scheme", "recency", "--memory-ratio", "0.5"]
    assert main(args) == 0
    run = _run_dir(trained, "ctr")
    (path,) = (run / "schemes").glob("recency-r0.5-e*.json")  # the smoke config's eval settings are not default
    native_cache = run / "schemes" / "native-predictions-test.npz"
    assert path.is_file() and native_cache.is_file()
    result = read_json(path)
    assert set(result) >= {"scheme", "knobs", "memory_ratio_target", "metrics", "native", "meters", "fidelity",
                           "split", "task", "run_id", "policy"}
    assert result["scheme"] == "recency" and result["knobs"] == {} and result["memory_ratio_target"] == 0.5
    meters, fidelity = result["meters"], result["fidelity"]
    assert 0.3 < meters["memory_ratio"] <= 0.5 and meters["memory_ratio_user_max"] <= 0.5
    for key in ("state_bytes_mean", "state_bytes_p50", "state_bytes_p99", "batched_request_ms_p50",
                "batched_request_ms_p99", "macs_per_request", "recompute_macs_per_request"):
        assert meters[key] > 0, key
    assert meters["macs_per_request"] < meters["native_macs_per_request"] < meters["recompute_macs_per_request"]
    assert {"logit_pearson", "logit_spearman", "logit_abs_delta_mean", "user_auc_delta_mean",
            "user_auc_delta_std"} <= set(fidelity)
    assert set(result["native"]["metrics"]) >= {"auc", "gauc", "logloss"}

    # a second identical call is skipped; Native is cached across schemes
    before, native_before = path.stat().st_mtime_ns, native_cache.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "skipping" in capsys.readouterr().out and path.stat().st_mtime_ns == before
    assert main([*_base(trained), "--scheme", "random", "--memory-ratio", "1/4", "--knob", "seed=3"]) == 0
    assert native_cache.stat().st_mtime_ns == native_before
    (knobbed,) = (run / "schemes").glob("random-r0.25-*.json")
    assert read_json(knobbed)["knobs"] == {"seed": 3}
    assert main([*args, "--force"]) == 0
    assert path.stat().st_mtime_ns != before


def test_eval_native_scheme_is_faithful(trained):
    assert main([*_base(trained), "--scheme", "native"]) == 0
    (path,) = (_run_dir(trained, "ctr") / "schemes").glob("native-r1-e*.json")
    result = read_json(path)
    assert result["meters"]["memory_ratio"] == 1.0 and result["fidelity"]["logit_abs_delta_mean"] == 0.0
    assert result["metrics"] == result["native"]["metrics"]


def test_eval_wrapper_on_retrieval(trained):
    assert main([*_base(trained, "retrieval"), "--scheme", "pyramid", "--memory-ratio", "0.25",
                 "--knob", "inner=snapkv", "--knob", "inner_knobs.window=2"]) == 0
    (path,) = (_run_dir(trained, "retrieval") / "schemes").glob("pyramid-r0.25-*.json")
    result = read_json(path)
    assert result["knobs"] == {"inner": "snapkv", "inner_knobs": {"window": 2}}
    assert {"top10_overlap_mean", "target_rank_spearman", "ndcg@10_delta_mean", "ndcg@10_delta_std"} <= set(
        result["fidelity"])
    assert 0.0 <= result["fidelity"]["top10_overlap_mean"] <= 1.0
    assert result["meters"]["macs_request_shape"]["catalogue"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scheme", "h3o", "--memory-ratio", "0.5"], "h3o"),
        (["--scheme", "h2o", "--memory-ratio", "0.5", "--knob", "windw=2"], "windw"),
        (["--scheme", "h2o", "--memory-ratio", "1.5"], "memory_ratio"),
        (["--scheme", "h2o", "--memory-ratio", "lots"], "lots"),
        (["--scheme", "pyramid", "--memory-ratio", "0.5"], "inner"),
        (["--memory-ratio", "0.5"], "--scheme"),
        (["--scheme", "recency", "--memory-ratio", "0.5", "--set", "results_dir=/nonexistent-results"],
         "malloc train"),
    ],
)
def test_eval_scheme_errors_are_one_line(trained, capsys, extra, message):
    assert main([*_base(trained), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("malloc eval: error:") and message in err and "\n" not in err
