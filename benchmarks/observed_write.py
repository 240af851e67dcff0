"""Time and peak memory of one user's write under a training-free policy (default H2O, which observes the
attention of the write), for A/B runs of two commits.

It uses only APIs that exist since before observed writes were chunked, so the same script measures an older
checkout: ``PYTHONPATH=<checkout>/src python benchmarks/observed_write.py ...``. Peak RSS is the process's own
(``ru_maxrss``); run one point per process.

    python benchmarks/observed_write.py --history 16384 --scheme h2o --ratio 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from malloc.memory.registry import build_model_for, build_policy
from malloc.models import ModelConfig
from malloc.profiling import peak_rss_mb
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=4096, help="events written")
    parser.add_argument("--scheme", default="h2o", help="training-free policy")
    parser.add_argument("--ratio", type=float, default=0.25, help="its memory ratio")
    parser.add_argument("--backbone", default="hstu")
    parser.add_argument("--num-items", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(backbone=args.backbone, max_len=args.history), args.num_items).eval()
    engine = Engine(model, build_policy(args.scheme, args.ratio))
    events = synthetic_events(1, args.history, args.num_items, 0)
    before = peak_rss_mb()
    tic = time.perf_counter()
    with torch.no_grad():
        state = engine.write(events)[0]
    print(json.dumps({"benchmark": "observed_write", "backbone": args.backbone, "scheme": args.scheme,
                      "ratio": args.ratio, "history": args.history, "threads": args.threads,
                      "write_seconds": round(time.perf_counter() - tic, 3), "rss_before_mb": round(before, 1),
                      "peak_rss_mb": round(peak_rss_mb(), 1), "kept_events": state.num_tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
