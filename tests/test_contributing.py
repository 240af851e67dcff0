"""CONTRIBUTING.md's example scheme, run exactly as printed: one file plus one registry line, end to end.

The file is taken from the markdown, imported, and registered in a copy of the registry
(:meth:`~malloc.memory.registry.Registry.with_schemes`), so the package's tables never change: it is served through
the engine, listed by ``malloc methods``, given its row in the complexity table, and reported from a record of it
evaluated on the smoke suite's trained Native model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import shutil
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from malloc.bench.complexity import complexity_rows, missing_entries
from malloc.bench.report import build_report
from malloc.cli import cmd_methods
from malloc.core.tokens import Events
from malloc.eval.evaluate import evaluate_scheme
from malloc.memory.knobs import SchemeError
from malloc.memory.policy import EvictionPolicy
from malloc.memory.registry import REGISTRY, Registry
from malloc.memory.schemes import POLICIES
from malloc.models import ModelConfig
from malloc.runner import load_trained
from malloc.serving.engine import Engine
from smoke_suite import smoke_run

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"
MODULE = "contributing_example_knorm"


@contextlib.contextmanager
def imported(path: Path, name: str) -> Iterator[types.ModuleType]:
    """``path`` imported as module ``name`` while the block runs, then forgotten (dataclasses resolve the file's
    string annotations through ``sys.modules``, so the module is there during the import and the tests)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    assert name not in sys.modules
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def key_norm(tmp_path_factory) -> Iterator[type]:
    """The first Python block of CONTRIBUTING.md, saved as ``knorm.py`` and imported: its scheme class."""
    code = re.search(r"```python\n(.*?)```", CONTRIBUTING.read_text(encoding="utf-8"), re.S).group(1)
    path = tmp_path_factory.mktemp("example") / "knorm.py"
    path.write_text(code, encoding="utf-8")
    with imported(path, MODULE) as module:
        yield module.KeyNorm


@pytest.fixture(scope="module")
def registry(key_norm) -> Registry:
    """The package's registry plus the example: the one registry line, in a copy."""
    return REGISTRY.with_schemes(key_norm)


def users(lengths: list[int], num_items: int, seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    lens = torch.tensor(lengths)
    valid = torch.arange(n)[None] < lens[:, None]
    return Events(items=torch.randint(1, num_items + 1, (len(lengths), n), generator=g) * valid,
                  actions=torch.randint(0, 3, (len(lengths), n), generator=g) * valid,
                  timestamps=torch.arange(n).expand(len(lengths), n) * 60 + 1_600_000_000, lengths=lens)


def test_registering_the_example_leaves_the_package_registry_as_it_was(key_norm, registry):
    assert registry.policies["knorm"] is key_norm and list(registry.policies)[-1] == "knorm"
    assert "knorm" not in POLICIES and "knorm" not in REGISTRY.policies
    with pytest.raises(SchemeError, match="unknown scheme 'knorm'"):
        REGISTRY.build_policy("knorm", 0.25)
    with pytest.raises(ValueError, match="taken"):  # one name, one scheme
        registry.with_schemes(key_norm)


@pytest.mark.parametrize("p", [2.0, 1])
def test_the_example_scheme_is_served_and_keeps_the_smallest_key_norms(registry, p):
    torch.manual_seed(0)
    model = REGISTRY.build_model_for(ModelConfig(dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=64),
                                     50).eval()
    history = users([40, 64, 23], 50, seed=1)
    native = Engine(model).write(history)
    policy = registry.build_policy("knorm", 0.25, p=p)
    assert policy.p == float(p) and isinstance(policy.p, float)  # the declared kind: 1 on the command line is 1.0
    stored = Engine(model, policy).write(history)
    for full, kept in zip(native, stored, strict=True):
        for layer_full, layer_kept in zip(full.layers, kept.layers, strict=True):
            assert layer_kept.nbytes() <= 0.25 * layer_full.nbytes()
            budget = layer_kept.num_tokens
            norms = torch.linalg.vector_norm(layer_full.keys.float(), ord=float(p), dim=-1).mean(0)
            score = (-norms).tolist()  # brute force; ties: the newer
            positions = layer_full.positions[0].tolist()
            best = sorted(zip(score, positions, strict=True), reverse=True)[:budget]
            assert set(layer_kept.positions[0].tolist()) == {position for _, position in best}
    appended = Engine(model, policy).append(stored, users([3, 2, 1], 50, seed=2))
    for before, after in zip(stored, appended, strict=True):  # the budget holds on append
        assert after.layers[0].num_tokens <= before.layers[0].num_tokens + 1


@pytest.mark.parametrize(("knobs", "message"), [
    ({"p": 0.5}, r"^knorm: p must be a number >= 1, got 0\.5$"),
    ({"p": "two"}, r"^knorm: knob p: expected a float"),
    ({"q": 2}, r"^knorm: unknown knob\(s\) q; knobs: p$"),
])
def test_the_example_scheme_refuses_a_bad_knob_in_one_line(registry, key_norm, knobs, message):
    with pytest.raises(SchemeError, match=message):
        registry.build_policy("knorm", 0.25, **knobs)
    if "p" in knobs and not isinstance(knobs["p"], str):
        with pytest.raises(SchemeError, match=message):  # the class checks its declarations itself
            key_norm(memory_ratio=0.25, **knobs)


def test_the_example_scheme_is_listed_by_malloc_methods(registry, key_norm, capsys):
    assert cmd_methods(argparse.Namespace(json=False), registry) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.startswith("knorm "))
    assert "token-prune" in line and "training-free" in line and "p=2.0: a number >= 1" in line
    assert line.rstrip().endswith(key_norm.summary)
    assert cmd_methods(argparse.Namespace(json=True), registry) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["knorm"]["knobs"] == {"p": 2.0} and rows["knorm"]["knob_rules"] == {"p": "a number >= 1"}
    assert cmd_methods(argparse.Namespace(json=True)) == 0  # the package's own list is unchanged
    assert "knorm" not in {row["name"] for row in json.loads(capsys.readouterr().out)}


