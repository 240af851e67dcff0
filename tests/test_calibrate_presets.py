"""experiments/calibrate_presets.py: bad input is one line, found before any training.

A run of the script is ``sensitivity(calibration_config(preset, seed), ...)`` per preset and seed, which
tests/test_sensitivity.py trains and checks for seed 0 of both presets; a run of the script itself costs as much
again (a training, two replays and the anchors), so it is left to its users.
"""

from __future__ import annotations

import pytest


def test_bad_input_is_one_line_before_any_training(tmp_path, capsys, experiment_script):
    script = experiment_script("calibrate_presets")
    assert script.main(["--presets", "short,nope", "--seeds", "0", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert not any(tmp_path.iterdir())  # the bad preset was found before the good one trained
    for bad in (["--seeds", "0,x"], ["--seeds", "-1"], ["--epochs", "0"], ["--presets", ","]):
        with pytest.raises(SystemExit):
            script.main([*bad, "--results", str(tmp_path)])
        assert bad[0] in capsys.readouterr().err
