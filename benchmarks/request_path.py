"""One request, two ways, timed side by side: ``append`` then ``score`` (two passes through the layers) against
``Engine.request`` (the new events and the candidates in one pass, for a keep-everything policy).

The two are timed alternately in one process on the same stored state, so the ratio holds on a shared machine even
when the absolute times do not.

    python benchmarks/request_path.py                       # aligned table
    python benchmarks/request_path.py --lengths 256 --json  # one JSON object per (backbone, length)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from _common import int_list, name_list, table_line
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine

COLUMNS = ["backbone", "history_len", "two_pass_ms_p50", "one_pass_ms_p50", "ratio"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", type=name_list, default=["hstu", "sasrec"], help="comma-separated")
    parser.add_argument("--lengths", type=int_list, default=[1, 256, 1024], help="stored events, comma-separated")
    parser.add_argument("--candidates", type=int, default=100, help="candidates scored per request")
    parser.add_argument("--repeats", type=int, default=60, help="timed requests of each kind")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="one JSON object per point, one per line")
    args = parser.parse_args(argv)
    if min(args.candidates, args.repeats, args.threads) < 1:
        parser.error("--candidates, --repeats and --threads must be >= 1")
    return args


def measure(backbone: str, length: int, candidates: int, repeats: int) -> dict[str, float | int | str]:
    torch.manual_seed(0)
    model = build_model_for(ModelConfig(backbone=backbone), 10_000).eval()
    events = synthetic_events(1, length + 1, 10_000, 0)
    history, new = events.slice(0, length), events.slice(length, length + 1)
    items = torch.randint(1, 10_001, (1, candidates), generator=torch.Generator().manual_seed(1))
    times = events.timestamps[:, -1:].expand(1, candidates) + 1
    engine = Engine(model)
    with torch.no_grad():
        stored = engine.write(history)

        def two() -> torch.Tensor:
            return engine.score(engine.append(stored, new), items, times)

        def one() -> torch.Tensor:
            return engine.request(stored, new, items, times)[1]

        for call in (two, one, two, one):
            call()
        samples: dict[str, list[float]] = {"two": [], "one": []}
        for _ in range(repeats):
            for name, call in (("two", two), ("one", one)):
                tic = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - tic)
    two_ms, one_ms = (1e3 * float(np.median(samples[k])) for k in ("two", "one"))
    return {"backbone": backbone, "history_len": length, "two_pass_ms_p50": two_ms, "one_pass_ms_p50": one_ms,
            "ratio": two_ms / one_ms}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.json:
        print(table_line(COLUMNS, COLUMNS, 10))
    for backbone in args.backbones:
        for length in args.lengths:
            row = measure(backbone, length, args.candidates, args.repeats)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                cells = [str(row["backbone"]), str(row["history_len"]), *(f"{row[k]:.2f}" for k in COLUMNS[2:])]
                print(table_line(cells, COLUMNS, 10), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
