"""Every training-free scheme at several memory ratios on trained Native checkpoints, as one Markdown table.

Each point is ``malloc eval --config C --scheme S --memory-ratio R`` (results cached in the run directory, so a
rerun only fills what is missing); the table is built from the JSON files only.

    python benchmarks/scheme_sweep.py --config configs/bench/hstu-ctr.yaml --config configs/bench/hstu-retrieval.yaml \\
        --ratios 1/2,1/4,1/8,1/16 --out docs/results-ml100k-hstu.md

The configs' Native runs must be trained first (``malloc train --config C``, or ``make bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from malloc.cli import main as malloc_main
from malloc.cli import parse_ratio
from malloc.config import load_config
from malloc.eval.evaluate import scheme_result_path
from malloc.heap import retain_freed_memory
from malloc.memory.registry import TRAINING_FREE, describe
from malloc.results import atomic_write_text, read_json
from malloc.runner import run_dir_for

CTR_COLUMNS = [("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "Logloss")]
RETRIEVAL_COLUMNS = [("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"), ("mrr", "MRR")]


def evaluate_point(config: str, scheme: str, ratio: str, overrides: list[str]) -> str | None:
    """Run one point through the CLI; returns None on success, else the one-line error."""
    args = ["eval", "--config", config, "--scheme", scheme, "--memory-ratio", ratio]
    for override in overrides:
        args += ["--set", override]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = malloc_main(args)
    return None if code == 0 else err.getvalue().strip().splitlines()[-1]


def table(config: str, schemes: list[str], ratios: list[str], overrides: list[str], errors: dict) -> str:
    cfg = load_config(config, overrides)
    root = run_dir_for(cfg).root
    columns = CTR_COLUMNS if cfg.task == "ctr" else RETRIEVAL_COLUMNS
    fidelity = (("logit_pearson", "logit r vs Native") if cfg.task == "ctr"
                else ("top10_overlap_mean", "top-10 overlap vs Native"))
    header = (["scheme", "target ratio", "measured ratio"] + [title for _, title in columns]
              + [fidelity[1], "MACs/request", "ms/request (batched)"])
    lines = [f"**{cfg.model.backbone.upper()}, {cfg.task}, {cfg.data.source}** (`{config}`, run `{root.name}`)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    native, notes = None, {}
    for scheme in schemes:
        for ratio in ratios:
            value = parse_ratio(ratio)
            path = scheme_result_path(root, scheme, value, {}, eval_cfg=cfg.eval)
            if not path.is_file():
                reason = errors.get((config, scheme, ratio), "not run").split("error: ")[-1]
                mark = notes.setdefault(reason, f"({len(notes) + 1})")
                lines.append(f"| {scheme} | {ratio} | not reachable {mark} | " + " | ".join("-" for _ in columns)
                             + " | - | - | - |")
                continue
            result = read_json(path)
            native = result["native"]
            metrics, meters = result["metrics"], result["meters"]
            lines.append(
                f"| {scheme} | {ratio} | {meters['memory_ratio']:.3f} | "
                + " | ".join(f"{metrics[key]:.4f}" for key, _ in columns)
                + f" | {result['fidelity'][fidelity[0]]:.4f} | {meters['macs_per_request'] / 1e6:.2f}M"
                + f" | {meters['batched_request_ms_p50']:.2f} |")
    if native is not None:
        lines.insert(4, "| native | 1 | 1.000 | " + " | ".join(f"{native['metrics'][k]:.4f}" for k, _ in columns)
                     + " | 1.0000 | | |")
    lines += [""] + [f"{mark} {reason}" for reason, mark in notes.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="run config (repeatable)")
    parser.add_argument("--ratios", default="1/2,1/4,1/8,1/16")
    parser.add_argument("--schemes", default="", help="comma-separated (default: every training-free scheme)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out", help="write the Markdown here too")
    args = parser.parse_args(argv)
    schemes = ([s for s in args.schemes.split(",") if s] or
               [info.name for info in describe() if info.family == TRAINING_FREE and info.name != "native"])
    ratios = [r for r in args.ratios.split(",") if r]
    errors: dict = {}
    for config in args.config:
        for scheme in schemes:
            for ratio in ratios:
                error = evaluate_point(config, scheme, ratio, args.overrides)
                if error:
                    errors[(config, scheme, ratio)] = error
                print(f"{config} {scheme} {ratio}: {error or 'ok'}", file=sys.stderr, flush=True)
    text = "\n\n".join(table(config, schemes, ratios, args.overrides, errors) for config in args.config) + "\n"
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    retain_freed_memory()  # as the malloc command does (malloc.heap)
    sys.exit(main())
