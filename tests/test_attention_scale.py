"""experiments/attention_scale.py: the attended vector's variance per layer in a trained run, events and beacons."""

from __future__ import annotations

import math
from pathlib import Path

from malloc.cli import main

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def test_reads_a_trained_beacon_run_and_refuses_a_missing_one(tmp_path, capsys, experiment_script):
    script = experiment_script("attention_scale")
    settings = ["--set", f"results_dir={tmp_path}", "--set", "model.max_len=40"]
    assert main(["train", "--config", SMOKE, "--quiet", *settings, "--scheme", "beacon", "--memory-ratio", "1/2",
                 "--knob", "chunk=4"]) == 0
    config = next(tmp_path.glob("smoke-beacon*/config.yaml"))
    rows = script.attended_variance(str(config), users=3, window=24)
    assert [r["layer"] for r in rows] == [0] and rows[0]["normaliser"] == 40.0
    assert rows[0]["events"] > 0 and rows[0]["beacons"] > 0 and not math.isnan(rows[0]["beacons"])
    capsys.readouterr()
    assert script.main([str(config), "--users", "2", "--window", "16"]) == 0
    assert "| 0 |" in capsys.readouterr().out
    (config.parent / "best.pt").unlink()
    assert script.main([str(config)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
