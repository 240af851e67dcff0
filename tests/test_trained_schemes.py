"""Trained-in schemes end to end: `malloc train --scheme`, their meters, and composition with cache policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_dirs
from malloc.cli import main
from malloc.memory.policy import SchemeError
from malloc.memory.registry import build_model_for, build_policy
from malloc.memory.schemes import ARCHITECTURES
from malloc.models import ModelConfig
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def run_meters(root: Path, name: str) -> dict:
    (run,) = [p for p in run_dirs(root) if p.name.rsplit("-", 1)[0] == name and (p / "done.json").exists()]
    return json.loads((run / "meters.json").read_text())


def test_train_with_a_scheme_records_its_ratio_and_macs(tmp_path, capsys):
    assert main(["train", "--config", SMOKE, "--quiet", "--set", f"results_dir={tmp_path}",
                 "--scheme", "gqa", "--memory-ratio", "1/2"]) == 0
    assert main(["train", "--config", SMOKE, "--quiet", "--set", f"results_dir={tmp_path}"]) == 0
    gqa, native = run_meters(tmp_path, "smoke-gqa"), run_meters(tmp_path, "smoke")
    assert gqa["scheme"] == "gqa" and gqa["scheme_knobs"] == {"groups": 2}
    # per event and layer: 2 heads x (4 + 4) fp32 + 12 bytes of metadata, against 4 heads
    assert gqa["memory_ratio"] == pytest.approx((2 * 8 * 4 + 12) / (4 * 8 * 4 + 12))
    assert native["memory_ratio"] == pytest.approx(1.0)
    assert gqa["macs_per_request"] < native["macs_per_request"]
    assert gqa["native_macs_per_request"] == pytest.approx(native["macs_per_request"])


@pytest.mark.parametrize(("args", "message"), [
    (["--scheme", "nope"], "unknown trained-in scheme"),
    (["--scheme", "h2o"], "training-free policy"),
    (["--scheme", "gqa", "--knob", "groups=3"], "gqa"),
    (["--scheme", "gqa", "--memory-ratio", "2"], "memory-ratio"),
    (["--memory-ratio", "0.5"], "need --scheme"),
])
def test_bad_scheme_arguments_fail_with_one_line(tmp_path, capsys, args, message):
    assert main(["train", "--config", SMOKE, "--quiet", "--set", f"results_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize(("scheme", "policy", "knobs"), [
    ("gqa", "kivi", {"bits": 2}),
    ("mla", "h2o", {}),
    ("mqa", "snapkv", {}),
])
@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_cache_policies_compose_with_head_schemes(scheme, policy, knobs, backbone):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=64,
                      scheme=scheme, memory_ratio=0.5)
    model = build_model_for(cfg, 40)
    events = synthetic_events(2, 140, 40, seed=0)
    plain = Engine(model).write(events.slice(0, 120))
    engine = Engine(model, build_policy(policy, 0.25, **knobs))
    states = engine.write(events.slice(0, 120))
    for start in range(120, 140, 5):
        states = engine.append(states, events.slice(start, start + 5))
        plain = Engine(model).append(plain, events.slice(start, start + 5))
    stored = [sum(layer.nbytes() for layer in s.layers) for s in states]
    uncompressed = [sum(layer.nbytes() for layer in s.layers) for s in plain]
    assert all(s < 0.8 * u for s, u in zip(stored, uncompressed, strict=True))  # KIVI keeps a full residual
    logits = engine.score(states, torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.full((2, 3), 2_000_000_000))
    assert torch.isfinite(logits).all()


def test_policies_refuse_schemes_with_a_state_of_their_own():
    own = [name for name, cls in ARCHITECTURES.items()
           if not build_model_for(ModelConfig(dim=16, layers=1, heads=4, head_dim=4, scheme=name, memory_ratio=0.5),
                              10).layers[0].plain_kv]
    for name in own:
        model = build_model_for(ModelConfig(dim=16, layers=1, heads=4, head_dim=4, scheme=name, memory_ratio=0.5), 10)
        with pytest.raises(SchemeError, match="state of its own"):
            Engine(model, build_policy("h2o", 0.25))


@pytest.mark.parametrize("scheme", ["native", *ARCHITECTURES])
def test_the_server_keeps_each_schemes_own_state_rule(scheme):
    """Serving without a policy stores exactly what the model's own append stores (e.g. Longformer's window)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=32, scheme=scheme,
                      memory_ratio=1.0 if scheme == "native" else 0.25)
    model = build_model_for(cfg, 40).eval()
    events = synthetic_events(2, 90, 40, seed=0)
    engine = Engine(model)
    served, direct = engine.write(events.slice(0, 60)), Engine(model).prefill(events.slice(0, 60))
    for start in range(60, 90, 10):
        served = engine.append(served, events.slice(start, start + 10))
        direct = Engine(model).append(direct, events.slice(start, start + 10))
    assert [s.nbytes() for s in served] == [s.nbytes() for s in direct]
    items, times = torch.tensor([[3, 4], [5, 6]]), torch.full((2, 2), 2_000_000_000)
    assert torch.allclose(engine.score(served, items, times), Engine(model).score(direct, items, times))


@pytest.mark.parametrize("scheme", ["gqa", "mla"])
def test_n_kept_switch_rescales_stored_events_of_head_schemes(scheme):
    """HSTU's "N = kept" switch (eval.hstu_normaliser) acts on head schemes' stored events too."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=64, scheme=scheme,
                      memory_ratio=0.5)
    model = build_model_for(cfg, 40)
    events = synthetic_events(2, 80, 40, seed=0)
    items, times = torch.tensor([[3, 4], [5, 6]]), torch.full((2, 2), 2_000_000_000)
    scores = []
    for renormalise in (False, True):
        engine = Engine(model, build_policy("h2o", 0.25), renormalise=renormalise)
        scores.append(engine.score(engine.write(events), items, times))
    assert not torch.allclose(scores[0], scores[1])
