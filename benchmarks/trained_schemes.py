"""Every trained-in scheme trained with the Native recipe, at 2 and 8 layers, as one Markdown table per config.

Each point is ``malloc train --config C --scheme S --memory-ratio R --set model.layers=L`` (results cached in
``results/``, so a rerun only fills what is missing); accuracy, measured memory ratio and MACs come from the
run's test replay (the serving path), latency from timing one user's request (append 1 event + score 100
candidates, batch 1) at a fixed history length against the scheme's own stored state.

    python benchmarks/trained_schemes.py --config configs/bench/hstu-ctr.yaml --ratios 1/4 --layers 2,8 \\
        --out docs/results-trained-hstu-ctr.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from dataclasses import replace

import numpy as np
import torch

from malloc.cli import parse_ratio
from malloc.config import load_config
from malloc.heap import retain_freed_memory
from malloc.memory.registry import build_model_for
from malloc.memory.schemes import ARCHITECTURES
from malloc.models.macs import format_macs
from malloc.profiling.latency import request_latency, synthetic_training_batch, time_call, training_step
from malloc.results import atomic_write_text, read_json
from malloc.runner import load_trained, run, run_dir_for

METRICS = {"ctr": [("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "Logloss")],
           "retrieval": [("hr@10", "HR@10"), ("ndcg@10", "NDCG@10")]}


def point_config(config: str, scheme: str, ratio: float, layers: int):
    cfg = load_config(config, [f"model.layers={layers}"])
    if scheme == "native":
        return cfg
    return replace(cfg, name=f"{cfg.name}-{scheme}", model=replace(cfg.model, scheme=scheme, memory_ratio=ratio))


def train_point(cfg) -> str | None:
    """Train and test one point (or reuse it); None on success, else the error."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run(cfg, show_progress=False)
    except Exception as exc:  # a diverged or broken scheme is a result of the sweep, not its end
        return f"{type(exc).__name__}: {exc}"
    return None


def latency(cfg, history_len: int) -> tuple[dict, int]:
    """Request latency of the trained model against its own stored state, and its catalogue size."""
    model, _, _ = load_trained(cfg)
    return request_latency(model, history_len=history_len, candidates=100, append_events=1,
                           prefill_chunk=cfg.eval.prefill_chunk,
                           recompute_timing={"min_repeats": 3, "max_repeats": 3}), model.num_items


def step_ms(cfg, num_items: int) -> float:
    """Median milliseconds of one training step (forward, backward, Adam) on 32 windows of ``max_len`` events:
    timed here, one point after another, because epoch times taken while other work shares the machine are not
    comparable across runs."""
    torch.manual_seed(0)
    model = build_model_for(cfg.model, num_items)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = synthetic_training_batch(32, cfg.model.max_len, num_items, seed=0)
    return float(np.median(time_call(lambda: training_step(model, optimiser, batch), warmup=1, min_repeats=5,
                                     max_repeats=5))) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--schemes", default=",".join(["native", *ARCHITECTURES]),
                        help="comma-separated; NAME@R trains NAME at ratio R only (e.g. gqa@1/2)")
    parser.add_argument("--ratios", default="1/4", help="comma-separated target ratios (schemes with a knob)")
    parser.add_argument("--layers", default="2,8", help="depths; the first is the main table's")
    parser.add_argument("--latency-history", type=int, default=1024, help="history length of the timed request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency timing")
    parser.add_argument("--out", help="write the Markdown tables here")
    args = parser.parse_args(argv)
    schemes = args.schemes.split(",")
    ratios = [r.strip() for r in args.ratios.split(",")]
    depths = [int(x) for x in args.layers.split(",")]
    sections = []
    for config in args.config:
        task = load_config(config).task
        metric_key, metric_title = METRICS[task][1 if task == "ctr" else 0]
        header = (["scheme", "target", "knobs", "measured ratio"] + [t for _, t in METRICS[task]]
                  + ["MACs/request", f"ms p50 / p99 @ n={args.latency_history}", "train ms/step", "epochs (best)"]
                  + [f"{metric_title} @ {d} layers" for d in depths[1:]])
        lines = [f"**{config}** ({task}; {depths[0]} layers unless said)", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for entry in schemes:
            scheme, _, own_ratio = entry.partition("@")
            cls = ARCHITECTURES.get(scheme)
            for ratio in ([own_ratio] if own_ratio else ratios if cls is not None and cls.ratio_knob else ratios[:1]):
                value = 1.0 if scheme == "native" else parse_ratio(ratio)
                cells, main_cfg = [], None
                for depth in depths:
                    cfg = point_config(config, scheme, value, depth)
                    print(f"{config} {scheme} r={value:g} L={depth}", file=sys.stderr, flush=True)
                    error = train_point(cfg)
                    cells.append((cfg, error))
                    main_cfg = main_cfg or cfg
                cfg, error = cells[0]
                if error is not None:
                    lines.append(f"| {scheme} | {ratio} | - | failed: {error[:80]} |" + " |" * (len(header) - 4))
                    continue
                root = run_dir_for(cfg).root
                metrics, meters = read_json(root / "metrics.json"), read_json(root / "meters.json")
                torch.set_num_threads(args.threads)
                lat, num_items = latency(cfg, args.latency_history)
                step = step_ms(cfg, num_items)
                knobs = ", ".join(f"{k}={v}" for k, v in meters.get("scheme_knobs", {}).items()) or "-"
                deep = []
                for deep_cfg, deep_error in cells[1:]:
                    if deep_error is not None:
                        deep.append(f"failed ({deep_error[:40]})")
                    else:
                        deep.append(f"{read_json(run_dir_for(deep_cfg).root / 'metrics.json')[metric_key]:.4f}")
                lines.append("| " + " | ".join([
                    scheme, "1" if scheme == "native" else ratio, knobs, f"{meters['memory_ratio']:.3f}",
                    *[f"{metrics[k]:.4f}" for k, _ in METRICS[task]],
                    format_macs(meters["macs_per_request"]),
                    f"{lat['cached_ms_p50']:.2f} / {lat['cached_ms_p99']:.2f}",
                    f"{step:.0f}", f"{meters['epochs_run']} ({meters['best_epoch']})", *deep]) + " |")
        sections.append("\n".join(lines))
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    retain_freed_memory()  # as the malloc command does (malloc.heap)
    sys.exit(main())
