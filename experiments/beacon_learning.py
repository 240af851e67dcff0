"""Do Activation Beacon's beacons carry anything, and how fast do they learn it? Learning curves of three models.

Trains, on one config and with its recipe (same seed, optimiser, epochs), three HSTU/SASRec models and prints
their validation GAUC after every epoch, then each one's test metrics through the serving path:

- ``native``: the plain backbone;
- ``beacon``: Activation Beacon at ``--ratio`` (knobs from ``--knob``);
- ``chunk_only``: Beacon's attention mask with no beacons at all, so every event and candidate sees only the
  earlier events of its own chunk (the open chunk). This is the floor Beacon falls to when its beacons carry
  nothing: Beacon above it has learnt to condense; Beacon at it has not (yet).

Each model trains in ``--out/<model>/`` and resumes there: an interrupted run goes on from its last epoch, a
finished one is read back (only its test replay runs again), and a larger ``--epochs`` extends it. The curves of
the models named in the latest invocation are also written to ``--out/curves.json``.

    python experiments/beacon_learning.py --config configs/bench/long-range-small.yaml --epochs 20 \\
        --out results/beacon-learning
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from malloc.cli import parse_knobs, parse_ratio
from malloc.config import RunConfig, load_config
from malloc.configio import ConfigError
from malloc.core.tokens import TokenBatch
from malloc.errors import MallocError
from malloc.eval.evaluate import evaluate
from malloc.heap import retain_freed_memory
from malloc.memory.registry import build_architecture, build_model_for
from malloc.memory.schemes.token_merge.beacon import Beacon
from malloc.models import BACKBONES, SequentialRecommender
from malloc.results import atomic_write_json
from malloc.runner import build_view
from malloc.train import fit, seed_everything

MODELS = ("native", "beacon", "chunk_only")


class ChunkOnly(Beacon):
    """Beacon's layers and mask, but no beacon is ever inserted: only the open chunk is seen and stored."""

    def expand(self, tokens: TokenBatch) -> tuple[TokenBatch, None]:
        return tokens, None


def model_config(cfg: RunConfig, model: str, ratio: float, knobs: dict[str, Any]) -> RunConfig:
    if model == "native":
        return replace(cfg, model=replace(cfg.model, scheme="native", memory_ratio=1.0, knobs={}))
    return replace(cfg, model=replace(cfg.model, scheme="beacon", memory_ratio=ratio, knobs=knobs))


def build(cfg: RunConfig, model: str, num_items: int) -> SequentialRecommender:
    """A new model, seeded as :func:`malloc.train.train` seeds it; ``chunk_only`` is built as ``beacon`` is, so
    it starts from the same weights."""
    seed_everything(cfg.train.seed)
    if model != "chunk_only":
        return build_model_for(cfg.model, num_items)
    scheme = ChunkOnly(memory_ratio=cfg.model.memory_ratio, **cfg.model.knobs)
    return BACKBONES[cfg.model.backbone](cfg.model, num_items, scheme=scheme)


def learning_curves(config: str, overrides: list[str], epochs: int, ratio: float, knobs: dict[str, Any],
                    models: list[str], out: Path) -> dict[str, Any]:
    """Train each model (or resume it) and return ``{model: {"valid_gauc": [...], "test": {...}}}``."""
    base = load_config(config, [*overrides, f"train.epochs={epochs}", f"train.patience={epochs}"])
    if base.task != "ctr":
        raise ConfigError(f"{config}: task is {base.task!r}; the curves are CTR GAUC (task: ctr)")
    view = build_view(base)
    configs = {name: model_config(base, name, ratio, knobs) for name in models}
    for cfg in configs.values():  # bad knobs fail here (the registry's checks, as for `malloc train`), before training
        build_architecture(cfg.model)
    curves: dict[str, Any] = {}
    for name, cfg in configs.items():
        trained, result = fit(build(cfg, name, view.sequences.num_items), cfg, view, out / name, show_progress=False)
        test = evaluate(cfg, trained, view, "test")
        curves[name] = {"valid_gauc": [h["valid_gauc"] for h in result.history],
                        "epoch_seconds": [h["seconds"] for h in result.history], "best_epoch": result.best_epoch,
                        "test": {k: test["metrics"][k] for k in ("auc", "gauc", "logloss")},
                        "memory_ratio": test["meters"]["memory_ratio"]}
        atomic_write_json(out / "curves.json", {"config": config, "overrides": overrides, "ratio": ratio,
                                                "knobs": knobs, "curves": curves})
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a CTR run config (e.g. configs/bench/long-range-small.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs for every model (no early stop; default 20)")
    parser.add_argument("--ratio", type=parse_ratio, default=0.25, help="Beacon's memory ratio (default 1/4)")
    parser.add_argument("--knob", dest="knobs", action="append", default=[], metavar="KEY=VALUE",
                        help="Beacon knob, e.g. --knob chunk=16 (repeatable)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, among {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and curves.json")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models: expected names among {', '.join(MODELS)}, got {args.models!r}")
    if args.epochs < 1:
        parser.error(f"--epochs: expected an integer >= 1, got {args.epochs}")
    retain_freed_memory()  # as the malloc command does (docs/BENCHMARKS.md, "The heap")
    try:
        curves = learning_curves(args.config, args.overrides, args.epochs, args.ratio, parse_knobs(args.knobs),
                                 models, args.out)
    except (MallocError, FileNotFoundError) as exc:
        print(f"beacon_learning: {exc}", file=sys.stderr)
        return 2
    print("| epoch | " + " | ".join(f"valid GAUC, {m}" for m in curves) + " |")
    print("|---|" + "---|" * len(curves))
    for epoch in range(max(len(c["valid_gauc"]) for c in curves.values())):
        cells = [f"{c['valid_gauc'][epoch]:.4f}" if epoch < len(c["valid_gauc"]) else "" for c in curves.values()]
        print(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    print()
    print("| model | test GAUC | test AUC | logloss | memory ratio | best epoch |")
    print("|---|---|---|---|---|---|")
    for name, c in curves.items():
        t = c["test"]
        print(f"| {name} | {t['gauc']:.4f} | {t['auc']:.4f} | {t['logloss']:.4f} | {c['memory_ratio']:.3f} "
              f"| {c['best_epoch']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
