"""Does an adaptive allocator beat one ratio for every user at equal total bytes? Accuracy and latency of a replay
over time (``malloc serve``) against the global budget, for each allocator and base scheme.

For a trained run (``--config``, as ``malloc train`` wrote it) and each budget of ``--budgets`` (fractions of
Native's total bytes on the same replay), it replays the run's validation and test events in time order
(:func:`malloc.serve.serve`, in-process store) under:

- ``uniform``: each scheme of ``--schemes`` at the one ratio whose final total meets the budget;
- ``lru``: whole Native states, the least recently requested users dropped and recomputed on their next request;
- ``adaptive``: each scheme with per-user ratios under the budget (recompressing the user whose next step loses
  the least per byte);

plus Native with no budget (the reference, and the anchors on the same rows). Each item's AUC (retrieval: NDCG@10)
is compared with Native's on the same requests, with a paired standard error from a per-user bootstrap (200
resamples shared by every item). A uniform item whose budget is below
the entries' fixed bytes (headers, last hidden states) is recorded as unreachable and left out of the curves.

Each item is one ``malloc serve`` result under ``<out>/<item>/`` (reused if there with the same
``--max-requests`` and ``--batch``; ``--force`` reruns), with ``code.json``: the git commit of the code that ran it
(reuse does not check it: an item run before a change of the serving code is stale, and the curves list each
item's commit so that it shows). ``--shard I/N`` runs items ``I, I+N, ...`` so that processes share the sweep.
When every item is there, it writes, atomically:

- ``<out>/curves.json``: one row per item, each item's commit, and the replay's temporal locality
  (:func:`locality`: how many other users come between two requests of a user, how many users a window of
  consecutive requests holds), which is what an allocator that follows recency can exploit;
- ``<out>/curves.md``: AUC (retrieval: NDCG@10) and its paired difference to Native, one row per budget and one
  column per allocator and scheme; then every item's accuracy, bytes, counts and latency; then the locality;
- ``<out>/curves.png``: AUC, Logloss, events recomputed and bytes moved per request against the budget (NDCG@10
  and HR@10 for retrieval).

Latency is in the table, not the plot: items that run at different times on a shared machine are not comparable.

    .venv/bin/python experiments/serve_budget.py --config configs/bench/hstu-ctr.yaml \\
        --set results_dir=results --out results/serve-budget/ml100k
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from malloc.bench.sweep import git_commit
from malloc.config import load_config
from malloc.errors import MallocError
from malloc.eval.statistics import (
    RETRIEVAL_K,
    UserScores,
    bootstrap_counts,
    bootstrapped,
    ctr_user_scores,
    paired_comparison,
)
from malloc.results import atomic_file, atomic_write_json, atomic_write_text, read_json_object
from malloc.serve import ALLOCATORS, ServeError, ServeOptions, parse_fraction, serve

DEFAULT_BUDGETS = "1/2,1/4,1/8,1/16,1/32,1/64"


def items(schemes: list[str], budgets: list[str], allocators: list[str]) -> list[dict[str, Any]]:
    """The sweep's items: ``{"id", "allocator", "scheme", "budget" (text or None)}``, Native's reference first."""
    out = [{"id": "native", "allocator": "uniform", "scheme": "native", "budget": None}]
    for budget in budgets:
        tag = budget.replace("/", "over")
        if "lru" in allocators:
            out.append({"id": f"lru-native-b{tag}", "allocator": "lru", "scheme": "native", "budget": budget})
        for allocator in ("uniform", "adaptive"):
            if allocator in allocators:
                out += [{"id": f"{allocator}-{scheme}-b{tag}", "allocator": allocator, "scheme": scheme,
                         "budget": budget} for scheme in schemes]
    return out


def run_item(cfg: Any, item: dict[str, Any], out: Path, args: argparse.Namespace, code: dict[str, Any]
             ) -> dict[str, Any]:
    """The item's ``malloc serve`` result (read back when its folder holds one for the same settings, else run),
    or ``{"unreachable": why}`` for a uniform ratio that cannot meet the budget (the budget is below the entries'
    fixed bytes), also kept in the item's folder; a run item's folder gets ``code`` (the commit this process
    imported) as ``code.json``."""
    folder = out / item["id"]
    settings = {"max_requests": args.max_requests, "batch": args.batch}
    for name in ("result.json", "unreachable.json"):
        stored = None if args.force else read_json_object(folder / name)
        if stored is not None and all(stored.get(k) == v for k, v in settings.items()):
            return stored
    options = ServeOptions(scheme=item["scheme"], allocator=item["allocator"],
                           budget=None if item["budget"] is None else parse_fraction(item["budget"], "--budgets"),
                           threads=args.threads, batch=args.batch, max_requests=args.max_requests,
                           anchors=item["id"] == "native", out=str(folder))
    try:
        result = serve(cfg, options, show_progress=not args.quiet, command=" ".join(["serve_budget", item["id"]]))
        atomic_write_json(folder / "code.json", code)
        return result
    except ServeError as exc:
        if "leaves nothing for the states' layers" not in str(exc):
            raise
        unreachable = {"unreachable": " ".join(str(exc).split()), **settings}
        atomic_write_json(folder / "unreachable.json", unreachable)
        atomic_write_json(folder / "code.json", code)
        return unreachable


def row(item: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """One line of the curves: accuracy, latency, bytes and counts of an item's result."""
    metrics = result["metrics"]["all"]
    bytes_ = result["store_bytes"]
    latency = result["latency_ms"]
    return {
        **{k: item[k] for k in ("id", "allocator", "scheme", "budget")},
        "budget_fraction": None if item["budget"] is None else parse_fraction(item["budget"], "--budgets"),
        **{k: metrics.get(k) for k in ("auc", "gauc", "logloss", "ndcg@10", "hr@10")},
        "test": result["metrics"].get("test"),
        "memory_ratio": result.get("memory_ratio"),
        "peak_fraction": bytes_.get("peak_fraction"), "mean_fraction": bytes_.get("mean_fraction"),
        "final_fraction": bytes_.get("final_fraction"),
        "request_ms_mean": latency["request"]["mean"], "request_ms_p50": latency["request"]["p50"],
        "request_ms_p99": latency["request"]["p99"], "allocate_ms_p99": latency["allocate"]["p99"],
        "requests_per_second": result["requests_per_second"],
        "recomputes": result["counts"]["recomputes"], "dropped_misses": result["counts"]["misses"]["dropped"],
        "recomputed_events": result["counts"]["recomputed_events"],
        "bytes_moved_per_request": result["counts"]["bytes_moved_per_request"]["mean"],
        "recompressions": result["allocator_counts"]["recompressions"],
        "requester_cuts": result["allocator_counts"].get("requester_cuts", 0),
        "drops": result["allocator_counts"]["drops"], "not_stored": result["allocator_counts"]["not_stored"],
        "requests": result["requests"],
    }


