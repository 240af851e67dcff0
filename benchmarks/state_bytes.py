"""Stored bytes per user against history length: every scheme's measured memory ratio at each length.

A scheme's ratio knob is set once for a model (``max_len``), but what it stores depends on how long the user's
history is: RWKV's state is a constant, Linformer stores ``k`` projected rows whatever the length, Longformer a
window plus globals, Beacon one beacon per ``alpha`` events plus the open chunk, and the training-free policies
their own budget rule. This script writes one user's history of each length through the serving path
(:class:`~malloc.serving.engine.Engine`: prefill, then the policy's compression) and measures the stored
layers' bytes (``nbytes()`` of real tensors, the bookkeeping of positions and timestamps included, the last hidden
state left out: what the suites' ``memory_ratio`` divides) against Native's for the same events. For a trained-in
scheme it also checks the bytes against its analytic formula (``state_bytes``).

Weights do not change what is stored, so the models are untrained (seeded); nothing here measures accuracy.

    python benchmarks/state_bytes.py                                   # every scheme, the long suite's model
    python benchmarks/state_bytes.py --schemes rwkv,longformer,h2o --lengths 1024,4096 --ratios 1/16
    python benchmarks/state_bytes.py --json > state_bytes.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from _common import int_list, table_line
from malloc.cli import parse_ratio
from malloc.config import ModelConfig
from malloc.heap import retain_freed_memory
from malloc.memory.policy import SchemeError
from malloc.memory.registry import build_architecture, build_model_for, build_policy, scheme_names
from malloc.memory.schemes import ARCHITECTURES
from malloc.models import BACKBONES
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine
from malloc.serving.prefill_cache import PrefillCache

NUM_ITEMS = 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    every = [name for name in scheme_names() if name != "native"] + list(ARCHITECTURES)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", default=",".join(every), help="comma-separated (default: every registered)")
    parser.add_argument("--ratios", default="1/4,1/16,1/64", help="comma-separated target ratios, e.g. 1/4,0.1")
    parser.add_argument("--lengths", type=int_list, default=[256, 1024, 4096, 16384],
                        help="history lengths (default: 256,1024,4096,16384); model.max_len is the longest")
    parser.add_argument("--backbone", default="hstu", choices=sorted(BACKBONES))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--state-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="events per prefill chunk")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per (scheme, ratio, length)")
    args = parser.parse_args(argv)
    args.schemes = [name.strip() for name in args.schemes.split(",") if name.strip()]
    unknown = [name for name in args.schemes if name not in every]
    if unknown or not args.schemes:
        parser.error(f"--schemes: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(every)}")
    try:
        args.ratios = [(text.strip(), parse_ratio(text)) for text in args.ratios.split(",") if text.strip()]
    except ValueError as exc:
        parser.error(f"--ratios: {exc}")
    if not args.ratios or not all(0 < ratio <= 1 for _, ratio in args.ratios):
        parser.error(f"--ratios: expected target ratios in (0, 1], got {[text for text, _ in args.ratios]}")
    return args


def layer_bytes(engine: Engine, events) -> tuple[int, float]:
    """Bytes of the stored layers of one user after writing ``events`` ``(1, n)``, and the stored tokens per
    layer (mean over layers)."""
    (state,) = engine.write(events)
    return (sum(layer.nbytes() for layer in state.layers),
            sum(layer.num_tokens for layer in state.layers) / len(state.layers))


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per (scheme, ratio, length); an unreachable point carries its error instead of bytes."""
    base = ModelConfig(backbone=args.backbone, dim=args.dim, layers=args.layers, heads=args.heads,
                       head_dim=args.head_dim, max_len=max(args.lengths), state_dtype=args.state_dtype, dropout=0.0)
    histories = {n: synthetic_events(1, n, NUM_ITEMS, args.seed + n) for n in args.lengths}
    torch.manual_seed(args.seed)
    native_model = build_model_for(base, NUM_ITEMS)
    cache = PrefillCache(native_model)  # the policies share Native's uncompressed writes
    native = {n: layer_bytes(Engine(native_model, prefill_chunk=args.prefill_chunk, prefill_cache=cache), events)
              for n, events in histories.items()}
    rows = []
    for scheme in args.schemes:
        trained = scheme in ARCHITECTURES
        for text, ratio in (args.ratios if not trained or ARCHITECTURES[scheme].ratio_knob else args.ratios[:1]):
            point = {"scheme": scheme, "family": "trained-in" if trained else "training-free", "target": text}
            try:
                if trained:
                    cfg = replace(base, scheme=scheme, memory_ratio=ratio)
                    arch = build_architecture(cfg)
                    torch.manual_seed(args.seed)
                    engine = Engine(build_model_for(cfg, NUM_ITEMS), prefill_chunk=args.prefill_chunk)
                    knobs = arch.knob_values(cfg)
                else:
                    policy = build_policy(scheme, ratio)
                    engine = Engine(native_model, policy, prefill_chunk=args.prefill_chunk, prefill_cache=cache)
                    knobs = {"policy": repr(policy)}
                for n, events in histories.items():
                    nbytes, tokens = layer_bytes(engine, events)
                    row = {**point, "knobs": knobs, "history_len": n, "layer_bytes": nbytes,
                           "native_layer_bytes": native[n][0], "memory_ratio": nbytes / native[n][0],
                           "stored_tokens": tokens}
                    if trained:
                        row["formula_bytes"] = arch.state_bytes(cfg, n)
                    rows.append(row)
            except SchemeError as exc:  # an unreachable ratio (e.g. INT8 below 0.3) is a row, not a crash
                rows.append({**point, "error": str(exc).splitlines()[0]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    if args.json:
        for row in rows:
            print(json.dumps({"benchmark": "state_bytes", "backbone": args.backbone, "dim": args.dim,
                              "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                              "state_dtype": args.state_dtype, "max_len": max(args.lengths), **row}))
        return 0
    print(f"{args.backbone} D={args.dim} L={args.layers} H={args.heads} d_h={args.head_dim} "
          f"state {args.state_dtype}, max_len {max(args.lengths)}: stored layer bytes / Native's at each length")
    headers = ["scheme", "target", *[f"n={n}" for n in args.lengths], "knobs"]
    print(table_line(headers, headers, 8))
    points: dict[tuple[str, str], dict] = {}
    for row in rows:
        points.setdefault((row["scheme"], row["target"]), {})[row.get("history_len")] = row
    mismatches = []
    for (scheme, target), by_len in points.items():
        if None in by_len:
            print(table_line([scheme, target, *["-"] * len(args.lengths), by_len[None]["error"][:70]], headers, 8))
            continue
        cells = [f"{by_len[n]['memory_ratio']:.4f}" for n in args.lengths]
        knobs = ",".join(f"{k}={v}" for k, v in next(iter(by_len.values()))["knobs"].items())
        print(table_line([scheme, target, *cells, knobs or "-"], headers, 8))
        mismatches += [(scheme, target, n) for n, row in by_len.items()
                       if "formula_bytes" in row and row["formula_bytes"] != row["layer_bytes"]]
    print("analytic state_bytes of the trained-in schemes: " + (
        "equal to the measured bytes at every point" if not mismatches else f"DIFFERS at {mismatches}"))
    return 1 if mismatches else 0


if __name__ == "__main__":
    retain_freed_memory()  # long prefills allocate large temporaries (docs/BENCHMARKS.md, "The heap")
    sys.exit(main())