def test_a_scheme_without_its_own_formulas_is_named(registry, key_norm):
    assert ("knorm", "token-prune", "training-free", key_norm.complexity) in complexity_rows(registry)
    assert missing_entries(registry) == []

    @dataclass(frozen=True)
    class Unstated(EvictionPolicy):  # a subclass does not inherit its base's formulas
        name: ClassVar[str] = "unstated"

    assert missing_entries(registry.with_schemes(Unstated)) == ["unstated"]


def test_the_example_scheme_is_in_a_report_built_from_its_record(registry, key_norm, tmp_path):
    """A record of the example evaluated on the smoke suite's trained Native model (the serving path, as a suite
    item records it, without the latency meters), added to a copy of the suite: the report lists it in the
    accuracy and resource tables and gives it its row in the complexity table."""
    run = smoke_run()
    folder = tmp_path / "smoke"
    shutil.copytree(run.folder, folder, ignore=shutil.ignore_patterns("runs"))
    manifest = json.loads((folder / "suite.json").read_text())
    item = next(i for i in run.items if i.kind == "policy" and i.setting.task == "ctr" and i.scheme == "recency"
                and i.ratios == (0.5,))
    model, view, run_dir = load_trained(item.setting.cfg)
    result = evaluate_scheme(item.setting.cfg, model, view, "test", registry.build_policy("knorm", 0.5), "knorm", {},
                             run_dir.root)
    native = json.loads((folder / "items" / f"{item.setting.key}--native.json").read_text())
    planned = {**item.describe(), "item": item.id.replace("--recency-", "--knorm-"), "label": "knorm",
               "scheme": "knorm"}
    record = {**planned, "status": "done", "run_id": run_dir.run_id, "metrics": result["metrics"],
              "native_metrics": native["metrics"], "meters": result["meters"], "fidelity": result["fidelity"],
              "per_user": result["per_user"], "policy": result["policy"], "knobs_in_force": {},
              "git": manifest["git"]}
    (folder / "items" / f"{planned['item']}.json").write_text(json.dumps(record))
    manifest["items"].append(planned)
    (folder / "suite.json").write_text(json.dumps(manifest))

    page = build_report([folder], tmp_path / "report", registry=registry)
    md = (tmp_path / "report" / "index.md").read_text()
    results, complexity = md.split("Complexity of every registered scheme")
    assert results.count("| knorm |") >= 2  # the accuracy and the resource tables of the CTR setting
    formulas = key_norm.complexity
    assert f"| knorm | token-prune | training-free | `{formulas.state}` | `{formulas.request}` | {formulas.knob} |" \
        in complexity
    assert "(missing)" not in complexity
    assert "<td>knorm</td>" in page.read_text()
    assert "knorm" not in (run.folder / "suite.json").read_text()  # the shared smoke suite is untouched
