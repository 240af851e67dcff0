"""experiments/beacon_learning.py: learning curves of Native, Beacon and the no-beacon floor (chunk_only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from malloc.config import load_config
from malloc.models import HSTU, ModelConfig
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def test_chunk_only_sees_and_stores_the_open_chunk_alone(experiment_script):
    script = experiment_script("beacon_learning")
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=64, scheme="beacon",
                      memory_ratio=0.5, knobs={"chunk": 4})
    model = HSTU(cfg, 40, scheme=script.ChunkOnly(memory_ratio=0.5, chunk=4)).eval()
    events = synthetic_events(2, 11, 40, seed=1)
    states = Engine(model).prefill(events)
    for state in states:  # 11 events: chunks 0 and 1 closed and dropped, events 8..10 kept
        assert [layer.positions[0].tolist() for layer in state.layers] == [[8, 9, 10]] * 2
    # the last event sees only events 8..10: changing any earlier event leaves it unchanged
    changed = synthetic_events(2, 11, 40, seed=2)
    changed.items[:, 8:], changed.actions[:, 8:], changed.timestamps[:, 8:] = (
        events.items[:, 8:], events.actions[:, 8:], events.timestamps[:, 8:])
    last = torch.stack([s.last_hidden for s in states])
    assert torch.allclose(last, torch.stack([s.last_hidden for s in Engine(model).prefill(changed)]), atol=1e-6)


def test_curves_for_the_three_models_resume_and_bad_input(tmp_path, capsys, experiment_script):
    script = experiment_script("beacon_learning")
    argv = ["--config", SMOKE, "--set", "model.max_len=40", "--epochs", "2", "--ratio", "1/2", "--knob", "chunk=4",
            "--out", str(tmp_path)]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "| chunk_only |" in out
    saved = json.loads((tmp_path / "curves.json").read_text())
    curves = saved["curves"]
    assert sorted(curves) == ["beacon", "chunk_only", "native"] and saved["knobs"] == {"chunk": 4}
    assert all(len(c["valid_gauc"]) == 2 for c in curves.values())
    assert curves["native"]["memory_ratio"] == pytest.approx(1.0)
    assert curves["chunk_only"]["memory_ratio"] < curves["beacon"]["memory_ratio"] < 1.0
    stamps = {m: (tmp_path / m / "last.pt").stat().st_mtime_ns for m in curves}
    assert script.main(argv) == 0  # finished runs are read back, not trained again
    assert stamps == {m: (tmp_path / m / "last.pt").stat().st_mtime_ns for m in curves}
    assert json.loads((tmp_path / "curves.json").read_text())["curves"] == curves

    with pytest.raises(SystemExit):
        script.main([*argv, "--models", "native,beacons"])
    assert "--models" in capsys.readouterr().err
    assert script.main(["--config", SMOKE, "--set", "task=retrieval", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "task: ctr" in capsys.readouterr().err
    assert script.main([*argv, "--knob", "alpha=0.5"]) == 2
    assert "alpha" in capsys.readouterr().err


def test_each_model_config_names_its_own_scheme(experiment_script):
    script = experiment_script("beacon_learning")
    cfg = load_config(SMOKE, ["model.scheme=gqa", "model.memory_ratio=0.5"])  # a trained-in run's config
    native = script.model_config(cfg, "native", 0.25, {"chunk": 4})
    assert (native.model.scheme, native.model.memory_ratio, native.model.knobs) == ("native", 1.0, {})
    for name in ("beacon", "chunk_only"):
        model = script.model_config(cfg, name, 0.25, {"chunk": 4}).model
        assert (model.scheme, model.memory_ratio, model.knobs) == ("beacon", 0.25, {"chunk": 4})


def test_chunk_only_starts_from_beacons_initial_weights(experiment_script):
    script = experiment_script("beacon_learning")
    cfg = script.model_config(load_config(SMOKE), "beacon", 0.5, {"chunk": 4})
    beacon, chunk_only = (script.build(cfg, name, 40).state_dict() for name in ("beacon", "chunk_only"))
    assert beacon.keys() == chunk_only.keys()
    assert all(torch.equal(beacon[key], chunk_only[key]) for key in beacon)
    assert isinstance(script.build(cfg, "chunk_only", 40).scheme, script.ChunkOnly)
