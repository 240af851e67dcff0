"""The results store: atomic writes and run directories."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from malloc.configio import config_hash
from malloc.results import (
    RunDir,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    read_json,
)


@dataclass(frozen=True)
class TinyCfg:
    method: str = "native"
    ratio: float = 0.5
    ks: tuple[int, ...] = (10, 50)
    nested: dict[str, int] = field(default_factory=lambda: {"a": 1})


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "note.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert _leftovers(target.parent) == []
    assert target.stat().st_mode & 0o777 == 0o644


def test_atomic_write_json_format_and_nonfinite(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(
        target,
        {"b": float("nan"), "a": [1.5, float("inf")], "c": np.float32(0.25), "d": np.arange(2), "e": (1, 2)},
    )
    text = target.read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted keys
    assert "NaN" not in text and "Infinity" not in text
    assert read_json(target) == {"a": [1.5, None], "b": None, "c": 0.25, "d": [0, 1], "e": [1, 2]}
    json.loads(text)  # strict JSON


def test_serialisation_error_leaves_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert read_json(target) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_error_while_writing_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"w": torch.zeros(2), "x": Unpicklable()}, target)
    assert torch.equal(torch.load(target)["w"], torch.ones(2))
    assert _leftovers(tmp_path) == []


def test_atomic_torch_save_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "ckpt" / "best.pt"
    atomic_torch_save({"step": 3, "w": torch.arange(4.0)}, target)
    loaded = torch.load(target)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))


def test_run_dir_naming_and_paths(tmp_path: Path) -> None:
    cfg = TinyCfg()
    run = RunDir.for_config(tmp_path, "ml1m_hstu", cfg)
    assert run.root == tmp_path / f"ml1m_hstu-{config_hash(cfg)}"
    assert run.run_id == f"ml1m_hstu-{config_hash(cfg)}"
    assert not run.root.exists()  # nothing is created before a write
    assert RunDir.for_config(tmp_path, "ml1m_hstu", TinyCfg()) == run
    assert RunDir.for_config(tmp_path, "ml1m_hstu", TinyCfg(ratio=0.25)) != run
    names = [
        run.config_path,
        run.metrics_path,
        run.meters_path,
        run.checkpoint_path,
        run.last_checkpoint_path,
        run.done_path,
        run.error_path,
    ]
    assert [p.name for p in names] == [
        "config.yaml",
        "metrics.json",
        "meters.json",
        "best.pt",
        "last.pt",
        "done.json",
        "error.json",
    ]
    assert all(p.parent == run.root for p in names)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "has space", "-lead"])
def test_run_dir_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="run name"):
        RunDir.for_config(tmp_path, name, TinyCfg())


def test_write_config_is_yaml_of_to_dict(tmp_path: Path) -> None:
    run = RunDir.for_config(tmp_path, "r", TinyCfg())
    run.write_config(TinyCfg())
    assert yaml.safe_load(run.config_path.read_text()) == {
        "method": "native",
        "ratio": 0.5,
        "ks": [10, 50],
        "nested": {"a": 1},
    }


def test_done_marker(tmp_path: Path) -> None:
    run = RunDir.for_config(tmp_path, "r", TinyCfg())
    assert not run.is_done()
    metrics = {"auc": 0.75, "gauc": 0.7, "logloss": 0.6}
    run.write_metrics(metrics)
    run.write_meters({"bytes_per_user": 1024})
    assert not run.is_done()
    run.mark_done({"auc": 0.75, "gauc": math.nan})
    assert run.is_done()
    done = read_json(run.done_path)
    assert done["auc"] == 0.75 and done["gauc"] is None and "finished_at" in done
    assert read_json(run.metrics_path) == metrics


def test_error_record_and_cleared_by_success(tmp_path: Path) -> None:
    run = RunDir.for_config(tmp_path, "r", TinyCfg())
    assert run.read_error() is None
    try:
        raise KeyError("no such method")
    except KeyError as exc:
        run.record_error(exc)
    record = run.read_error()
    assert record is not None
    assert record["type"] == "KeyError" and "no such method" in record["message"]
    assert "Traceback" in record["traceback"] and "test_error_record" in record["traceback"]
    assert not run.is_done()
    run.write_metrics({"auc": 0.5, "gauc": 0.5, "logloss": 0.7})
    run.write_meters({})
    run.mark_done({})
    assert run.read_error() is None and run.is_done()


def test_clear_removes_the_run(tmp_path: Path) -> None:
    run = RunDir.for_config(tmp_path, "r", TinyCfg())
    run.write_config(TinyCfg())
    run.mark_done({})
    (run.root / "extra.npz").write_bytes(b"x")
    run.clear()
    assert not run.root.exists() and not run.is_done()
    run.clear()  # clearing a missing run is fine
    assert tmp_path.exists()


def test_clear_refuses_non_run_directories(tmp_path: Path) -> None:
    keep = tmp_path / "results"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing"):
        RunDir(keep).clear()
    assert (keep / "precious.txt").exists()
