"""benchmarks/state_bytes.py: each scheme's stored bytes against history length, through the serving path."""

from __future__ import annotations

import json

import pytest


@pytest.fixture()
def script(benchmark_script):
    return benchmark_script("state_bytes")


def rows(script, capsys, *args: str) -> list[dict]:
    assert script.main(["--dim", "16", "--heads", "4", "--head-dim", "4", "--prefill-chunk", "32", "--threads", "1",
                        "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_fixed_and_windowed_states_against_history_length(script, capsys):
    lengths = [32, 64, 128]
    got = rows(script, capsys, "--schemes", "rwkv,longformer,linformer,mqa,recency,h2o,int8", "--ratios", "1/4",
               "--lengths", ",".join(map(str, lengths)))
    by = {(r["scheme"], r.get("history_len")): r for r in got}
    # RWKV stores the same bytes at every length, so its ratio falls as 1/n
    rwkv = [by["rwkv", n] for n in lengths]
    assert len({r["layer_bytes"] for r in rwkv}) == 1
    assert rwkv[0]["memory_ratio"] == pytest.approx(2 * rwkv[1]["memory_ratio"])
    # Longformer at 1/4 of max_len 128: window + globals = 32 events, so it keeps every event of a 32-event history
    assert by["longformer", 32]["memory_ratio"] == 1.0 and by["longformer", 128]["memory_ratio"] == 0.25
    assert by["longformer", 128]["stored_tokens"] == 32
    # Linformer's k rows cost the same whatever the history; MQA shares one KV head at every length
    assert by["linformer", 32]["layer_bytes"] == by["linformer", 128]["layer_bytes"]
    assert {round(by["mqa", n]["memory_ratio"], 6) for n in lengths} == {round(by["mqa", 32]["memory_ratio"], 6)}
    # every trained-in point equals its analytic formula; Native's bytes grow linearly
    assert all(r["formula_bytes"] == r["layer_bytes"] for r in got if r["family"] == "trained-in")
    assert by["recency", 128]["native_layer_bytes"] == 4 * by["recency", 32]["native_layer_bytes"]
    # a byte budget: H2O's per-event score costs events, so it keeps fewer than recency within the same bytes
    for n in lengths:
        assert by["h2o", n]["layer_bytes"] <= 0.25 * by["h2o", n]["native_layer_bytes"]
        assert by["h2o", n]["stored_tokens"] <= by["recency", n]["stored_tokens"]
    # an unreachable ratio is a row with its reason, and the other schemes still run
    assert "below the reachable ratio" in by["int8", None]["error"]


def test_the_table_reports_the_formula_check(script, capsys):
    assert script.main(["--dim", "16", "--head-dim", "4", "--schemes", "rwkv,beacon,kivi", "--ratios", "1/4,1/64",
                        "--lengths", "64,128", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "equal to the measured bytes at every point" in out
    assert "not reachable" in out and "alpha=" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--schemes", "rwkv,h2oo"], "--schemes: unknown h2oo"),
    (["--ratios", "1/0"], "--ratios"),
    (["--ratios", "2"], "--ratios"),
    (["--lengths", "0,64"], "positive integers"),
])
def test_bad_arguments_are_one_clear_error(script, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
