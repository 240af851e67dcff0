"""HSTU's C attention kernel alone (``malloc.kernels.hstu``): milliseconds per call at each thread count.

One call on random inputs shaped like a training step (``--batch`` windows of ``--length`` events, no stored
keys, forward and forward + backward) and like a request (``--candidates`` candidates sharing a position and a
time, plus one new event, over ``--stored`` stored keys, forward only), 4 heads of 16, each timed ``--repeats``
times after a warm-up; the median is printed, and for the forward calls the nanoseconds per (query, key, head)
pair, the causal half for the training call. As a yardstick of what this CPU does with dense arithmetic, each
thread count also times a 1024 x 1024 ``torch.matmul`` (GFLOP/s).

    python benchmarks/attention_kernel.py --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import numpy as np
import torch

from _common import int_list, positive_int
from malloc.core.tokens import KVBlock
from malloc.heap import retain_freed_memory
from malloc.kernels import hstu as kernel
from malloc.models.hstu import RelativeBias
from malloc.profiling import time_call

HEADS, WIDTH = 4, 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int_list, default=[1], help="torch threads, comma-separated")
    parser.add_argument("--batch", type=positive_int, default=32, help="training windows")
    parser.add_argument("--length", type=positive_int, default=200, help="events per training window")
    parser.add_argument("--stored", type=positive_int, default=1024, help="stored keys of the request")
    parser.add_argument("--candidates", type=positive_int, default=100, help="candidates of the request")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed calls")
    parser.add_argument("--json", action="store_true", help="one JSON object per point")
    return parser.parse_args(argv)


def call(batch: int, cached: int, new: int, candidates: int, grad: bool) -> Callable[[], object]:
    """A kernel call over ``cached`` stored keys and ``new`` new tokens, the last ``candidates`` of them
    candidates (one position and time, not history)."""
    g = torch.Generator().manual_seed(0)
    width = cached + new
    q = torch.randn(batch, HEADS, new, WIDTH, generator=g).requires_grad_(grad)
    k, v = (torch.randn(batch, HEADS, width, WIDTH, generator=g).requires_grad_(grad) for _ in range(2))
    positions = torch.arange(width).repeat(batch, 1, 1)
    times = torch.randint(0, 5000, (batch, 1, width), generator=g).cumsum(-1)
    valid = torch.ones(batch, 1, width, dtype=torch.bool)
    if candidates:
        positions[..., width - candidates:] = width - candidates
        times[..., width - candidates:] = times[..., width - candidates - 1:width - candidates] + 60
        valid[..., width - candidates:] = False
    bias = RelativeBias(64, 64)
    bias.requires_grad_(grad)
    # contiguous, as the engine hands the kernel a stored layer (a slice would be copied on every call)
    stored = KVBlock(*(x[:, :, :cached].contiguous() for x in (k, v, positions, times, valid))) if cached else None
    args = (q, k[:, :, cached:], v[:, :, cached:], positions[:, 0, cached:], times[:, 0, cached:],
            valid[:, 0, cached:], bias.tables(), 0.25, 200.0)
    if not grad:
        return lambda: kernel.pointwise_attention(*args, cached=stored)
    return lambda: kernel.pointwise_attention(*args, cached=stored).sum().backward()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    retain_freed_memory()  # as the malloc command runs (the kernel's buffers are not page-faulted in per call)
    if not kernel.available():
        print("the C kernel is not available here (no C compiler, or its build failed; see the warning)")
        return 1
    points = [("training forward", args.batch, 0, args.length, 0, False),
              ("training forward+backward", args.batch, 0, args.length, 0, True),
              ("request forward", 1, args.stored, args.candidates + 1, args.candidates, False)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        seconds = time_call(lambda: a @ b, warmup=2, min_repeats=args.repeats, min_seconds=0.0,  # noqa: B023
                            max_repeats=args.repeats)
        gflops = 2 * 1024**3 / float(np.median(seconds)) / 1e9
        if args.json:
            print(json.dumps({"benchmark": "attention_kernel", "point": "matmul", "threads": threads,
                              "gflops": gflops}))
        else:
            print(f"threads {threads}  {'matmul 1024^3':<26} GFLOP/s {gflops:8.1f}")
        for name, batch, cached, new, candidates, grad in points:
            with torch.set_grad_enabled(grad):
                seconds = time_call(call(batch, cached, new, candidates, grad), warmup=2,
                                    min_repeats=args.repeats, min_seconds=0.0, max_repeats=args.repeats)
            ms = 1e3 * float(np.median(seconds))
            pairs = batch * new * (cached + (new + 1) / 2 if candidates == 0 else cached + new) * HEADS
            ns = None if grad else 1e6 * ms / pairs
            if args.json:
                print(json.dumps({"benchmark": "attention_kernel", "point": name, "threads": threads, "batch": batch,
                                  "stored": cached, "new": new, "candidates": candidates, "ms_p50": ms,
                                  "ns_per_pair": ns}))
            else:
                print(f"threads {threads}  {name:<26} ms {ms:8.2f}" + ("" if grad else f"  ns/pair {ns:5.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
