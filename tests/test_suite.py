"""Benchmark suites: loading and checking, expansion into items, and the smoke suite end to end (a failing item, an
interruption, a resumed rerun)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from malloc.bench.suite import SuiteSpec, VariantSpec, _trained_groups, load_suite, plan, settings
from malloc.bench.sweep import SuiteRunner
from malloc.cli import main
from malloc.config import RunConfig
from malloc.configio import ConfigError, from_dict
from malloc.memory.schemes import ARCHITECTURES, POLICIES
from malloc.results import read_json
from smoke_suite import FAIL_AT, INTERRUPT_AT, smoke_run

SUITES = Path(__file__).resolve().parents[1] / "configs" / "suites"


@pytest.mark.parametrize("name", ["smoke", "default", "paper", "long", "synthetic4k", "trained", "training_free"])
def test_shipped_suites_load_and_plan(name):
    spec = load_suite(name, SUITES)
    items = plan(spec, "unused")
    assert items and items[0].kind == "native"
    assert len({item.id for item in items}) == len(items)


def test_default_suite_covers_every_registered_scheme():
    items = plan(load_suite("default", SUITES), "unused")
    assert {item.scheme for item in items} == set(POLICIES) | set(ARCHITECTURES)
    assert {item.setting.task for item in items} == {"ctr", "retrieval"}
    ratios = {r for item in items if item.kind == "policy" for r in item.ratios}
    assert ratios == {0.25, 0.0625}


def test_unknown_suite_lists_the_known_ones(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    with pytest.raises(ConfigError, match="unknown suite 'nope'; known suites: mine"):
        load_suite("nope", tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\nratio: [0.5]\n", "unknown key 'ratio'"),
    ("name: x\nratios: [2]\n", "must be in (0, 1)"),
    ("name: x\nratios: [1/0]\n", "not a number or a fraction"),
    ("name: x\nschemes: [nope]\n", "schemes[0]: unknown scheme 'nope'"),
    ("name: x\nbase: {model: {layerz: 2}}\n", "unknown key 'model.layerz'"),
    ("name: x\ntasks: {ctr: {train: {epochs: 0}}}\n", "setting ml100k/hstu/ctr"),
    ("name: x\nlatency: {users: -1}\n", "users must be in 0..100,000"),
])
def test_bad_suite_files_are_one_clear_error(tmp_path, text, message):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        spec = load_suite("x", tmp_path)
        plan(spec, tmp_path)
    assert message in str(info.value)


def test_cli_bench_unknown_suite_is_exit_2(capsys):
    assert main(["bench", "--suite", "no-such-suite"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'no-such-suite'; known suites:" in err and "smoke" in err


def test_settings_merge_base_then_axes():
    spec = from_dict(SuiteSpec, {
        "name": "t", "base": {"train": {"epochs": 3}, "model": {"layers": 1}},
        "backbones": {"hstu": {}, "sasrec": {"model": {"layers": 2}}},
        "tasks": {"ctr": {}, "retrieval": {"train": {"epochs": 5}}},
        "datasets": {"a": {"config": {"data": {"source": "synthetic"}}},
                     "b": {"config": {"data": {"source": "microvideo"}}, "needs_path": True}},
        "seeds": [0, 1]})
    found = settings(spec, "res")
    assert len(found) == 2 * 2 * 2  # data set b has no path: left out
    by_key = {s.key: s.cfg for s in found}
    assert by_key["a-sasrec-retrieval-s1"].model.layers == 2 and by_key["a-hstu-ctr-s0"].model.layers == 1
    assert by_key["a-hstu-retrieval-s0"].train.epochs == 5 and by_key["a-hstu-ctr-s0"].train.epochs == 3
    assert by_key["a-sasrec-ctr-s1"].train.seed == 1 and by_key["a-sasrec-ctr-s1"].model.backbone == "sasrec"
    assert by_key["a-hstu-ctr-s0"].results_dir == str(Path("res") / "t" / "runs")
    assert len(settings(spec, "res", {"b": "/data/b"})) == 16
    with pytest.raises(ConfigError, match="--data c: not a data set"):
        settings(spec, "res", {"c": "/x"})


def test_trained_in_ratios_that_build_the_same_model_train_once():
    cfg = from_dict(RunConfig, {"model": {"heads": 4}})
    assert _trained_groups(cfg, "mqa", {}, [0.5, 0.25, 0.0625]) == [(0.5, 0.25, 0.0625)]
    assert _trained_groups(cfg, "gqa", {}, [0.5, 0.25, 0.0625]) == [(0.5,), (0.25, 0.0625)]
    assert len(_trained_groups(cfg, "mla", {}, [0.5, 0.25])) == 2


def test_variants_and_planning_errors_become_items():
    spec = replace(load_suite("smoke", SUITES), schemes=("recency",), tasks={"ctr": {}},
                   variants={"pyr": VariantSpec("pyramid", {"inner": "h2o"}),
                             "gqa3": VariantSpec("gqa", {"groups": 3})})
    items = {item.id.split("--")[1]: item for item in plan(spec, "unused")}
    assert set(items) == {"native", "recency-r0.5", "recency-r0.25", "pyr-r0.5", "pyr-r0.25", "gqa3"}
    assert items["pyr-r0.5"].kind == "policy" and items["pyr-r0.5"].knobs == {"inner": "h2o"}
    assert "positive divisor" in items["gqa3"].plan_error


# -- the smoke suite end to end -------------------------------------------------------------------------------
def test_smoke_suite_fails_one_item_and_goes_on_then_resumes():
    run = smoke_run()
    ids = [item.id for item in run.items]
    assert run.interrupted
    assert run.first_pass == ids[:INTERRUPT_AT]  # the failure at FAIL_AT did not stop the first pass
    # the rerun skips what the first pass finished, retries the failed item and runs the rest
    assert run.second_pass == [ids[FAIL_AT - 1], *ids[INTERRUPT_AT - 1:]]
    assert run.outcome is not None and run.outcome.skipped == INTERRUPT_AT - 2
    items = run.folder / "items"
    first_failure = read_json(items / f"{ids[FAIL_AT - 1]}.json")
    assert first_failure["status"] == "done"  # retried and done
    # int8 cannot reach 1/4 of the bytes: an unreachable item with its error, in both tasks; nothing failed
    unreachable = sorted(i for i in run.outcome.unreachable)
    assert unreachable == sorted(i for i in ids if i.endswith("int8-r0.25")) and not run.outcome.failed
    record = read_json(items / f"{unreachable[0]}.json")
    assert record["status"] == "failed" and record["error"]["type"] == "SchemeError"
    assert "reachable" in record["error"]["message"] and record["error"]["traceback"]


def test_smoke_suite_records_carry_every_meter():
    run = smoke_run()
    records = [read_json(run.folder / "items" / f"{item.id}.json") for item in run.items]
    done = [r for r in records if r["status"] == "done"]
    assert len(done) == len(records) - 2
    for record in done:
        meters = record["meters"]
        for key in ("state_bytes_mean", "state_bytes_p50", "state_bytes_p99", "memory_ratio", "macs_per_request",
                    "native_macs_per_request", "recompute_macs_per_request", "request_ms_p50", "request_ms_p99",
                    "request_threads", "batched_request_ms_p50", "train_seconds_per_epoch"):
            assert meters.get(key) is not None, (record["item"], key)
        assert record["environment"]["threads"] >= 1 and record["metrics"] and record["native_metrics"]
        if record["kind"] == "native":
            assert meters["memory_ratio"] == pytest.approx(1.0) and meters["recompute_latency"]
        else:
            assert len(record["per_user"]["users"]) == len(record["per_user"]["delta"]) > 0
            assert record["fidelity"]
            assert meters["memory_ratio"] < 0.9  # every smoke arm stores less than Native
    # training-free items reuse the writes of earlier items of the same checkpoint (the same prefill kind)
    policies = [r for r in done if r["kind"] == "policy"]
    assert all(set(r["prefill_cache"]) == {"hits", "misses"} for r in policies)
    assert any(r["prefill_cache"]["hits"] > 0 and r["prefill_cache"]["misses"] == 0 for r in policies)
    manifest = read_json(run.folder / "suite.json")
    assert manifest["command"] == "malloc bench --suite smoke" and [i["item"] for i in manifest["items"]] == [
        item.id for item in run.items]
    assert manifest["environment"]["versions"]["torch"]


def test_a_changed_suite_config_reruns_the_items_it_changes(tmp_path, caplog):
    """A record made under another config of its setting is not reused: changing the retrieval task's training
    marks every retrieval item to rerun (logged with both hashes), and leaves the CTR items done."""
    run = smoke_run()
    shutil.copytree(run.folder, tmp_path / "smoke")
    spec = load_suite("smoke")
    same = SuiteRunner(spec, tmp_path)
    done = {item.id for item in same.items if same.is_done(item)}
    assert done == {item.id for item in same.items if not item.id.endswith("int8-r0.25")}
    changed = SuiteRunner(replace(spec, tasks={"ctr": {}, "retrieval": {"train": {"epochs": 2}}}), tmp_path)
    still = {item.id for item in changed.items if changed.is_done(item)}
    assert still == {i for i in done if "-ctr-" in i}
    assert "made under another config of its setting" in caplog.text
