"""The default job behind ``make bench``: train and test every run config of a folder, then time requests.

For each config (by default HSTU and SASRec x CTR and retrieval on MovieLens-100K) it trains (or reuses a finished
run), reads the test metrics through the serving path, and times one request of one user (batch 1) at the data
set's median and longest history: the cached request (append 1 event + score 100 candidates from the stored
state) against the full recompute (encode the whole history again, then score). The table is printed and
written to ``<results_dir>/default-job.json`` and ``default-job.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from malloc.bench.results import atomic_write_json, atomic_write_text
from malloc.config import load_config
from malloc.configio import ConfigError
from malloc.profiling.latency import request_latency
from malloc.runner import load_trained, run

METRIC_COLUMNS = {"ctr": ("auc", "gauc", "logloss"), "retrieval": ("hr@10", "ndcg@10", "mrr")}


def run_default_job(config_dir: str | Path, force: bool = False, overrides: list[str] | None = None,
                    show_progress: bool = True) -> str:
    """Run every ``*.yaml`` in ``config_dir``; return the summary table (Markdown)."""
    files = sorted(Path(config_dir).glob("*.yaml"))
    if not files:
        raise ConfigError(f"no run configs (*.yaml) in {config_dir}")
    rows, results_dir = [], None
    for path in files:
        cfg = load_config(path, overrides or [])
        results_dir = cfg.results_dir
        result = run(cfg, force=force, show_progress=show_progress)
        model, view, _ = load_trained(cfg)
        lengths = view.sequences.lengths
        latency = [request_latency(model, history_len=int(n), candidates=100, append_events=1,
                                   prefill_chunk=cfg.eval.prefill_chunk)
                   for n in (np.median(lengths), lengths.max())]
        rows.append({"config": str(path), "run_id": result["run_id"], "backbone": cfg.model.backbone,
                     "task": cfg.task, "metrics": result["metrics"], "meters": result["meters"],
                     "latency": latency})
    table = format_table(rows)
    atomic_write_json(Path(results_dir) / "default-job.json", rows)
    atomic_write_text(Path(results_dir) / "default-job.md", table + "\n")
    return table


def format_table(rows: list[dict]) -> str:
    """One line per run: test metrics, stored bytes, and request latency (p50 ms, cached / recompute)."""
    median, longest = rows[0]["latency"][0]["history_len"], rows[0]["latency"][1]["history_len"]
    header = (f"| model | task | test metrics (serving path) | stored KiB/user | request ms @ n={median} "
              f"(cached / recompute) | request ms @ n={longest} (cached / recompute) |")
    lines = [header, "|" + "---|" * 6]
    for row in rows:
        metrics = ", ".join(f"{k.upper()} {row['metrics'][k]:.4f}" for k in METRIC_COLUMNS[row["task"]])
        cells = [f"{p['cached_ms_p50']:.1f} / {p['recompute_ms_p50']:.1f} ({p['speedup_p50']:.1f}x)"
                 for p in row["latency"]]
        lines.append(f"| {row['backbone']} | {row['task']} | {metrics} | "
                     f"{row['meters']['state_bytes_mean'] / 1024:.1f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
