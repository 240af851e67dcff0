"""Training steps on long windows with glibc's default heap against a heap that keeps freed memory.

Each setting runs in its own process (the allocator settings are per process): ``--steps`` training steps
(forward, click loss, backward, AdamW) of the ``long`` suite's HSTU (D=64, 2 layers, 4 heads of 16) on random
batches of ``--batch`` full windows of ``--window`` events, after one warm-up step. Reported per setting: the
median step time, the CPU seconds spent in user space and in the kernel over the timed steps, the minor page
faults per step, and the peak resident size. ``retained`` is what the ``malloc`` command runs with
(:mod:`malloc.heap`).

    python benchmarks/heap.py                          # 8 windows of 1,024 events, 3 steps, 1 thread
    python benchmarks/heap.py --window 200 --batch 128 # MovieLens-100K's window and batch
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = ("system", "retained")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=1024, help="events per training window (1024, as `long`)")
    parser.add_argument("--batch", type=int, default=8, help="windows per step (8, as `long`)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (3)")
    parser.add_argument("--backbone", default="hstu", choices=["hstu", "sasrec"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)  # one setting, in this process
    args = parser.parse_args(argv)
    if min(args.window, args.batch, args.steps, args.threads) < 1:
        parser.error("--window, --batch, --steps and --threads must be positive")
    return args


def measure(args: argparse.Namespace) -> dict:
    """Run the steps in this process under ``args.worker``'s heap setting."""
    from malloc.heap import retain_freed_memory

    applied = retain_freed_memory() if args.worker == "retained" else False
    import torch

    from malloc.memory.registry import build_model_for
    from malloc.models import ModelConfig
    from malloc.profiling.latency import synthetic_training_batch, training_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_items = 256
    model = build_model_for(ModelConfig(backbone=args.backbone, dim=64, layers=2, heads=4, head_dim=16,
                                    max_len=args.window), num_items)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [synthetic_training_batch(args.batch, args.window, num_items, seed) for seed in range(args.steps + 1)]
    training_step(model, optimiser, batches[0])  # warm-up: the heap grows to its working size here
    before, seconds = resource.getrusage(resource.RUSAGE_SELF), []
    for batch in batches[1:]:
        tic = time.perf_counter()
        training_step(model, optimiser, batch)
        seconds.append(time.perf_counter() - tic)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"setting": args.worker, "applied": applied, "step_seconds": statistics.median(seconds),
            "user_seconds": after.ru_utime - before.ru_utime, "kernel_seconds": after.ru_stime - before.ru_stime,
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
            "peak_rss_mib": after.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    rows = []
    for setting in SETTINGS:
        out = subprocess.run([sys.executable, __file__, *passed, "--worker", setting], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    speedup = rows[0]["step_seconds"] / rows[1]["step_seconds"]
    config = {"window": args.window, "batch": args.batch, "steps": args.steps, "backbone": args.backbone,
              "threads": args.threads, "machine": platform.machine(), "python": platform.python_version()}
    if args.json:
        print(json.dumps({**config, "rows": rows, "speedup": speedup}))
        return 0
    print(" ".join(f"{k}={v}" for k, v in config.items()))
    print(f"{'heap':>9} {'step s':>7} {'user s':>7} {'kernel s':>8} {'faults/step':>11} {'peak MiB':>8}")
    for row in rows:
        print(f"{row['setting']:>9} {row['step_seconds']:7.2f} {row['user_seconds']:7.1f} "
              f"{row['kernel_seconds']:8.1f} {row['page_faults_per_step']:11.0f} {row['peak_rss_mib']:8.0f}")
    print(f"retained heap: {speedup:.2f}x faster per step" + ("" if rows[1]["applied"] else
                                                               " (not applied: the C library is not glibc)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
