"""Writing a batch of users of different history lengths: one batched write against the same users one by one.

A serving replay writes users in batches (``eval.user_batch``), and a write is chunked (``--prefill-chunk``
events per step, each step attending to the state written so far). When a chunk is computed for every user of
the batch, the users whose events ended earlier only pad it, and a batch costs about B times its longest user;
MALLOC computes each chunk for the users whose events reach it only. This script times one batched write of
``--users`` users with log-uniform history lengths in ``[--min-len, --max-len]`` (the ``long`` suite's
distribution), the same users written one at a time, and the longest user's single write times B (the cost of a
write padded to the longest user). Model: the ``long`` suite's HSTU (D=64, 2 layers, 4 heads of 16), random
weights (the work does not depend on them).

    python benchmarks/batched_write.py                      # 8 users, 1,024 to 8,192 events
    python benchmarks/batched_write.py --users 16 --max-len 16384 --json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from _common import int_list
from malloc.core.tokens import Events
from malloc.device import synchronize
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import MAX_SCORES, Engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="users in the batch (8)")
    parser.add_argument("--min-len", type=int, default=1024, help="shortest history (1024)")
    parser.add_argument("--max-len", type=int, default=8192, help="longest history (8192)")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="events per write step (256, as `long`)")
    parser.add_argument("--max-scores", type=int_list, default=None,
                        help="comma-separated attention-score budgets per group of users to compare (default: the "
                             "library's MAX_SCORES only)")
    parser.add_argument("--backbone", default="hstu", choices=["hstu", "sasrec"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.users < 1 or not 1 <= args.min_len <= args.max_len or args.prefill_chunk < 1:
        parser.error("need --users >= 1, 1 <= --min-len <= --max-len and --prefill-chunk >= 1")
    return args


def log_uniform_lengths(users: int, low: int, high: int, seed: int) -> list[int]:
    """``users`` lengths, log-uniform in ``[low, high]``, longest first (as a replay orders its users)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(users, generator=generator, dtype=torch.float64)
    return sorted((round(math.exp(math.log(low) + float(x) * (math.log(high) - math.log(low)))) for x in u),
                  reverse=True)


def timed_write(model, events: Events, chunk: int, max_scores: int) -> float:
    engine = Engine(model, prefill_chunk=chunk, max_scores=max_scores)
    synchronize()
    tic = time.perf_counter()
    engine.prefill(events)
    synchronize()
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = args.max_scores or [MAX_SCORES]
    cfg = ModelConfig(backbone=args.backbone, dim=64, layers=2, heads=4, head_dim=16, dropout=0.0,
                      max_len=args.max_len)
    torch.manual_seed(args.seed)
    model = build_model_for(cfg, 10_000).eval()
    lengths = log_uniform_lengths(args.users, args.min_len, args.max_len, args.seed)
    full = synthetic_events(args.users, lengths[0], 10_000, args.seed)
    batch = Events(full.items, full.actions, full.timestamps, torch.tensor(lengths))
    warm = synthetic_events(2, 2 * args.prefill_chunk, 10_000, args.seed)
    timed_write(model, warm, args.prefill_chunk, MAX_SCORES)
    unbounded = 1 << 62  # one group: every user whose events reach a chunk (before grouped writes: every user)
    batched = {budget: timed_write(model, batch, args.prefill_chunk, budget) for budget in [*budgets, unbounded]}
    singles = [timed_write(model, Events(full.items[b:b + 1, :n], full.actions[b:b + 1, :n],
                                         full.timestamps[b:b + 1, :n], torch.tensor([n])), args.prefill_chunk,
                           unbounded) for b, n in enumerate(lengths)]
    result = {"benchmark": "batched_write", "users": args.users, "lengths": lengths,
              "prefill_chunk": args.prefill_chunk, "backbone": args.backbone, "threads": torch.get_num_threads(),
              "batched_s": {str(k): v for k, v in batched.items() if k != unbounded},
              "one_group_s": batched[unbounded], "one_by_one_s": sum(singles),
              "library_max_scores": MAX_SCORES, "torch": torch.__version__, "machine": platform.machine()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.backbone}, {args.users} users, lengths {lengths}, chunk {args.prefill_chunk}, "
          f"{result['threads']} threads")
    for budget in budgets:
        mark = "  (the library's default)" if budget == MAX_SCORES else ""
        print(f"batched, max_scores {budget:>11,d}  {batched[budget]:8.2f} s{mark}")
    print(f"batched, one group               {batched[unbounded]:8.2f} s")
    print(f"one user at a time               {sum(singles):8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
