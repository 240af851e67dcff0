"""experiments/ctr_recipe.py: one row per anchor and per variant, paired deltas to the best anchor; bad input is one
line (or argparse's usage error) before any training."""

from __future__ import annotations

import pytest

SMOKE = "configs/smoke.yaml"


def test_rows_for_the_anchors_and_each_variant(tmp_path, capsys, experiment_script):
    script = experiment_script("ctr_recipe")
    assert script.main(["--config", SMOKE, "--variants", "old", "--set", "train.epochs=2",
                        "--results", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in lines[1:]]
    assert names == ["*item-mean*", "*item-mean+user-rate*", "*mf*", "old"]
    for line in lines[-1:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert all(0.0 <= float(c) <= 1.0 for c in cells[1:3])  # AUC and GAUC
        assert all("+-" in c and "(" in c for c in cells[7:])  # a paired delta to a named anchor per metric


def test_bad_input_is_refused_before_any_training(tmp_path, capsys, experiment_script):
    script = experiment_script("ctr_recipe")
    with pytest.raises(SystemExit):
        script.main(["--variants", "recipe,nope", "--results", str(tmp_path)])
    assert "nope" in capsys.readouterr().err
    assert script.main(["--config", SMOKE, "--set", "task=retrieval", "--variants", "recipe",
                        "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CTR" in err[0]
    assert script.main(["--config", SMOKE, "--set", "model.nope=1", "--results", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