def paired_deltas(out: Path, ids: list[str], task: str, resamples: int = 200, seed: int = 0
                  ) -> dict[str, dict[str, float]]:
    """``{item: {"delta", "se"}}``: each item's difference to Native in AUC (retrieval: NDCG@10) over the same
    requests, with its standard error from a per-user bootstrap whose resamples every item shares (paired)."""
    def load(item: str) -> dict[str, np.ndarray]:
        with np.load(out / item / "predictions.npz") as data:
            return {name: data[name] for name in data.files}

    def scores(served: dict[str, np.ndarray]) -> UserScores:
        if task == "ctr":
            return ctr_user_scores(served["user"], served["label"], served["logit"])
        order = np.argsort(served["user"], kind="stable")
        return UserScores("retrieval", ranks=served["rank"][order])

    metric = "auc" if task == "ctr" else f"ndcg@{RETRIEVAL_K}"
    native = load("native")
    base = scores(native)
    counts = bootstrap_counts(base.num_users, resamples, seed)
    reference = bootstrapped(base, counts)
    out_: dict[str, dict[str, float]] = {}
    for item in ids:
        served = load(item)
        if not (np.array_equal(served["user"], native["user"]) and np.array_equal(served["event"], native["event"])):
            raise MallocError(f"{out / item}: its requests are not Native's; rerun the sweep with --force")
        compared = paired_comparison(bootstrapped(scores(served), counts), reference)
        out_[item] = {"delta": compared["delta"][metric], "se": compared["delta_se"][metric]}
    return out_


