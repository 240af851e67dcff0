"""Peak memory (RSS) of training and of serving, for HSTU and SASRec at the default size.

Each measurement runs in its own fresh subprocess (:func:`malloc.profiling.measure_peak_in_subprocess`), so
its peak is its own:

- ``train``: ``--train-steps`` training steps (forward, backward, AdamW) on ``--batch-size`` random full
  windows of ``--max-len`` events (:func:`malloc.profiling.memory.training_workload`);
- ``serve``: write of ``--users`` users x ``--history`` events (``--user-batch`` users at a time) under
  ``--scheme`` at ``--ratio`` (default Native: every event kept; a query-aware scheme such as ``h2o`` observes
  the attention of the write), keeping every state, then scoring ``--candidates`` candidates per user
  (:func:`malloc.profiling.memory.serving_workload`); the total stored state bytes of all users are
  reported too.

``import_rss_mb`` is the subprocess's peak after importing torch and the library, before the workload; it is
included in ``peak_rss_mb``.

    python benchmarks/memory.py
    python benchmarks/memory.py --json > memory.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from _common import name_list, table_line
from malloc.profiling import measure_peak_in_subprocess

COLUMNS = [("backbone", ""), ("workload", ""), ("import_rss_mb", ".1f"), ("peak_rss_mb", ".1f"),
           ("workload_rss_mb", ".1f"), ("state_bytes", "")]
WIDTH = 10
HEADERS = [name for name, _ in COLUMNS]






def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", type=name_list, default=["hstu", "sasrec"], help="comma-separated")
    parser.add_argument("--workloads", default="train,serve", help="comma-separated among train, serve")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps in the train workload")
    parser.add_argument("--batch-size", type=int, default=32, help="training windows per step")
    parser.add_argument("--max-len", type=int, default=200, help="events per training window")
    parser.add_argument("--users", type=int, default=256, help="users served")
    parser.add_argument("--history", type=int, default=512, help="stored events per served user")
    parser.add_argument("--candidates", type=int, default=100, help="candidates scored per user")
    parser.add_argument("--user-batch", type=int, default=32, help="users prefilled / scored together")
    parser.add_argument("--num-items", type=int, default=10_000, help="item vocabulary size")
    parser.add_argument("--scheme", default="native", help="training-free scheme of the serve workload's writes")
    parser.add_argument("--ratio", type=float, default=1.0, help="its memory ratio")
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="events per write chunk")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per subprocess (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per point, one per line")
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or any(w not in ("train", "serve") for w in args.workloads):
        parser.error(f"--workloads: expected names among train, serve; got {args.workloads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.json:
        print(f"users={args.users} history={args.history} scheme={args.scheme} ratio={args.ratio} "
              f"candidates={args.candidates} "
              f"user_batch={args.user_batch} train: steps={args.train_steps} batch_size={args.batch_size} "
              f"max_len={args.max_len}; num_items={args.num_items}")
        print(table_line(HEADERS, HEADERS, WIDTH))
    for backbone in args.backbones:
        for workload in args.workloads:
            common = {"backbone": backbone, "num_items": args.num_items, "threads": args.threads,
                      "seed": args.seed}
            if workload == "train":
                target = "malloc.profiling.memory:training_workload"
                kwargs = {**common, "steps": args.train_steps, "batch_size": args.batch_size,
                          "max_len": args.max_len}
            else:
                target = "malloc.profiling.memory:serving_workload"
                kwargs = {**common, "users": args.users, "history": args.history,
                          "candidates": args.candidates, "user_batch": args.user_batch, "scheme": args.scheme,
                          "memory_ratio": args.ratio, "prefill_chunk": args.prefill_chunk}
            measured = measure_peak_in_subprocess(target, kwargs, timeout=args.timeout)
            result = measured["result"]
            point = {"backbone": backbone, "workload": workload, "import_rss_mb": measured["import_rss_mb"],
                     "peak_rss_mb": measured["peak_rss_mb"],
                     "workload_rss_mb": measured["peak_rss_mb"] - measured["import_rss_mb"],
                     "state_bytes": result.get("state_bytes")}
            if args.json:
                print(json.dumps({"benchmark": "memory", **point, "config": result,
                                  "torch": torch.__version__, "python": platform.python_version(),
                                  "device": "cpu"}), flush=True)
            else:
                cells = [format(point[name], spec) if point[name] is not None else "-"
                         for name, spec in COLUMNS]
                print(table_line(cells, HEADERS, WIDTH), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
