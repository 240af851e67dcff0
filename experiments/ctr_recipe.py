"""The CTR recipe: which model settings close the gap to the anchors, on one data set and backbone.

Trains one run per variant (the bench config plus the variant's overrides, every run early-stopped on validation),
then prints one Markdown row per variant: test AUC, GAUC and logloss under the primary (``blind``) protocol, GAUC
under ``feedback``, the epoch chosen and the epochs run, the training seconds, and each metric's paired per-user
bootstrap difference to the best anchor on that metric (model minus anchor, +- its standard error). The anchors'
rows come first. The variants are the steps from the old defaults to the measured recipe (docs/CHOICES.md, "The CTR
recipe"); ``--variants`` picks some by name.

    python experiments/ctr_recipe.py --config configs/bench/hstu-ctr.yaml --results /tmp/recipe
    python experiments/ctr_recipe.py --config configs/bench/hstu-ctr.yaml --set data.source=ml-latest-small \\
        --variants old,recipe --results /tmp/recipe
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace

import numpy as np

from malloc.config import RunConfig, load_config
from malloc.errors import MallocError
from malloc.eval.anchors import ctr_anchor_logits
from malloc.eval.evaluate import evaluate, native_predictions_path
from malloc.eval.metrics import ctr_metrics
from malloc.eval.statistics import bootstrap, bootstrap_counts, ctr_user_scores, metrics_with_counts
from malloc.runner import build_view, load_trained, run, run_dir_for

OLD = ["model.item_prior=false", "model.candidate=item", "model.ctr_readout=head", "eval.monitor=gauc"]
# name -> overrides on top of the config (the library's defaults are the recipe)
VARIANTS: dict[str, list[str]] = {
    "old": OLD,
    "prior": ["model.item_prior=true", "model.candidate=item", "model.ctr_readout=head", "eval.monitor=gauc"],
    "prior-query": ["model.item_prior=true", "model.candidate=query", "model.ctr_readout=dot", "eval.monitor=gauc"],
    "prior-item-dot": ["model.item_prior=true", "model.candidate=item", "model.ctr_readout=dot",
                       "eval.monitor=auc"],
    "recipe": [],
    "recipe-prior-frozen": ["train.prior_lr=0"],
    "recipe-wd0.01-dropout0.3": ["train.weight_decay=0.01", "model.dropout=0.3"],
    "recipe-dim32": ["model.dim=32"],
    "recipe-lr3e-4": ["train.lr=0.0003"],
    "recipe-positions": ["model.absolute_positions=true"],
    "recipe-blind0.5": ["train.blind_windows=0.5"],
    "recipe-blind1": ["train.blind_windows=1.0"],
    "recipe-dim128": ["model.dim=128", "model.head_dim=32"],
    "recipe-logloss": ["eval.monitor=logloss"],
    "recipe-lr3e-3": ["train.lr=0.003"],
    "recipe-priorlr1e-2": ["train.prior_lr=0.01"],
    "recipe-batch128": ["train.batch_size=128"],
    "recipe-len50": ["model.max_len=50"],
}
METRICS = ("auc", "gauc", "logloss")
RESAMPLES = 200


def variant_config(base: str, overrides: list[str], name: str, extra: list[str], results: str) -> RunConfig:
    return load_config(base, [*overrides, *extra, f"results_dir={results}", f"name=recipe-{name}"])


def paired_deltas(cfg: RunConfig, anchors: dict[str, np.ndarray]) -> dict[str, str]:
    """Each metric's difference to the best anchor on it, +- the paired per-user bootstrap SE."""
    view = build_view(cfg)
    rows = view.split("test")
    with np.load(native_predictions_path(run_dir_for(cfg).root, "test")) as stored:
        model = ctr_user_scores(rows.user, rows.label, stored["logits"])
    counts = bootstrap_counts(model.num_users, RESAMPLES, 0)
    ones = np.ones(model.num_users)
    model_point, model_boot = metrics_with_counts(model, ones), bootstrap(model, counts)
    cells = {}
    for metric in METRICS:
        sign = -1.0 if metric == "logloss" else 1.0
        best_name, best = None, None
        for name, logits in anchors.items():
            scores = ctr_user_scores(rows.user, rows.label, logits)
            point = metrics_with_counts(scores, ones)[metric]
            if best is None or sign * point > sign * best[0]:
                best_name, best = name, (point, bootstrap(scores, counts)[metric])
        delta = model_point[metric] - best[0]
        se = float(np.std(model_boot[metric] - best[1], ddof=1))
        cells[metric] = f"{delta:+.4f} +- {se:.4f} ({best_name})"
    return cells


def recipe(config: str, extra: list[str], names: list[str], results: str) -> None:
    configs = {name: variant_config(config, VARIANTS[name], name, extra, results) for name in names}  # checked first
    first = next(iter(configs.values()))
    if first.task != "ctr":
        raise MallocError(f"{config}: ctr_recipe needs a CTR config, got task {first.task!r}")
    view = build_view(first)
    anchors = ctr_anchor_logits(view, "test", first.eval.protocol, first.train.seed)
    print("| variant | AUC | GAUC | logloss | GAUC feedback | epoch (of) | seconds | d AUC | d GAUC | d logloss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = view.split("test")
    for name, logits in anchors.items():
        m = ctr_metrics(rows.user, rows.label, logits)
        print(f"| *{name}* | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logloss']:.4f} | | | | | | |")
    for name, cfg in configs.items():
        tic = time.perf_counter()
        result = run(cfg, show_progress=False)
        seconds = time.perf_counter() - tic
        model, task_view, _ = load_trained(cfg)
        feedback = evaluate(replace(cfg, eval=replace(cfg.eval, protocol="feedback")), model, task_view,
                            "test")["metrics"]
        meters, m, d = result["meters"], result["metrics"], paired_deltas(cfg, anchors)
        print(f"| {name} | {m['auc']:.4f} | {m['gauc']:.4f} | {m['logloss']:.4f} | {feedback['gauc']:.4f} | "
              f"{meters['best_epoch']} ({meters['epochs_run']}) | {seconds:.0f} | {d['auc']} | {d['gauc']} | "
              f"{d['logloss']} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench/hstu-ctr.yaml", help="a CTR run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant (repeatable), e.g. data.source=ml-latest-small")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    parser.add_argument("--results", default="results/ctr-recipe", help="results folder")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; one of {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)
    try:
        recipe(args.config, args.overrides, names, args.results)
    except (MallocError, ValueError, FileNotFoundError) as exc:
        print(f"ctr_recipe: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