def stack_distances(users: np.ndarray) -> np.ndarray:
    """``(repeats,)`` int64: for each request of ``users`` ``(R,)`` (in serving order) whose user was requested
    before, the number of distinct other users requested since that user's previous request (its stack distance:
    an LRU cache of ``K`` equal entries still holds the user iff it is below ``K``). A Fenwick tree marks each
    user's last position; the distance is the marks between the two requests, ``O(R log R)``."""
    size = len(users)
    tree = np.zeros(size + 1, dtype=np.int64)

    def add(position: int, value: int) -> None:
        position += 1
        while position <= size:
            tree[position] += value
            position += position & -position

    def prefix(position: int) -> int:  # marks at positions 0 .. position
        total, position = 0, position + 1
        while position > 0:
            total += int(tree[position])
            position -= position & -position
        return total

    last: dict[int, int] = {}
    distances = []
    for i, user in enumerate(users.tolist()):
        before = last.get(user)
        if before is not None:
            distances.append(prefix(i - 1) - prefix(before))
            add(before, -1)
        add(i, 1)
        last[user] = i
    return np.array(distances, dtype=np.int64)


def locality(users: np.ndarray, windows: tuple[int, ...] = (100, 1000)) -> dict[str, Any]:
    """How soon users come back in a replay of requests of ``users`` ``(R,)``, in serving order:
    ``{"requests", "users", "repeats", "stack_distance": {"p50", "p90", "p99", "max"}, "share_below": {"1", "10",
    "100"}, "window_users": {W: {"mean", "max"}}}``, with :func:`stack_distances` over the repeat requests and the
    distinct users of each block of ``W`` consecutive requests."""
    gaps = stack_distances(users)
    size = len(users)
    blocks = {str(w): [len(np.unique(users[start:start + w])) for start in range(0, size - w + 1, w)]
              for w in windows if w <= size}
    return {
        "requests": size, "users": len(np.unique(users)), "repeats": len(gaps),
        "stack_distance": {name: float(np.percentile(gaps, q)) if len(gaps) else None
                           for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "share_below": {str(k): float((gaps < k).mean()) if len(gaps) else None for k in (1, 10, 100)},
        "window_users": {w: {"mean": float(np.mean(counts)), "max": int(np.max(counts))}
                         for w, counts in blocks.items()},
    }


def locality_text(stats: dict[str, Any]) -> str:
    """:func:`locality` as Markdown lines."""
    sd, below = stats["stack_distance"], stats["share_below"]
    text = f"Locality: {stats['requests']:,} requests of {stats['users']:,} users, {stats['repeats']:,} repeats."
    if stats["repeats"]:
        text += (f" Other users between two requests of a user (stack distance): p50 {sd['p50']:.0f}, p90 "
                 f"{sd['p90']:.0f}, p99 {sd['p99']:.0f}, max {sd['max']:.0f}; none for {below['1']:.1%} of repeats, "
                 f"under 10 for {below['10']:.1%}, under 100 for {below['100']:.1%}.")
    for w, v in stats["window_users"].items():
        text += (f"\n\n{int(w):,} consecutive requests hold {v['mean']:.1f} distinct users on average (at most "
                 f"{v['max']:,}).")
    return text + "\n"


def pivot(rows: list[dict[str, Any]], task: str) -> str:
    """AUC (retrieval: NDCG@10) with its paired difference to Native and that difference's SE: one row per budget,
    one column per allocator and scheme, as a Markdown table."""
    metric = "auc" if task == "ctr" else "ndcg@10"
    lines = sorted({(r["allocator"], r["scheme"]) for r in rows if r["budget"] is not None},
                   key=lambda line: (("uniform", "lru", "adaptive").index(line[0]), line[1]))
    budgets = sorted({r["budget_fraction"] for r in rows if r["budget"] is not None}, reverse=True)
    cells = {(r["allocator"], r["scheme"], r["budget_fraction"]): r for r in rows if r["budget"] is not None}
    out = ["| budget | " + " | ".join(f"{a} {s}" for a, s in lines) + " |", "|" + "---|" * (len(lines) + 1)]
    for budget in budgets:
        text = next(r["budget"] for r in rows if r["budget_fraction"] == budget)
        line = []
        for allocator, scheme in lines:
            r = cells.get((allocator, scheme, budget))
            if r is None:
                line.append("unreachable")
                continue
            paired = r.get("paired") or {}
            delta = f" ({paired['delta']:+.4f} ± {paired['se']:.4f})" if paired else ""
            line.append(f"{r[metric]:.4f}{delta}")
        out.append(f"| {text} | " + " | ".join(line) + " |")
    return "\n".join(out) + "\n"


def table(rows: list[dict[str, Any]], task: str) -> str:
    """The curves as a Markdown table."""
    metrics = ("auc", "gauc", "logloss") if task == "ctr" else ("ndcg@10", "hr@10")
    head = ["item", "budget", *metrics, "Δ to Native (SE)", "test AUC" if task == "ctr" else "test NDCG@10",
            "ratio", "peak / Native", "mean / Native", "recomputes", "events recomputed", "recompressions",
            "requester cuts", "not stored", "bytes moved / request", "request ms mean", "p99"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        test = (r["test"] or {}).get("auc" if task == "ctr" else "ndcg@10")
        fraction = [f"{r[k]:.4f}" if r[k] is not None else "-" for k in ("peak_fraction", "mean_fraction")]
        paired = r.get("paired") or {}
        delta = f"{paired['delta']:+.4f} ({paired['se']:.4f})" if paired else "-"
        cells = [r["id"], r["budget"] or "-", *(f"{r[m]:.4f}" for m in metrics), delta,
                 f"{test:.4f}" if test is not None else "-",
                 f"{r['memory_ratio']:.4f}" if r["memory_ratio"] is not None else "-", *fraction,
                 f"{r['recomputes']:,}",
                 f"{r['recomputed_events']:,}", f"{r['recompressions']:,}", f"{r['requester_cuts']:,}",
                 f"{r['not_stored']:,}", f"{r['bytes_moved_per_request']:,.0f}",
                 f"{r['request_ms_mean']:.2f}", f"{r['request_ms_p99']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], native: dict[str, Any], anchors: dict[str, Any], task: str, path: Path) -> None:
    """Accuracy (two metrics), events recomputed and bytes moved per request against the budget; one line per
    allocator and scheme, Native and the anchors as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("auc", "logloss") if task == "ctr" else ("ndcg@10", "hr@10")
    panels = [*metrics, "recomputed_events", "bytes_moved_per_request"]
    titles = {"bytes_moved_per_request": "bytes read and written per request",
              "recomputed_events": "events recomputed from the log (all requests)"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    lines = sorted({(r["allocator"], r["scheme"]) for r in rows if r["budget"] is not None})
    for ax, key in zip(axes, panels, strict=True):
        for allocator, scheme in lines:
            points = sorted((r["budget_fraction"], r[key]) for r in rows
                            if (r["allocator"], r["scheme"]) == (allocator, scheme) and r["budget"] is not None)
            style = {"uniform": "--", "lru": ":", "adaptive": "-"}[allocator]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=3,
                    label=f"{allocator} {scheme}")
        ax.axhline(native[key], color="black", lw=0.8, label="native (no budget)")
        if key in metrics:
            for name, values in anchors.items():
                if name in ("mf", "item-mean+user-rate", "popular"):
                    ax.axhline(values[key], color="grey", lw=0.6, ls="-." if name == "mf" else ":",
                               label=f"anchor {name}")
        ax.set_xscale("log", base=2)
        if key == "bytes_moved_per_request":
            ax.set_yscale("log")
        ax.set_xlabel("budget (fraction of Native's total bytes)")
        ax.set_title(titles.get(key, key))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the trained run's config (as for malloc train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--schemes", default="random,h2o", help="base schemes (comma-separated; random,h2o)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"fractions of Native's bytes ({DEFAULT_BUDGETS})")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="comma-separated (all three)")
    parser.add_argument("--out", required=True, help="folder of the items and the curves")
    parser.add_argument("--shard", default="0/1", metavar="I/N", help="run items I, I+N, ... (0/1: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--batch", type=int, default=1, help="requests served together (1)")
    parser.add_argument("--max-requests", type=int, default=0, help="replay the first N requests (0: all)")
    parser.add_argument("--force", action="store_true", help="rerun items that have a result")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
        budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
        allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
        for budget in budgets:
            parse_fraction(budget, "--budgets")
        unknown = sorted(set(allocators) - set(ALLOCATORS))
        index, sep, count = args.shard.partition("/")
        if unknown or not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)) or not schemes:
            raise MallocError(f"expected --allocators among {', '.join(ALLOCATORS)}, --shard I/N with I < N and "
                              f"--schemes, got {args.allocators!r}, {args.shard!r}, {args.schemes!r}")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out)
        plan = items(schemes, budgets, allocators)
        code = git_commit()  # the checkout as this process imported it (it may move on while the sweep runs)
        for item in plan[int(index)::int(count)]:
            result = run_item(cfg, item, out, args, code)
            print(f"{item['id']}: " + (result["unreachable"] if "unreachable" in result else ", ".join(
                f"{k} {v:.4f}" for k, v in result["metrics"]["all"].items() if isinstance(v, float))), flush=True)
        results = {item["id"]: read_json_object(out / item["id"] / "result.json")
                   or read_json_object(out / item["id"] / "unreachable.json") for item in plan}
        if any(r is None for r in results.values()):
            print(f"{sum(r is None for r in results.values())} items left to run (other shards); the curves are "
                  "written when every item is there")
            return 0
        rows = [row(item, results[item["id"]]) for item in plan if "unreachable" not in results[item["id"]]]
        deltas = paired_deltas(out, [r["id"] for r in rows[1:]], cfg.task)
        for r in rows[1:]:
            r["paired"] = deltas[r["id"]]
        native = rows[0]
        anchors = results["native"].get("anchors", {})
        with np.load(out / "native" / "predictions.npz") as served:
            stats = locality(served["user"])
        code = {item["id"]: (read_json_object(out / item["id"] / "code.json") or {}).get("commit") for item in plan}
        curves = {"config": args.config, "overrides": args.overrides, "task": cfg.task, "rows": rows,
                  "unreachable": {k: v["unreachable"] for k, v in results.items() if "unreachable" in v},
                  "anchors": anchors, "environment": results["native"]["environment"], "locality": stats,
                  "code": code}
        text = f"{pivot(rows, cfg.task)}\n{table(rows, cfg.task)}\n{locality_text(stats)}"
        atomic_write_json(out / "curves.json", curves)
        atomic_write_text(out / "curves.md", text)
        plot(rows, native, anchors, cfg.task, out / "curves.png")
        print(text, end="")
        print(f"wrote {out / 'curves.json'}, curves.md, curves.png")
    except (MallocError, FileNotFoundError) as exc:
        print(f"serve_budget: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

