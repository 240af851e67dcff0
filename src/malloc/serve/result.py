"""A replay's result: accuracy of the replayed predictions (and of the anchors on the same rows), latency per
stage, throughput, store bytes and counts, as one JSON object and a printed table.

Accuracy. CTR: AUC, GAUC and Logloss over every replayed row, and over the validation and test rows apart (the
model chose its epoch on validation rows, so the test rows are the unbiased ones); the protocol is ``feedback``
(each event's label is appended before the user's next request; GAUC carries that protocol's bias, see
:mod:`malloc.eval.replay`). Retrieval: HR@K, NDCG@K and MRR over the replayed targets.

Anchors (:mod:`malloc.eval.anchors`), scored on the same rows: CTR ``item-mean``, ``item-mean+user-rate`` (under
``feedback``: the user's rate over every event before the row, as the served state holds) and ``mf``; retrieval
``popular`` and ``mf``. Each is fitted on the training rows only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from malloc.data.tasks import CTRView, RetrievalView
from malloc.eval.anchors import ctr_anchor_logits, fit_ctr_mf, fit_retrieval_mf, retrieval_anchor_ranks
from malloc.eval.metrics import ctr_metrics, retrieval_metrics
from malloc.serve.meters import STAGES, RequestMeters, latency_table, summary
from malloc.serve.requests import SPLIT_CODES, Requests


def accuracy(view: CTRView | RetrievalView, requests: Requests, logits: np.ndarray, ranks: np.ndarray,
             ks: tuple[int, ...]) -> dict[str, Any]:
    """``{"all", "valid", "test": metrics}`` of the replayed predictions (a split without requests is left out)."""
    masks = {"all": np.ones(len(requests), dtype=bool), **{name: requests.split == code
                                                             for name, code in SPLIT_CODES.items()}}
    out: dict[str, Any] = {}
    for name, mask in masks.items():
        if not mask.any():
            continue
        if isinstance(view, CTRView):
            out[name] = {**ctr_metrics(requests.user[mask], requests.label[mask], logits[mask]),
                         "rows": int(mask.sum())}
        else:
            out[name] = {**retrieval_metrics(ranks[mask], ks), "requests": int(mask.sum())}
    return out


def anchors(view: CTRView | RetrievalView, requests: Requests, ks: tuple[int, ...], mask_history: bool,
            seed: int) -> dict[str, dict[str, float]]:
    """``{anchor: metrics over every replayed request}`` (module docstring)."""
    if isinstance(view, CTRView):
        factors = fit_ctr_mf(view, seed)
        logits: dict[str, np.ndarray] = {}
        for name, code in SPLIT_CODES.items():
            mask = requests.split == code
            for anchor, values in ctr_anchor_logits(view, name, "feedback", seed, factors).items():
                logits.setdefault(anchor, np.zeros(len(requests)))[mask] = values[requests.row[mask]]
        return {anchor: ctr_metrics(requests.user, requests.label, values) for anchor, values in logits.items()}
    factors = fit_retrieval_mf(view, seed, mask_history=mask_history)
    ranks: dict[str, np.ndarray] = {}
    for name, code in SPLIT_CODES.items():
        mask = requests.split == code
        for anchor, values in retrieval_anchor_ranks(view, name, mask_history, seed, factors).items():
            ranks.setdefault(anchor, np.ones(len(requests), dtype=np.int64))[mask] = values[requests.row[mask]]
    return {anchor: retrieval_metrics(values, ks) for anchor, values in ranks.items()}


def store_bytes(sizes: np.ndarray, requests: Requests, peak: int, mean: float, final: int,
                native: np.ndarray | None) -> dict[str, Any]:
    """Bytes of the store: at the end (the store's count and per stored user), the peak and mean over requests,
    and Native's total on the same replay (``native``: ``(U,)`` entry bytes, None where not computed)."""
    stored = sizes[sizes > 0].astype(np.float64)
    served_users = len(np.unique(requests.user))
    out: dict[str, Any] = {
        "final": final, "peak": peak, "mean_over_requests": mean,
        "users_served": served_users, "users_stored": len(stored),
        "per_user_mean": float(stored.mean()) if len(stored) else 0.0,
        "per_user_p50": float(np.percentile(stored, 50)) if len(stored) else 0.0,
        "per_user_p99": float(np.percentile(stored, 99)) if len(stored) else 0.0,
    }
    if native is not None:
        total = int(native.sum())
        out.update(native_total=total, final_fraction=final / total if total else float("nan"),
                   peak_fraction=peak / total if total else float("nan"),
                   mean_fraction=mean / total if total else float("nan"))
    return out


def meters_result(meters: RequestMeters, seconds: float) -> dict[str, Any]:
    """Latency per stage, requests per second and the counts of :func:`~malloc.serve.meters.summary`."""
    counts = summary(meters)
    return {"latency_ms": latency_table(meters), "requests_per_second": counts["requests"] / seconds if seconds else
            float("nan"), "counts": counts}


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: accuracy (with anchors), latency per stage, throughput, bytes and counts."""
    lines = [f"{result['run_id']}: malloc serve, {result['task']} on {result['data']}, {result['requests']:,} "
             f"requests ({result['protocol']}), scheme {result['scheme']}, allocator {result['allocator']}"
             + (f", budget {result['budget']:g} of Native" if result.get("budget") else "")
             + f", store {result['store']}, {result['workers']} worker(s)"]
    metrics = result["metrics"]
    names = [k for k in metrics["all"] if k not in ("rows", "requests")]
    lines.append("")
    lines.append(f"  {'accuracy':<24}" + "".join(f"{n:>10}" for n in names))
    for split, values in metrics.items():
        lines.append(f"  {'replay ' + split:<24}" + "".join(f"{values[n]:>10.4f}" for n in names))
    for anchor, values in result.get("anchors", {}).items():
        lines.append(f"  {'anchor ' + anchor:<24}" + "".join(f"{values.get(n, float('nan')):>10.4f}" for n in names))
    lines.append("")
    lines.append(f"  {'latency ms':<24}{'n':>10}{'mean':>10}{'p50':>10}{'p99':>10}{'p99.9':>10}")
    for stage in ("request", *STAGES):
        row = result["latency_ms"][stage]
        if row["n"]:
            lines.append(f"  {stage:<24}{row['n']:>10,}{row['mean']:>10.3f}{row['p50']:>10.3f}{row['p99']:>10.3f}"
                         f"{row['p999']:>10.3f}")
    counts, bytes_ = result["counts"], result["store_bytes"]
    lines.append("")
    lines.append(f"  requests/s {result['requests_per_second']:,.1f}; hits {counts['hits']:,}, recomputes "
                 f"{counts['recomputes']:,} ({', '.join(f'{k} {v:,}' for k, v in counts['misses'].items() if v)}), "
                 f"{counts['recomputed_events']:,} events recomputed; recompressions "
                 f"{result['allocator_counts']['recompressions']:,}, requester cuts "
                 f"{result['allocator_counts']['requester_cuts']:,}, drops {result['allocator_counts']['drops']:,}")
    line = (f"  store bytes: final {bytes_['final']:,}, peak {bytes_['peak']:,}, per stored user "
            f"{bytes_['per_user_mean']:,.0f} mean; moved per request "
            f"{counts['bytes_moved_per_request']['mean']:,.0f} mean")
    if "native_total" in bytes_:
        line += (f"; Native's total {bytes_['native_total']:,} (peak {bytes_['peak_fraction']:.4f} of it"
                 + (f", budget {result['budget_bytes']:,}" if result.get("budget_bytes") else "") + ")")
    lines.append(line)
    hot = result.get("hot_tier")
    if hot:
        lines.append(f"  hot tier: {hot['bytes']:,} bytes per worker; {hot['hits']:,} entries read from memory, "
                     f"{hot['misses']:,} from the store")
    return "\n".join(lines) + "\n"


__all__ = ["accuracy", "anchors", "format_table", "meters_result", "store_bytes"]
