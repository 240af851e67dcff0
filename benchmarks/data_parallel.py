"""Training throughput of real epochs on one process and on several (torchrun, DistributedDataParallel, gloo on a CPU).

For each run of ``--runs`` (``PxT``: P processes of T torch threads each), one job trains ``--config`` (default
``configs/bench/hstu-ctr.yaml``: HSTU on MovieLens-100K, CTR) from scratch for ``--epochs`` epochs in a temporary
folder: a plain process for P = 1, ``torchrun --standalone --nproc-per-node P`` otherwise, each process with
``OMP_NUM_THREADS=T`` and ``train.threads=T``. The global batch is the config's ``train.batch_size`` whatever P
(each rank takes its share of every batch), so every job runs the same optimisation. events/s = the training
events of an epoch over its seconds (validation excluded); the table shows every epoch (the first one warms up)
and the load average of the machine before each job (other processes on the same cores slow every job). On GPUs:
``--set device=cuda`` (each rank takes ``cuda:<LOCAL_RANK>``, NCCL).

    python benchmarks/data_parallel.py
    python benchmarks/data_parallel.py --runs 1x1,1x2,2x1 --epochs 2 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import table_line

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ["processes", "threads", "epoch", "events_per_s", "seconds", "load_avg"]
WIDTH = 9


def parse_runs(text: str) -> list[tuple[int, int]]:
    runs = []
    for part in text.split(","):
        processes, sep, threads = part.strip().partition("x")
        if not (sep and processes.isdigit() and threads.isdigit() and int(processes) >= 1 and int(threads) >= 1):
            raise argparse.ArgumentTypeError(f"expected runs like 1x2,2x1 (processes x threads), got {text!r}")
        runs.append((int(processes), int(threads)))
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench" / "hstu-ctr.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--runs", type=parse_runs, default=parse_runs("1x1,1x2,2x1"),
                        help="comma-separated PxT: P processes of T threads (default 1x1,1x2,2x1)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per job (default 2; the first warms up)")
    parser.add_argument("--json", action="store_true", help="one JSON object per job and epoch, one per line")
    parser.add_argument("--rank-output", help=argparse.SUPPRESS)  # set on the jobs this script starts
    return parser.parse_args(argv)


def train_here(args: argparse.Namespace) -> None:
    """One process of a job: train, and rank 0 writes the epochs' throughput to ``--rank-output``."""
    import contextlib

    from malloc.config import load_config
    from malloc.device import resolve_device
    from malloc.distributed import joined, launch_from_environment, rank_device
    from malloc.heap import retain_freed_memory
    from malloc.results import atomic_write_json
    from malloc.runner import build_view
    from malloc.train import train

    retain_freed_memory()  # as the malloc command runs
    cfg = load_config(args.config, args.overrides)
    launch = launch_from_environment()
    with contextlib.ExitStack() as stack:
        if launch is not None:  # as malloc train does: each rank its GPU (NCCL), or the CPU (gloo)
            cfg = dataclasses.replace(cfg, device=rank_device(cfg.device, launch))
        world = None if launch is None else stack.enter_context(joined(launch, resolve_device(cfg.device)))
        view = build_view(cfg)
        with tempfile.TemporaryDirectory() as folder:
            _, result = train(cfg, view, Path(folder), show_progress=False, world=world)
        if world is None or world.is_main:
            atomic_write_json(args.rank_output, {
                "epochs": [{"epoch": h["epoch"], "events_per_s": h["events_per_second"], "seconds": h["seconds"]}
                           for h in result.history],
                "threads": torch.get_num_threads(), "world_size": 1 if world is None else world.size})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rank_output:
        train_here(args)
        return 0
    if not args.json:
        print(table_line(HEADERS, HEADERS, WIDTH))
    for processes, threads in args.runs:
        with tempfile.TemporaryDirectory() as folder:
            output = Path(folder) / "epochs.json"
            sets = [*args.overrides, f"train.epochs={args.epochs}", f"train.threads={threads}", "train.patience=1000"]
            command = [sys.executable, __file__, "--config", args.config, "--rank-output", str(output),
                       *(f"--set={s}" for s in sets)]
            if processes > 1:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={processes}", *command[1:]]
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            load = os.getloadavg()[0]
            job = subprocess.run(command, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                                 text=True)
            if job.returncode != 0:
                print(f"the job {processes}x{threads} failed:\n{job.stderr[-3000:]}", file=sys.stderr)
                return 1
            seen = json.loads(output.read_text())
        for epoch in seen["epochs"]:
            row = {"processes": processes, "threads": seen["threads"], "epoch": epoch["epoch"],
                   "events_per_s": epoch["events_per_s"], "seconds": epoch["seconds"], "load_avg": load}
            if args.json:
                print(json.dumps({**row, "config": args.config, "overrides": args.overrides,
                                  "torch": torch.__version__}))
            else:
                print(table_line([str(processes), str(row["threads"]), str(row["epoch"]),
                                  f"{row['events_per_s']:,.0f}", f"{row['seconds']:.1f}", f"{load:.1f}"],
                                 HEADERS, WIDTH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
