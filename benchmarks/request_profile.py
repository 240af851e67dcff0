"""Where one cached request's time goes: the top operators of ``Engine.request`` under ``torch.profiler``.

The request is the one ``latency.py`` times (a stored history of ``--length`` random events per user, 1 new event,
``--candidates`` candidates), for ``--users`` users at once, repeated ``--repeats`` times after a warm-up. Each row
is one operator: its self CPU time per request and its share of the total. ``--training`` profiles instead the
training step ``throughput.py`` times (``--users`` random windows of ``--length`` events, forward, backward and an
AdamW step), per step.

    python benchmarks/request_profile.py --backbone hstu --length 1024 --users 16 --threads 1
    python benchmarks/request_profile.py --backbone hstu --length 1024 --threads 1 --chain --repeats 50
    python benchmarks/request_profile.py --training --backbone sasrec --length 200 --users 32 --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from torch.profiler import profile

from _common import positive_int
from malloc.heap import retain_freed_memory
from malloc.memory.registry import build_model_for
from malloc.models import BACKBONES, ModelConfig
from malloc.models.base import SequentialRecommender
from malloc.profiling import synthetic_candidates, synthetic_events, synthetic_training_batch, training_step
from malloc.serving.engine import Engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="hstu")
    parser.add_argument("--length", type=positive_int, default=1024, help="stored events per user")
    parser.add_argument("--users", type=positive_int, default=1, help="users per request")
    parser.add_argument("--candidates", type=positive_int, default=100, help="candidates scored per user")
    parser.add_argument("--repeats", type=positive_int, default=20, help="profiled requests")
    parser.add_argument("--top", type=positive_int, default=15, help="operators listed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--chain", action="store_true",
                        help="each request appends to the state the previous one returned (as latency.py --chain)")
    parser.add_argument("--training", action="store_true",
                        help="profile a training step over --users windows of --length events instead")
    parser.add_argument("--json", action="store_true", help="one JSON object per operator")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(backbone=args.backbone), 10_000).eval()
    work, unit = (training_work(model, args), "step") if args.training else (request_work(model, args), "request")
    for _ in range(3):
        work()
    with profile() as profiler:
        for _ in range(args.repeats):
            work()
    ops = [op for op in profiler.key_averages() if op.self_cpu_time_total > 0]
    total = sum(op.self_cpu_time_total for op in ops)
    ops.sort(key=lambda op: op.self_cpu_time_total, reverse=True)
    if not args.json:
        what = (f"{args.users} training windows of {args.length} events" if args.training else
                f"{args.length} stored events, {args.users} users, {args.candidates} candidates")
        print(f"{args.backbone}, {what}, threads={torch.get_num_threads()}: "
              f"{total / 1e3 / args.repeats:.2f} ms of operator time per {unit}")
        print(f"{'operator':>28}  {'ms/' + unit:>10}  {'share':>6}  {'calls/' + unit:>13}")
    for op in ops[:args.top]:
        row = {"operator": op.key, f"ms_per_{unit}": op.self_cpu_time_total / 1e3 / args.repeats,
               "share": op.self_cpu_time_total / total, f"calls_per_{unit}": op.count / args.repeats}
        if args.json:
            print(json.dumps({"benchmark": "request_profile", "backbone": args.backbone, "training": args.training,
                              "chain": args.chain,
                              "length": args.length, "users": args.users, "candidates": args.candidates, **row}))
        else:
            print(f"{row['operator']:>28}  {row[f'ms_per_{unit}']:10.3f}  {row['share']:6.1%}  "
                  f"{row[f'calls_per_{unit}']:13.1f}")
    return 0


def request_work(model: SequentialRecommender, args: argparse.Namespace) -> Callable[[], object]:
    """One cached request per call: from the states prefilled once (left unchanged by the request), or with
    ``--chain`` from the states the previous call returned (the history grows by one event per call)."""
    events = synthetic_events(args.users, args.length + 1, model.num_items, seed=0)
    items, times = synthetic_candidates(events, args.candidates, model.num_items, seed=1)
    history, new = events.slice(0, args.length), events.slice(args.length, args.length + 1)
    engine = Engine(model)
    with torch.no_grad():
        stored = engine.prefill(history)

    newest = [stored]

    def work() -> object:
        with torch.no_grad():
            states, logits = engine.request(newest[0], new, items, times)
        if args.chain:
            newest[0] = states
        return logits
    return work


def training_work(model: SequentialRecommender, args: argparse.Namespace) -> Callable[[], object]:
    """One training step per call, on the same random windows each time."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = synthetic_training_batch(args.users, args.length, model.num_items, seed=0)
    return lambda: training_step(model, optimiser, batch)


if __name__ == "__main__":
    sys.exit(main())
