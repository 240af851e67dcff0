"""Fast checks of the profiling helpers: timing loop, request latency on a tiny model, peak memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from malloc.errors import MallocError
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.profiling import (
    measure_peak_in_subprocess,
    peak_rss_mb,
    request_latency,
    synthetic_candidates,
    synthetic_events,
    synthetic_training_batch,
    time_call,
    training_step,
)
from malloc.serving.engine import Engine

TINY_TIMING = {"warmup": 1, "min_repeats": 2, "min_seconds": 0.0, "max_repeats": 3}


def tiny_model(backbone: str):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=1, heads=4, head_dim=4, dropout=0.0, max_len=32)
    return build_model_for(cfg, 50)


def test_synthetic_events_shapes_and_order():
    events = synthetic_events(3, 20, 50, seed=1)
    assert events.items.shape == events.actions.shape == events.timestamps.shape == (3, 20)
    assert events.items.min() >= 1 and events.items.max() <= 50
    assert (events.timestamps.diff(dim=1) > 0).all()
    assert events.lengths.tolist() == [20, 20, 20]
    assert torch.equal(events.items, synthetic_events(3, 20, 50, seed=1).items)


def test_time_call_counts_and_positive():
    calls = []
    seconds = time_call(lambda: calls.append(1), warmup=3, min_repeats=7, min_seconds=0.0)
    assert isinstance(seconds, np.ndarray) and seconds.shape == (7,)
    assert (seconds > 0).all()
    assert len(calls) == 3 + 7


def test_time_call_repeats_until_min_seconds_and_caps():
    seconds = time_call(lambda: sum(range(1000)), warmup=0, min_repeats=1, min_seconds=0.02,
                        max_repeats=100_000)
    assert seconds.sum() >= 0.02
    capped = time_call(lambda: None, warmup=0, min_repeats=2, min_seconds=10.0, max_repeats=4)
    assert capped.shape == (4,)
    with pytest.raises(ValueError, match="min_repeats"):
        time_call(lambda: None, min_repeats=5, max_repeats=2)


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_request_latency_tiny(backbone):
    model = tiny_model(backbone)
    point = request_latency(model, 32, candidates=5, append_events=2, **TINY_TIMING)
    assert set(point) == {"history_len", "users", "chain", "cached_ms_p50", "cached_ms_p99", "recompute_ms_p50",
                          "recompute_ms_p99", "cached_ms_per_user", "recompute_ms_per_user", "speedup_p50",
                          "state_bytes", "threads", "repeats_cached", "repeats_recompute"}
    assert point["history_len"] == 32 and point["users"] == 1
    assert point["cached_ms_per_user"] == point["cached_ms_p50"]
    assert 0 < point["cached_ms_p50"] <= point["cached_ms_p99"]
    assert 0 < point["recompute_ms_p50"] <= point["recompute_ms_p99"]
    assert point["speedup_p50"] > 0
    assert point["threads"] == torch.get_num_threads()
    assert 2 <= point["repeats_cached"] <= 3 and 2 <= point["repeats_recompute"] <= 3
    assert not model.training
    # state_bytes is the stored history's exact size
    stored = Engine(model).prefill(synthetic_events(1, 32, model.num_items, seed=0))
    assert point["state_bytes"] == stored[0].nbytes()


def test_request_latency_chained_requests_append_to_the_newest_state():
    """With chain, each repeat appends to the state the previous one returned: the same scores as a request from
    the stored state plus the events appended so far (checked here through the engine directly)."""
    model = tiny_model("hstu")
    point = request_latency(model, 32, candidates=3, chain=True, **TINY_TIMING)
    assert point["chain"] is True and point["history_len"] == 32 and point["cached_ms_p50"] > 0
    events = synthetic_events(1, 34, model.num_items, seed=0)
    engine = Engine(model)
    with torch.no_grad():
        stored = engine.prefill(events.slice(0, 32))
        chained, _ = engine.request(stored, events.slice(32, 33), *synthetic_candidates(events, 3, model.num_items, 1))
        chained, _ = engine.request(chained, events.slice(33, 34), *synthetic_candidates(events, 3, model.num_items, 1))
        assert chained[0].layers[0].spare is not None  # the appends went into spare rows
        whole = engine.prefill(events)
    for got, expected in zip(chained[0].layers, whole[0].layers, strict=True):
        torch.testing.assert_close(got.keys, expected.keys, atol=1e-5, rtol=0)
        assert torch.equal(got.positions, expected.positions)


def test_request_latency_recompute_timing_overrides():
    point = request_latency(tiny_model("sasrec"), 16, candidates=3, **TINY_TIMING,
                            recompute_timing={"warmup": 0, "min_repeats": 1, "max_repeats": 1})
    assert point["repeats_recompute"] == 1 and point["repeats_cached"] >= 2


def test_request_latency_batched_users():
    """A request of several users is one call over their states: the per-user figures divide the call's p50,
    and state_bytes stays one user's."""
    model = tiny_model("hstu")
    point = request_latency(model, 16, candidates=3, users=4, **TINY_TIMING)
    assert point["users"] == 4
    assert point["cached_ms_per_user"] == pytest.approx(point["cached_ms_p50"] / 4)
    assert point["recompute_ms_per_user"] == pytest.approx(point["recompute_ms_p50"] / 4)
    assert point["state_bytes"] == Engine(model).prefill(synthetic_events(1, 16, model.num_items, seed=0))[0].nbytes()


