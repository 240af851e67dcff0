"""CONTRIBUTING.md's example scheme, run exactly as printed: one file, one registry line, served for real."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import torch

from malloc.core.tokens import Events
from malloc.memory.registry import build_model_for, build_policy
from malloc.memory.schemes import POLICIES
from malloc.models import ModelConfig
from malloc.serving.engine import Engine

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def example_module(folder: Path, monkeypatch) -> types.ModuleType:
    """The first Python block of CONTRIBUTING.md, saved as ``knorm.py`` and imported."""
    code = re.search(r"```python\n(.*?)```", CONTRIBUTING.read_text(encoding="utf-8"), re.S).group(1)
    path = folder / "knorm.py"
    path.write_text(code, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("knorm", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "knorm", module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def users(lengths: list[int], num_items: int, seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    lens = torch.tensor(lengths)
    valid = torch.arange(n)[None] < lens[:, None]
    return Events(items=torch.randint(1, num_items + 1, (len(lengths), n), generator=g) * valid,
                  actions=torch.randint(0, 3, (len(lengths), n), generator=g) * valid,
                  timestamps=torch.arange(n).expand(len(lengths), n) * 60 + 1_600_000_000, lengths=lens)


def test_the_example_scheme_registers_and_keeps_the_smallest_key_norms(tmp_path, monkeypatch):
    key_norm = example_module(tmp_path, monkeypatch).KeyNorm
    monkeypatch.setitem(POLICIES, key_norm.name, key_norm)  # the registry line, for this test only
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=64), 50).eval()
    history = users([40, 64, 23], 50, seed=1)
    native = Engine(model).write(history)
    policy = build_policy("knorm", 0.25)
    stored = Engine(model, policy).write(history)
    for full, kept in zip(native, stored, strict=True):
        for layer_full, layer_kept in zip(full.layers, kept.layers, strict=True):
            assert layer_kept.nbytes() <= 0.25 * layer_full.nbytes()
            budget = layer_kept.num_tokens
            score = (-layer_full.keys.float().norm(dim=-1).mean(0)).tolist()  # brute force; ties: the newer
            positions = layer_full.positions[0].tolist()
            best = sorted(zip(score, positions, strict=True), reverse=True)[:budget]
            assert set(layer_kept.positions[0].tolist()) == {position for _, position in best}
    appended = Engine(model, policy).append(stored, users([3, 2, 1], 50, seed=2))
    for before, after in zip(stored, appended, strict=True):  # the budget holds on append
        assert after.layers[0].num_tokens <= before.layers[0].num_tokens + 1
