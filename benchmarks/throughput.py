"""Training throughput of HSTU and SASRec at the default size: events per second of full training steps.

A step is a full forward over ``--batch-size`` random full windows of ``--max-len`` events, a click loss on
every event, backward and an AdamW step (:func:`malloc.profiling.training_step`). Batches are generated before
timing and reused in turn; ``--warmup-steps`` untimed steps come first.

    python benchmarks/throughput.py
    python benchmarks/throughput.py --kernels on,off   # HSTU with its C kernel and without, side by side
    python benchmarks/throughput.py --backbones hstu --scheme longformer --memory-ratio 0.25 --kernels on,off
    python benchmarks/throughput.py --json > throughput.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys

import numpy as np
import torch

from _common import name_list, switch_list, table_line
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.models.hstu import use_kernels
from malloc.profiling import synthetic_training_batch, time_call, training_step

COLUMNS = [("backbone", ""), ("scheme", ""), ("kernel", ""), ("max_len", "d"), ("batch_size", "d"),
           ("events_per_s", ".0f"),
           ("ms_per_step_p50", ".1f"), ("ms_per_step_p99", ".1f"), ("steps", "d"), ("parameters", "d")]
WIDTH = 10
HEADERS = [name for name, _ in COLUMNS]
BATCH_POOL = 4  # distinct batches cycled through, so no step reuses the previous step's inputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", type=name_list, default=["hstu", "sasrec"], help="comma-separated")
    parser.add_argument("--max-len", type=int, default=200, help="events per training window")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step")
    parser.add_argument("--num-items", type=int, default=10_000, help="item vocabulary size")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--kernels", type=switch_list, default=["on"],
                        help="HSTU's C attention kernel: on, off, or on,off to time both side by side")
    parser.add_argument("--scheme", default="native", help="trained-in scheme of the layers (malloc methods)")
    parser.add_argument("--memory-ratio", type=float, default=1.0, help="the scheme's memory ratio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per point, one per line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.json:
        print(f"threads={torch.get_num_threads()} num_items={args.num_items} "
              f"warmup_steps={args.warmup_steps}")
        print(table_line(HEADERS, HEADERS, WIDTH))
    batches = [synthetic_training_batch(args.batch_size, args.max_len, args.num_items, args.seed + i)
               for i in range(BATCH_POOL)]
    events_per_step = batches[0].num_events
    for backbone, kernel in itertools.product(args.backbones, args.kernels):
        cfg = ModelConfig(backbone=backbone, max_len=args.max_len, scheme=args.scheme,
                          memory_ratio=args.memory_ratio)
        torch.manual_seed(args.seed)
        model = build_model_for(cfg, args.num_items)
        if not use_kernels(model, kernel == "on") and kernel == "off":
            continue  # no HSTU layer: "off" would time the same thing again
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cycle = itertools.cycle(batches)
        seconds = time_call(lambda: training_step(model, optimiser, next(cycle)),  # noqa: B023
                            warmup=args.warmup_steps, min_repeats=args.steps, min_seconds=0.0,
                            max_repeats=args.steps)
        point = {
            "backbone": backbone, "scheme": args.scheme, "kernel": kernel, "max_len": args.max_len,
            "batch_size": args.batch_size,
            # Total events over total time: the rate a training epoch would see.
            "events_per_s": events_per_step * len(seconds) / float(seconds.sum()),
            "ms_per_step_p50": 1e3 * float(np.median(seconds)),
            "ms_per_step_p99": 1e3 * float(np.percentile(seconds, 99)),
            "steps": len(seconds), "parameters": sum(p.numel() for p in model.parameters()),
        }
        if args.json:
            print(json.dumps({"benchmark": "throughput", **point, "memory_ratio": args.memory_ratio,
                              "warmup_steps": args.warmup_steps,
                              "num_items": args.num_items, "dim": cfg.dim, "layers": cfg.layers,
                              "heads": cfg.heads, "head_dim": cfg.head_dim,
                              "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "python": platform.python_version(),
                              "device": "cpu"}), flush=True)
        else:
            print(table_line([format(point[name], spec) for name, spec in COLUMNS], HEADERS, WIDTH), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
