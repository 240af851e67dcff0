"""The default job behind ``make bench``: train and test every run config of a folder, then time requests.

For each config (by default HSTU and SASRec x CTR and retrieval on MovieLens-100K) it trains (or reuses a finished
run), reads the test metrics through the serving path, and times one request of one user at the data set's
median history length: the cached request (append 1 event + score 100 candidates from the stored state) against
the full recompute (encode the whole history again, then score). The table is printed and written to
``<results_dir>/default-job.json`` and ``default-job.md``.
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
        history_len = int(np.median(view.sequences.lengths))
        latency = request_latency(model, history_len=history_len, candidates=100, append_events=1,
                                  prefill_chunk=cfg.eval.prefill_chunk)
        rows.append({"config": str(path), "run_id": result["run_id"], "backbone": cfg.model.backbone,
                     "task": cfg.task, "metrics": result["metrics"], "meters": result["meters"],
                     "latency": latency})
    table = format_table(rows)
    atomic_write_json(Path(results_dir) / "default-job.json", rows)
    atomic_write_text(Path(results_dir) / "default-job.md", table + "\n")
    return table


def format_table(rows: list[dict]) -> str:
    header = ("| model | task | metrics (test, serving path) | stored KiB/user (mean) | "
              "cached request ms (p50) | recompute ms (p50) | speed-up | history |")
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        metrics = ", ".join(f"{k.upper()} {row['metrics'][k]:.4f}" for k in METRIC_COLUMNS[row["task"]])
        lat = row["latency"]
        lines.append(
            f"| {row['backbone']} | {row['task']} | {metrics} | {row['meters']['state_bytes_mean'] / 1024:.1f} | "
            f"{lat['cached_ms_p50']:.2f} | {lat['recompute_ms_p50']:.2f} | {lat['speedup_p50']:.1f}x | "
            f"{lat['history_len']} |")
    return "\n".join(lines)
