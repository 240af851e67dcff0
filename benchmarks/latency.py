"""Request latency of one user, cached state against full recompute, for HSTU and SASRec.

For every backbone and history length: a stored state is written by prefilling the history, then the cached
request (append the new events + score the candidates) and the full recompute (prefill history + new events,
in chunks of ``--prefill-chunk``, + score) are timed; see :func:`malloc.profiling.request_latency`.

Each point is also put against its roofline on this machine: the time the request's arithmetic (``2 x MACs``,
:mod:`malloc.models.macs`, at ``--peak-gflops`` per thread) or its state read (the stored bytes at
``--bandwidth-gbs`` per thread) would take at least, whichever is longer; ``*_x_roofline`` = measured p50 /
roofline (1 would be the machine's limit). The recompute reads no stored state: its roofline is its arithmetic.

The candidates of a request share one request time. Under the default model (``--candidate query``) the layers
see no candidate's item, so they compute one candidate token and each candidate pays its readout
(:mod:`malloc.serving.candidates`); ``--candidate item`` times a model whose every candidate is its own token.

With ``--users 1,64`` each point is also timed as one request of 64 users at once (one ``Engine.request`` over
64 stored states): a batch shares the per-call cost, so ``cached_ms_per_user`` (p50 / users) is what a server
that batches its users pays per user. The roofline scales with the users (their MACs and their state bytes).

    python benchmarks/latency.py                       # aligned table
    python benchmarks/latency.py --json > latency.jsonl  # one JSON object per (backbone, length, users)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import int_list, name_list, switch_list, table_line
from malloc.device import environment
from malloc.heap import retain_freed_memory
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.models.hstu import use_kernels
from malloc.models.macs import recompute_macs, request_macs
from malloc.profiling import request_latency

TARGET_LENGTH = 1024
TARGET_SPEEDUP = 10.0
# (key, format spec) of the table's columns; each is as wide as the wider of its header and its values.
COLUMNS = [("backbone", ""), ("kernel", ""), ("history_len", "d"), ("users", "d"), ("cached_ms_p50", ".2f"),
           ("cached_ms_p99", ".2f"), ("cached_ms_per_user", ".3f"), ("recompute_ms_p50", ".2f"),
           ("recompute_ms_p99", ".2f"), ("speedup_p50", ".1f"),
           ("state_bytes", "d"), ("cached_roofline_ms", ".3f"), ("cached_x_roofline", ".1f"),
           ("recompute_roofline_ms", ".2f"), ("recompute_x_roofline", ".1f"), ("repeats_cached", "d"),
           ("repeats_recompute", "d")]
WIDTH = 12
HEADERS = [name for name, _ in COLUMNS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", type=name_list, default=["hstu", "sasrec"], help="comma-separated")
    parser.add_argument("--lengths", type=int_list, default=[256, 1024, 4096, 16384],
                        help="history lengths, comma-separated")
    parser.add_argument("--users", type=int_list, default=[1],
                        help="users per request (one batched Engine.request), comma-separated")
    parser.add_argument("--kernels", type=switch_list, default=["on"],
                        help="HSTU's C attention kernel: on, off, or on,off to time both side by side")
    parser.add_argument("--candidates", type=int, default=100, help="candidates scored per request")
    parser.add_argument("--candidate", choices=["query", "item"], default="query",
                        help="what the layers see of a candidate (ModelConfig.candidate): query, the default model "
                             "(the candidates of one request time are one token to the layers), or item "
                             "(every candidate is its own token)")
    parser.add_argument("--append-events", type=int, default=1, help="new events appended per request")
    parser.add_argument("--chain", action="store_true",
                        help="each timed request appends to the state the previous one returned (a user's next "
                             "request), instead of every request to the same stored state")
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="events per prefill chunk")
    parser.add_argument("--num-items", type=int, default=10_000, help="item vocabulary size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--min-repeats", type=int, default=5, help="timed calls at least")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="total timed seconds at least")
    parser.add_argument("--max-repeats", type=int, default=1000, help="timed calls at most")
    parser.add_argument("--recompute-warmup", type=int, default=1,
                        help="untimed recompute calls (a 16k-event recompute takes minutes on a CPU)")
    parser.add_argument("--recompute-min-repeats", type=int, default=3, help="timed recompute calls at least")
    parser.add_argument("--peak-gflops", type=float, default=90.0,
                        help="arithmetic roofline: fp32 GFLOP/s per thread (the 2-core VM: 90)")
    parser.add_argument("--bandwidth-gbs", type=float, default=17.0,
                        help="memory roofline: GB/s per thread for reading the stored state (the 2-core VM: 17)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heap", choices=["retained", "system"], default="retained",
                        help="retained: keep freed memory in the heap, as the malloc command does (malloc.heap); "
                             "system: the C library's defaults")
    parser.add_argument("--json", action="store_true", help="one JSON object per point, one per line")
    return parser.parse_args(argv)


def roofline(cfg: ModelConfig, point: dict, args: argparse.Namespace) -> dict[str, float]:
    """The point's MACs (per user), its rooflines (ms, all ``point["users"]`` users) and measured / roofline, at
    ``point["threads"]`` threads."""
    threads = point["threads"]
    flops, bandwidth = 1e9 * args.peak_gflops * threads, 1e9 * args.bandwidth_gbs * threads
    n, t, c = point["history_len"], args.append_events, args.candidates
    # Engine's default candidate_chunk; the candidates share one request time
    cached = request_macs(cfg, n, t, c, candidate_chunk=256, candidate_times=1)
    recompute = recompute_macs(cfg, n, t, c, prefill_chunk=args.prefill_chunk, candidate_chunk=256,
                               candidate_times=1)
    users = point["users"]
    cached_ms = 1e3 * users * max(2 * cached / flops, point["state_bytes"] / bandwidth)
    recompute_ms = 1e3 * users * 2 * recompute / flops
    return {"cached_macs": cached, "recompute_macs": recompute, "cached_roofline_ms": cached_ms,
            "cached_x_roofline": point["cached_ms_p50"] / cached_ms, "recompute_roofline_ms": recompute_ms,
            "recompute_x_roofline": point["recompute_ms_p50"] / recompute_ms}


def report(backbone: str, cfg: ModelConfig, point: dict, meets: bool | None, timing: dict,
           args: argparse.Namespace) -> None:
    """Print one point: a JSON object under ``--json``, else a table row."""
    if args.json:
        record = {"benchmark": "latency", "backbone": backbone, **point,
                  "target_10x_at_1024_met": meets, "candidates": args.candidates,
                  "append_events": args.append_events, "prefill_chunk": args.prefill_chunk,
                  "peak_gflops_per_thread": args.peak_gflops, "bandwidth_gbs_per_thread": args.bandwidth_gbs,
                  "num_items": args.num_items, "candidate": cfg.candidate, "dim": cfg.dim, "layers": cfg.layers,
                  "heads": cfg.heads, "head_dim": cfg.head_dim, "state_dtype": cfg.state_dtype,
                  **timing, "recompute_warmup": args.recompute_warmup,
                  "recompute_min_repeats": args.recompute_min_repeats, "heap": args.heap,
                  **environment(args.device)}
        print(json.dumps(record), flush=True)
    else:
        row = {"backbone": backbone, **point}
        mark = "  <- target" if meets is not None else ""
        cells = [format(row[name], spec) for name, spec in COLUMNS]
        print(table_line(cells, HEADERS, WIDTH) + mark, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.heap == "retained":
        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    timing = {"warmup": args.warmup, "min_repeats": args.min_repeats, "min_seconds": args.min_seconds,
              "max_repeats": args.max_repeats}
    recompute_timing = {"warmup": args.recompute_warmup, "min_repeats": args.recompute_min_repeats,
                        "max_repeats": max(args.max_repeats, args.recompute_min_repeats)}
    if not args.json:
        print(f"device={args.device} threads={torch.get_num_threads()} candidates={args.candidates} "
              f"candidate={args.candidate} "
              f"append_events={args.append_events} prefill_chunk={args.prefill_chunk} "
              f"num_items={args.num_items}")
        print(table_line(HEADERS, HEADERS, WIDTH))
    verdicts = []
    for backbone in args.backbones:
        # Default size; max_len stays at its default: HSTU only divides by it and SASRec clamps positions to
        # its table, neither of which changes the work done.
        cfg = ModelConfig(backbone=backbone, candidate=args.candidate)
        torch.manual_seed(args.seed)
        model = build_model_for(cfg, args.num_items).to(args.device).eval()
        for length in args.lengths:
            for users in args.users:
                for kernel in args.kernels:
                    if not use_kernels(model, kernel == "on") and kernel == "off":
                        continue  # no HSTU layer: "off" would time the same thing again
                    point = request_latency(model, length, candidates=args.candidates, users=users,
                                            append_events=args.append_events, prefill_chunk=args.prefill_chunk,
                                            seed=args.seed, chain=args.chain, recompute_timing=recompute_timing,
                                            **timing)
                    point.update(roofline(cfg, point, args), kernel=kernel)
                    meets = (point["speedup_p50"] >= TARGET_SPEEDUP if length == TARGET_LENGTH and users == 1
                             else None)
                    if meets is not None:
                        verdicts.append((f"{backbone} (kernel {kernel})", point["speedup_p50"], meets))
                    report(backbone, cfg, point, meets, timing, args)
    if not args.json:
        target = f"target (cached >= {TARGET_SPEEDUP:g}x faster than recompute at {TARGET_LENGTH:,} events)"
        if not verdicts:
            print(f"{target}: not measured (add {TARGET_LENGTH} to --lengths)")
        for backbone, speedup, meets in verdicts:
            print(f"{target}, {backbone}: {'MET' if meets else 'NOT MET'} (speedup {speedup:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