def test_request_latency_rejects_bad_sizes():
    with pytest.raises(ValueError, match="history_len"):
        request_latency(tiny_model("hstu"), 0, **TINY_TIMING)
    with pytest.raises(ValueError, match="users"):
        request_latency(tiny_model("hstu"), 4, users=0, **TINY_TIMING)


def test_training_step_updates_parameters():
    model = tiny_model("sasrec")
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = synthetic_training_batch(2, 8, model.num_items, seed=0)
    assert batch.num_events == 16
    before = model.ctr_head.weight.detach().clone()
    loss = training_step(model, optimiser, batch)
    assert np.isfinite(loss)
    assert not torch.equal(before, model.ctr_head.weight)


def test_peak_rss_positive():
    assert peak_rss_mb() > 0


def test_measure_peak_in_subprocess():
    measured = measure_peak_in_subprocess("malloc.profiling.memory:allocate", {"megabytes": 64})
    assert measured["result"]["allocated_mb"] == 64
    assert measured["peak_rss_mb"] > 0
    assert measured["peak_rss_mb"] >= measured["import_rss_mb"]


@pytest.mark.parametrize("target", ["no_colon", "a:b:c", "mod:", ":func", "bad module:f", 3])
def test_measure_peak_rejects_malformed_target(target):
    with pytest.raises(ValueError, match="module:function"):
        measure_peak_in_subprocess(target, {})


def test_measure_peak_reports_subprocess_error():
    with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
        measure_peak_in_subprocess("malloc.no_such_module:f", {})
    with pytest.raises(RuntimeError, match="AttributeError"):
        measure_peak_in_subprocess("malloc.profiling.memory:no_such_function", {})
    with pytest.raises(RuntimeError, match="TypeError"):
        measure_peak_in_subprocess("malloc.profiling.memory:allocate", {"wrong": 1})


def test_measure_peak_rejects_unserialisable_kwargs():
    with pytest.raises(ValueError, match="JSON"):
        measure_peak_in_subprocess("malloc.profiling.memory:allocate", {"megabytes": object()})



