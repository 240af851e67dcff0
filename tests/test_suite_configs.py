"""The suites that stand for the former sweep scripts run what those scripts ran.

``training_free`` replaces ``benchmarks/scheme_sweep.py``: every training-free scheme at 1/2 to 1/16 on the Native
runs of ``configs/bench/hstu-ctr.yaml`` and ``hstu-retrieval.yaml``. ``trained`` trains what
``benchmarks/trained_schemes.py`` trains (every trained-in scheme at 1/4, and GQA with 2 groups, at 2 and 8 layers,
with the same recipe). Each setting's run config must equal the bench config (up to where results go), so a suite
run trains the same models as ``malloc train --config configs/bench/...``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from malloc.bench.suite import load_suite, plan
from malloc.config import RunConfig, load_config
from malloc.memory.registry import build_architecture
from malloc.memory.schemes import ARCHITECTURES, POLICIES

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "configs" / "suites"


def _bench_config(task: str, layers: int = 2) -> RunConfig:
    return load_config(str(ROOT / "configs" / "bench" / f"hstu-{task}.yaml"), [f"model.layers={layers}"])


def test_training_free_suite_runs_the_scheme_sweep():
    items = plan(load_suite("training_free", SUITES), "unused")
    settings = {item.setting.key: item.setting for item in items}
    assert sorted(settings) == ["ml100k-hstu-ctr-s0", "ml100k-hstu-retrieval-s0"]
    for setting in settings.values():
        bench = _bench_config(setting.task)
        assert replace(setting.cfg, results_dir=bench.results_dir) == bench  # the same name, data, model, training
    for task in ("ctr", "retrieval"):
        mine = [item for item in items if item.setting.task == task]
        assert [item.kind for item in mine[:1]] == ["native"]
        points = {(item.scheme, item.ratios) for item in mine if item.kind == "policy"}
        assert points == {(name, (ratio,)) for name in POLICIES if name != "native"
                          for ratio in (0.5, 0.25, 0.125, 0.0625)}
        assert all(item.knobs == {} for item in mine)
        assert len(mine) == 1 + len(points)


def test_trained_suite_trains_the_trained_schemes_models():
    items = plan(load_suite("trained", SUITES), "unused")
    settings = {item.setting.key: item.setting for item in items}
    assert sorted(settings) == ["ml100k-hstu-ctr-s0", "ml100k-hstu-retrieval-s0", "ml100k-hstu8-ctr-s0",
                                "ml100k-hstu8-retrieval-s0"]
    for setting in settings.values():
        bench = _bench_config(setting.task, setting.cfg.model.layers)
        assert setting.cfg.model.layers == (8 if setting.backbone == "hstu8" else 2)
        # the bench configs pin 2 threads for the 2-core VM; the suite leaves torch's default (a GPU machine's)
        assert replace(setting.cfg, results_dir=bench.results_dir, name=bench.name,
                       train=replace(setting.cfg.train, threads=bench.train.threads)) == bench
    for key in settings:
        trained = [item for item in items if item.setting.key == key and item.kind == "trained"]
        assert sorted((item.label, item.ratios[0]) for item in trained) == sorted(
            [(name, 0.25) for name in ARCHITECTURES] + [("gqa_g2", 0.25)])
        (gqa2,) = [item for item in trained if item.label == "gqa_g2"]
        model = replace(settings[key].cfg.model, scheme="gqa", memory_ratio=0.25, knobs=gqa2.knobs)
        assert build_architecture(model).knob_values(model) == {"groups": 2}  # gqa@1/2's model
