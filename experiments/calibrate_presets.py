"""Calibration of the synthetic presets: Native with its full history against its most recent 1/16, per seed.

The CTR run of :func:`malloc.sensitivity.calibration_config` (the one ``tests/test_sensitivity.py`` runs with seed 0)
for each preset and seed; prints GAUC and AUC at the full history and at 1/16, the delta, and its paired per-user
bootstrap standard error. The spread of the deltas over seeds is the run-to-run noise the test's margins must
clear (docs/DATASETS.md). Example::

    python experiments/calibrate_presets.py --presets long-range,short --seeds 0,1,2 --results /tmp/calibration
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from malloc.errors import MallocError
from malloc.sensitivity import Truncation, calibration_config, sensitivity


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}") from exc
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return seeds


def calibrate(presets: list[str], seeds: list[int], results: str, epochs: int | None) -> None:
    """Print one row per (preset, seed), then each preset's GAUC delta over the seeds. Every preset's config is
    built (and so checked) before the first training."""
    for preset in presets:
        calibration_config(preset, seeds[0], results, epochs=epochs)
    print("preset      seed  gauc full  gauc 1/16  delta +- se      auc full  auc 1/16  delta +- se      seconds")
    for preset in presets:
        deltas = []
        for seed in seeds:
            tic = time.perf_counter()
            cfg = calibration_config(preset, seed, results, epochs=epochs)
            result = sensitivity(cfg, points=[Truncation(), Truncation(fraction=16)], resamples=200,
                                 show_progress=False)
            full, cut = result["points"]
            cells = []
            for metric in ("gauc", "auc"):
                cells.append(f"{full['metrics'][metric]:.4f}     {cut['metrics'][metric]:.4f}     "
                             f"{cut['delta'][metric]:+.4f} +- {cut['delta_se'][metric]:.4f}")
            deltas.append(cut["delta"]["gauc"])
            print(f"{preset:<11} {seed:>4}  " + "   ".join(cells) + f"   {time.perf_counter() - tic:7.1f}", flush=True)
        print(f"{preset:<11} gauc delta over seeds: mean {np.mean(deltas):+.4f}, std {np.std(deltas, ddof=1):.4f}"
              if len(deltas) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="long-range,short", help="comma-separated presets")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2],
                        help="comma-separated seeds (data, init and shuffling; default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: as in the test)")
    parser.add_argument("--results", default="results/calibration", help="results folder")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs: expected an integer >= 1, got {args.epochs}")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets:
        parser.error(f"--presets: expected comma-separated presets, got {args.presets!r}")
    logging.basicConfig(level=logging.WARNING)
    try:
        calibrate(presets, args.seeds, args.results, args.epochs)
    except (MallocError, FileNotFoundError) as exc:
        print(f"calibrate_presets: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