def test_batched_write_benchmark_runs(capsys, benchmark_script):
    """benchmarks/batched_write.py end to end on tiny lengths (its timings are in docs/BENCHMARKS.md)."""
    module = benchmark_script("batched_write")
    assert module.main(["--users", "3", "--min-len", "4", "--max-len", "40", "--prefill-chunk", "8",
                        "--max-scores", "1,100000", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["lengths"]) == 3 and result["lengths"] == sorted(result["lengths"], reverse=True)
    assert 4 <= min(result["lengths"]) and max(result["lengths"]) <= 40
    assert set(result["batched_s"]) == {"1", "100000"} and result["one_by_one_s"] > 0


def test_request_path_benchmark_runs(capsys, benchmark_script):
    """benchmarks/request_path.py end to end on a short history; bad sizes are argparse errors."""
    module = benchmark_script("request_path")
    assert module.main(["--backbones", "hstu", "--lengths", "3", "--candidates", "4", "--repeats", "2",
                        "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["history_len"] == 3 and row["two_pass_ms_p50"] > 0 and row["one_pass_ms_p50"] > 0
    assert row["ratio"] == pytest.approx(row["two_pass_ms_p50"] / row["one_pass_ms_p50"])
    with pytest.raises(SystemExit):
        module.main(["--repeats", "0"])


def test_latency_benchmark_reports_rooflines(capsys, benchmark_script):
    """benchmarks/latency.py puts each point against its roofline: the arithmetic (2 x MACs at the given GFLOP/s
    per thread) or the state read (bytes at the given GB/s per thread), whichever is longer."""
    module = benchmark_script("latency")
    assert module.main(["--backbones", "hstu", "--lengths", "8", "--candidates", "4", "--threads", "1",
                        "--min-repeats", "2", "--min-seconds", "0", "--recompute-min-repeats", "1",
                        "--peak-gflops", "1e-6", "--bandwidth-gbs", "1e6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["cached_macs"] > 0 and row["recompute_macs"] > row["cached_macs"]
    # at 1 kFLOP/s and 1 PB/s the arithmetic bounds both
    assert row["cached_roofline_ms"] == pytest.approx(1e3 * 2 * row["cached_macs"] / 1e3)
    assert row["cached_x_roofline"] == pytest.approx(row["cached_ms_p50"] / row["cached_roofline_ms"])
    assert row["recompute_x_roofline"] == pytest.approx(row["recompute_ms_p50"] / row["recompute_roofline_ms"])
    module.main(["--backbones", "hstu", "--lengths", "8", "--candidates", "4", "--threads", "1", "--min-repeats",
                 "2", "--min-seconds", "0", "--recompute-min-repeats", "1", "--peak-gflops", "1e9",
                 "--bandwidth-gbs", "1e-9", "--json"])
    row = json.loads(capsys.readouterr().out)  # at 1 byte/s the state read bounds the cached request
    assert row["cached_roofline_ms"] == pytest.approx(1e3 * row["state_bytes"])
    # a batched request: one point per users count, the roofline covering every user's bytes
    module.main(["--backbones", "hstu", "--lengths", "8", "--users", "1,3", "--candidates", "4", "--threads", "1",
                 "--min-repeats", "2", "--min-seconds", "0", "--recompute-min-repeats", "1", "--peak-gflops", "1e9",
                 "--bandwidth-gbs", "1e-9", "--json"])
    one, three = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (one["users"], three["users"]) == (1, 3)
    assert three["cached_roofline_ms"] == pytest.approx(3 * one["cached_roofline_ms"])
    assert one["target_10x_at_1024_met"] is None
    with pytest.raises(SystemExit):
        module.main(["--users", "0"])


def test_latency_benchmark_times_the_kernel_on_and_off(capsys, benchmark_script):
    """--kernels on,off: one HSTU point per setting, side by side; SASRec (no HSTU layer) only once; a bad
    setting is an argparse error."""
    module = benchmark_script("latency")
    assert module.main(["--backbones", "hstu,sasrec", "--lengths", "8", "--candidates", "4", "--threads", "1",
                        "--min-repeats", "2", "--min-seconds", "0", "--recompute-min-repeats", "1",
                        "--kernels", "on,off", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["backbone"], r["kernel"]) for r in rows] == [("hstu", "on"), ("hstu", "off"), ("sasrec", "on")]
    for bad in ("maybe", "on,on", ""):
        with pytest.raises(SystemExit):
            module.main(["--kernels", bad])


def test_throughput_benchmark_times_the_kernel_on_and_off(capsys, benchmark_script):
    module = benchmark_script("throughput")
    assert module.main(["--backbones", "hstu", "--max-len", "12", "--batch-size", "2", "--num-items", "50",
                        "--warmup-steps", "1", "--steps", "2", "--threads", "1", "--kernels", "off,on",
                        "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kernel"] for r in rows] == ["off", "on"] and all(r["events_per_s"] > 0 for r in rows)
    assert module.main(["--backbones", "hstu", "--scheme", "longformer", "--memory-ratio", "0.25", "--max-len", "16",
                        "--batch-size", "2", "--num-items", "50", "--warmup-steps", "1", "--steps", "1",
                        "--threads", "1", "--kernels", "on", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["scheme"], r["memory_ratio"]) for r in rows] == [("longformer", 0.25)]
    with pytest.raises(MallocError, match="nosuch"):
        module.main(["--scheme", "nosuch", "--max-len", "8", "--steps", "1"])


def test_request_profile_benchmark_lists_operators(capsys, benchmark_script):
    """benchmarks/request_profile.py: the top operators of a request, their shares of the operator time in
    decreasing order; bad sizes are argparse errors."""
    module = benchmark_script("request_profile")
    assert module.main(["--length", "8", "--users", "2", "--candidates", "3", "--repeats", "2", "--top", "4",
                        "--threads", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 4 and all(r["users"] == 2 and r["length"] == 8 and not r["training"] for r in rows)
    shares = [r["share"] for r in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert all(r["ms_per_request"] > 0 and r["calls_per_request"] > 0 for r in rows)
    assert module.main(["--training", "--length", "8", "--users", "2", "--repeats", "1", "--top", "50",
                        "--threads", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert all(r["training"] and r["ms_per_step"] > 0 for r in rows)
    assert any("backward" in r["operator"] for r in rows)  # the step's backward pass is profiled too
    with pytest.raises(SystemExit):
        module.main(["--users", "0"])


def test_request_profile_chained_requests_join_no_stored_layer(capsys, benchmark_script):
    """With --chain each request appends in place: four fewer joins (keys, values, positions, times) per layer
    than requests that all start from one stored state."""
    module = benchmark_script("request_profile")
    joins = {}
    for chain in (False, True):
        args = ["--length", "64", "--candidates", "3", "--repeats", "4", "--top", "200", "--threads", "1", "--json"]
        assert module.main(args + (["--chain"] if chain else [])) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert all(r["chain"] == chain for r in rows)
        joins[chain] = next((r["calls_per_request"] for r in rows if r["operator"] == "aten::cat"), 0.0)
    assert joins[False] - joins[True] == 4 * 2  # the default model's 2 layers


def test_observed_write_benchmark_runs(capsys, benchmark_script):
    """benchmarks/observed_write.py end to end on a short history: H2O at 1/4 keeps at most a quarter of the
    events (its byte budget, floors rounded down)."""
    module = benchmark_script("observed_write")
    assert module.main(["--history", "64", "--num-items", "50"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["history"] == 64 and 0 < row["kept_events"] <= 16 and row["peak_rss_mb"] >= row["rss_before_mb"] > 0


def test_attention_tiles_benchmark_runs(capsys, benchmark_script):
    """benchmarks/attention_tiles.py --tiles end to end on a short history (each tile size twice); no mode is an
    argparse error. (--compile is not run here: inductor takes 15 s or more to compile.)"""
    module = benchmark_script("attention_tiles")
    assert module.main(["--tiles", "--length", "40", "--tile-pairs", "64,4096"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["64", "4,096", "64", "4,096"]
    # the four ways of reading the bias agree (the script asserts it) on a small tile
    assert module.main(["--gathers", "--shapes", "2x3x5", "--train-shape", "1x2x2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(way in lines[0] for way in ("take", "indexing", "index_select", "joint"))
    with pytest.raises(SystemExit):
        module.main([])


def test_attention_kernel_benchmark_times_each_point(capsys, benchmark_script):
    """benchmarks/attention_kernel.py: the matmul yardstick and three kernel calls per thread count, in order,
    the forward calls with their time per pair; a bad thread list is an argparse error."""
    module = benchmark_script("attention_kernel")
    if not module.kernel.available():
        pytest.skip("no C compiler here: the kernel is not built")
    assert module.main(["--threads", "1", "--batch", "2", "--length", "12", "--stored", "20", "--candidates", "3",
                        "--repeats", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["point"] for r in rows] == ["matmul", "training forward", "training forward+backward",
                                          "request forward"]
    assert rows[0]["gflops"] > 0 and all(r["ms_p50"] > 0 for r in rows[1:])
    assert rows[1]["ns_per_pair"] > 0 and rows[2]["ns_per_pair"] is None and rows[3]["new"] == 4
    with pytest.raises(SystemExit):
        module.main(["--threads", "0"])
