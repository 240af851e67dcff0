"""``malloc report``: the benchmark report, built from a suite's results files only.

Input: one or more suite results folders (``<results>/<suite>/``: ``suite.json`` and ``items/*.json``, written
by :mod:`malloc.bench.sweep`). Folders that hold the same suite and plan (the shards of ``malloc bench --shard I/N``
written on different machines, each to its own folder) are merged into one suite: each planned item is read from the
folder where it is done (where several are, the last finished; else failed, unreadable, then missing), and the
provenance names every folder, its command, machine and commit. Output (``<out>/``, default
``<first folder>/report/``): ``index.md``, ``index.html`` (one self-contained file, plots embedded) and the plots
as PNG files. Contents, per suite:

- how it was made: the bench command, machine, library versions, git commit, training budget;
- per (data set, backbone, task): the accuracy table (mean and standard deviation over seeds; the delta of the
  primary metric to Native and the two-sided Wilcoxon signed-rank p-value over users, :mod:`malloc.eval.statistics`),
  the resource table (bytes per user, measured memory ratio, MACs per request, latency, training time), and two
  Pareto plots: the primary metric (CTR: GAUC; retrieval: NDCG@10) against the measured memory ratio and against
  MACs per request, the non-dominated arms marked and listed;
- items that failed or are not reachable, with their error;
- the complexity table of every registered scheme (:mod:`malloc.bench.complexity`).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from malloc.bench.complexity import complexity_rows
from malloc.bench.pareto import pareto_front
from malloc.bench.sweep import read_suite
from malloc.errors import ResultsError
from malloc.eval.statistics import mean_std, seed_mean_delta, wilcoxon_signed_rank
from malloc.memory.registry import REGISTRY, Registry
from malloc.results import atomic_file, atomic_write_text, check_writable

log = logging.getLogger("malloc.report")

METRICS = {"ctr": ("auc", "gauc", "logloss"), "retrieval": ("hr@10", "ndcg@10", "mrr")}
PRIMARY = {"ctr": "gauc", "retrieval": "ndcg@10"}
FIDELITY = {"ctr": ("logit_pearson", "logit r"), "retrieval": ("top10_overlap_mean", "top-10 overlap")}


# -- blocks: one document, rendered as Markdown and as HTML ------------------------------------------------------
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path  # the PNG file, inside the output folder
    alt: str


@dataclass
class Bullets:
    items: list[str]


Block = Heading | Para | Table | Image | Bullets


def _md(blocks: Sequence[Block], image_root: Path) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Table):
            out.append("\n".join(["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
                                 + ["| " + " | ".join(row) + " |" for row in block.rows]))
        elif isinstance(block, Image):
            out.append(f"![{block.alt}]({_relative(block.path, image_root)})")
        else:
            out.append("\n".join(f"- {item}" for item in block.items))
    return "\n\n".join(out) + "\n"


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def _inline(text: str) -> str:
    """Markdown's ``code`` and **bold** in HTML (the only inline markup the report writes)."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


_CSS = ("body{font-family:system-ui,sans-serif;max-width:80rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0;font-size:.85rem}th,td{border:1px solid #ccc;"
        "padding:.25rem .5rem;text-align:left}th{background:#f3f3f3}img{max-width:48%;margin:.5rem 1% 0 0}"
        "code{background:#f5f5f5;padding:0 .2rem}")


def _html(blocks: Sequence[Block], title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            out.append(f"<img alt='{html.escape(block.alt)}' src='data:image/png;base64,{data}'>")
        else:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
    return "\n".join([*out, "</body></html>"]) + "\n"


# -- numbers ----------------------------------------------------------------------------------------------------
def ratio_text(ratio: float) -> str:
    """``0.25`` -> ``1/4``; other values as ``%g``."""
    frac = Fraction(ratio).limit_denominator(1024)
    if frac.numerator == 1 and abs(float(frac) - ratio) < 1e-9:
        return f"1/{frac.denominator}" if frac.denominator > 1 else "1"
    return f"{ratio:g}"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _si(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


@dataclass
class Arm:
    """One (scheme, target ratios) of a setting group, over its seeds: the records, done and failed."""

    label: str
    family: str
    targets: tuple[float, ...]
    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.family == "reference":
            return self.label
        return f"{self.label} {', '.join(ratio_text(r) for r in self.targets)}"

    def metric(self, key: str, source: str = "metrics") -> tuple[float, float]:
        return mean_std([r[source].get(key) for r in self.done])

    def meter(self, key: str) -> float:
        return mean_std([r["meters"].get(key) for r in self.done])[0]

    def paired(self) -> dict[str, Any] | None:
        pairs = [(r["per_user"]["users"], r["per_user"]["delta"]) for r in self.done if r.get("per_user")]
        if not pairs:
            return None
        return wilcoxon_signed_rank(seed_mean_delta(pairs))


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[tuple, Arm]]:
    """(data set, backbone, task) -> (label, targets) -> arm, in the records' (planned) order."""
    groups: dict[tuple[str, str, str], dict[tuple, Arm]] = {}
    for record in records:
        key = (record["dataset"], record["backbone"], record["task"])
        targets = tuple(record["memory_ratio_targets"])
        arm = groups.setdefault(key, {}).setdefault(
            (record["label"], targets), Arm(record["label"], record["family"], targets))
        (arm.done if record["status"] == "done" else arm.failed).append(record)
    return groups


# -- sections ---------------------------------------------------------------------------------------------------
def _commit_label(git: dict[str, Any] | None) -> str:
    if not git or not git.get("commit"):
        return "not recorded"
    return f"`{git['commit'][:12]}`" + (" (with uncommitted changes)" if git.get("dirty") else "")


@dataclass
class Part:
    """One folder of a suite: its manifest and how many of the report's records it gave."""

    folder: Path
    manifest: dict[str, Any]
    records: int = 0


_STATUS_RANK = {"done": 3, "failed": 2, "unreadable": 1, "missing": 0}


def read_merged(folders: Sequence[Path]) -> tuple[list[Part], list[dict[str, Any]]]:
    """The parts and the merged records of folders that hold one suite (:func:`suite_folders`): per planned item,
    the record where it is done (the last finished where several are), else failed, unreadable, then missing."""
    read = [(Path(folder), *read_suite(folder)) for folder in folders]
    parts = [Part(folder, manifest) for folder, manifest, _ in read]
    merged = []
    for index in range(len(read[0][2])):
        candidates = [(_STATUS_RANK.get(records[index]["status"], 0), str(records[index].get("finished_at", "")),
                       -position, position) for position, (_, _, records) in enumerate(read)]
        *_, position = max(candidates)
        merged.append(read[position][2][index])
        if read[position][2][index]["status"] != "missing":
            parts[position].records += 1
    return parts, merged


def suite_folders(folders: Sequence[str | Path]) -> list[list[Path]]:
    """``folders`` grouped by the suite they hold: folders whose manifests plan the same suite (the same spec but
    for ``--device``, and the same items, as the shards of one ``malloc bench`` do) form one group, in the order of
    their first folder; folders of the same suite name with different plans stay apart (a warning says so)."""
    groups: dict[str, list[Path]] = {}
    names: dict[str, str] = {}
    for folder in folders:
        manifest, _ = read_suite(folder)
        spec = {**manifest["suite"], "base": {k: v for k, v in (manifest["suite"].get("base") or {}).items()
                                              if k != "device"}}  # where a shard computed: not part of the plan
        plan = json.dumps({"suite": spec, "items": manifest["items"]}, sort_keys=True, default=str)
        name = manifest["suite"].get("name", "")
        if plan not in groups and name in names.values():
            log.warning("%s holds suite %s with another plan than an earlier folder; reported apart", folder, name)
        groups.setdefault(plan, []).append(Path(folder))
        names[plan] = name
    return list(groups.values())


def _provenance(parts: list[Part], records: list[dict[str, Any]]) -> list[Block]:
    """How the suite was made (by every folder it was merged from); where its items ran at other commits than the
    last invocation (a suite resumed across commits, or shards at different commits), how many ran at each."""
    manifest = parts[0].manifest
    env, git, suite = manifest["environment"], manifest["git"], manifest["suite"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    commit = git.get("commit") or "unknown"
    by_commit = Counter(_commit_label(record.get("git")) for record in records if record["status"] != "missing")
    train = suite.get("base", {}).get("train", {})
    budget = ", ".join(f"{k} {v}" for k, v in train.items()) or "the run configs' defaults"
    axes = "; ".join(f"{axis} {label}: `{cfg}`" for axis in ("backbones", "tasks")
                     for label, cfg in suite.get(axis, {}).items() if cfg)
    if len(parts) == 1:
        where = [f"**Command**: `{manifest['command']}` (started {manifest['started_at']}; results in "
                 f"`{parts[0].folder}`)"]
    else:
        where = [f"**Merged from {len(parts)} folders** (the same suite and plan: shards run apart): " + "; ".join(
            f"`{part.folder}`: `{part.manifest['command']}` (started {part.manifest['started_at']}) on "
            f"{part.manifest['environment']['cpu']}, commit {_commit_label(part.manifest['git'])}, "
            f"{part.records} items" for part in parts)]
    lines = [*where,
             f"**Machine**: {env['cpu']} ({env['cpu_count']} CPUs), {env['platform']}, "
             f"{env['threads']} torch threads" + (f", GPU {env['cuda']}" if env.get("cuda") else "")
             + (f" (the first folder's; {len(parts)} folders)" if len(parts) > 1 else ""),
             f"**Versions**: {versions}",
             f"**Git commit**: `{commit}`" + (" (with uncommitted changes)" if git.get("dirty") else ""),
             f"**Training budget** (every run of the suite): {budget}; per-axis settings: {axes or 'none'}",
             f"**Seeds**: {', '.join(str(s) for s in suite['seeds'])}; **latency**: batch 1, "
             f"{suite['latency']['users']} test users x {suite['latency']['repeats']} requests after "
             f"{suite['latency']['warmup']} warm-up requests"]
    if set(by_commit) - {_commit_label(git)} and set(by_commit) != {_commit_label(None)}:  # none: an old suite
        lines.append("**Items by the commit they ran at**: " + ", ".join(
            f"{label} {count}" for label, count in by_commit.most_common()))
    if manifest.get("skipped_datasets"):
        lines.append(f"**Data sets left out** (no path given): {', '.join(manifest['skipped_datasets'])}")
    return [Bullets(lines)]


def _anchors(arms: list[Arm]) -> dict[str, list[dict[str, float]]]:
    """``{anchor: [metrics of each seed]}`` from the Native records of a group (:mod:`malloc.eval.anchors`)."""
    found: dict[str, list[dict[str, float]]] = {}
    for arm in arms:
        if arm.family != "reference":
            continue
        for record in arm.done:
            for name, metrics in (record.get("anchors") or {}).items():
                if isinstance(metrics, dict):
                    found.setdefault(name, []).append(metrics)
    return found


def _accuracy(task: str, arms: list[Arm], anchors: dict[str, list[dict[str, float]]]) -> Table:
    metrics, primary, (fid_key, fid_title) = METRICS[task], PRIMARY[task], FIDELITY[task]
    header = ["scheme", "family", "target ratio", "measured ratio", *(m.upper() for m in metrics),
              f"delta {primary.upper()} vs Native", "p (Wilcoxon, users)", f"{fid_title} vs Native", "seeds"]
    rows = []
    native = next((arm.metric(primary)[0] for arm in arms if arm.family == "reference" and arm.done), math.nan)
    for name, seeds in anchors.items():  # the floors: no sequence model, the same rows and protocol
        cells = []
        for key in metrics:
            mean, std = mean_std([s.get(key) for s in seeds])
            cells.append(_num(mean) + (f" ± {_num(std)}" if len(seeds) > 1 else ""))
        mean, _ = mean_std([s.get(primary) for s in seeds])
        rows.append([f"*{name}*", "anchor", "-", "-", *cells,
                     f"{mean - native:+.4f}" if _finite(mean, native) else "-", "-", "-", str(len(seeds))])
    for arm in arms:
        if not arm.done:
            continue
        cells = []
        for key in metrics:
            mean, std = arm.metric(key)
            cells.append(_num(mean) + (f" ± {_num(std)}" if len(arm.done) > 1 else ""))
        mean, _ = arm.metric(primary)
        native, _ = arm.metric(primary, "native_metrics")
        paired = arm.paired()
        rows.append([arm.label, arm.family, ", ".join(ratio_text(r) for r in arm.targets),
                     _num(arm.meter("memory_ratio"), 3), *cells,
                     "-" if arm.family == "reference" else f"{mean - native:+.4f}",
                     "-" if paired is None else _num(paired["p_value"], 3),
                     "-" if arm.family == "reference" else _num(arm.metric(fid_key, "fidelity")[0]),
                     str(len(arm.done))])
    return Table(header, rows)


def _resources(arms: list[Arm]) -> Table:
    header = ["scheme", "target ratio", "measured ratio", "KiB/user mean", "KiB/user p50", "KiB/user p99",
              "MACs/request", "Native MACs", "recompute MACs", "request ms p50", "request ms p99",
              "batched ms/request p50", "threads", "train s/epoch"]
    rows = []
    for arm in arms:
        if not arm.done:
            continue
        kib = [arm.meter(k) / 1024 for k in ("state_bytes_mean", "state_bytes_p50", "state_bytes_p99")]
        rows.append([arm.label, ", ".join(ratio_text(r) for r in arm.targets), _num(arm.meter("memory_ratio"), 3),
                     *(_num(v, 1) for v in kib), _si(arm.meter("macs_per_request")),
                     _si(arm.meter("native_macs_per_request")), _si(arm.meter("recompute_macs_per_request")),
                     _num(arm.meter("request_ms_p50"), 2), _num(arm.meter("request_ms_p99"), 2),
                     _num(arm.meter("batched_request_ms_p50"), 2),
                     str(arm.done[0]["meters"].get("request_threads", arm.done[0]["meters"].get("threads", "-"))),
                     _num(arm.meter("train_seconds_per_epoch"), 1)])
    return Table(header, rows)


def _failures(arms: list[Arm]) -> Bullets | None:
    lines = [f"{arm.name} (seed {r['seed']}): {r['status']}" + (f": {r['error']['type']}: {r['error']['message']}"
                                                              if "error" in r else "")
             for arm in arms for r in arm.failed]
    return Bullets(lines) if lines else None


def _pareto(arms: list[Arm], task: str, cost: str) -> tuple[list[tuple[Arm, float, float]], list[int]]:
    points = [(arm, arm.meter(cost), arm.metric(PRIMARY[task])[0]) for arm in arms if arm.done]
    return points, pareto_front([(c, a) for _, c, a in points])


def _plot(points: list[tuple[Arm, float, float]], front: list[int], xlabel: str, ylabel: str, title: str,
          path: Path, memory: bool, anchors: dict[str, float] | None = None) -> None:
    """A scatter of ``(cost, accuracy)`` per arm, coloured by family, the front joined; log-scaled cost axis;
    each anchor (no sequence model, no stored state) a dashed horizontal line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    families = {"reference": ("black", "s"), "training-free": ("tab:blue", "o"), "trained-in": ("tab:orange", "^")}
    for family, (color, marker) in families.items():
        xs = [c for arm, c, a in points if arm.family == family and _finite(c, a)]
        ys = [a for arm, c, a in points if arm.family == family and _finite(c, a)]
        if xs:
            axes.scatter(xs, ys, c=color, marker=marker, label=family, zorder=3)
    for arm, c, a in points:
        if _finite(c, a):
            axes.annotate(arm.name, (c, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for index, (name, value) in enumerate((anchors or {}).items()):
        if _finite(value):
            axes.axhline(value, color="grey", linestyle=(0, (4, 2 + 2 * index)), linewidth=1, zorder=1)
            axes.annotate(f"{name} (anchor)", (0.01, value), xycoords=("axes fraction", "data"), fontsize=6,
                          color="dimgrey", xytext=(0, 2), textcoords="offset points")
    if front:
        fx, fy = [points[i][1] for i in front], [points[i][2] for i in front]
        axes.plot(fx, fy, color="tab:red", linewidth=1, zorder=2, label="Pareto front")
        axes.scatter(fx, fy, s=120, facecolors="none", edgecolors="tab:red", zorder=4)
    axes.set_xscale("log", base=2 if memory else 10)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: ratio_text(x) if memory else _si(x)))
    # MACs often span less than a decade: label the minor ticks too
    axes.xaxis.set_minor_formatter(NullFormatter() if memory else FuncFormatter(lambda x, _: _si(x)))
    axes.tick_params(axis="x", which="minor", labelsize=6)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png")


def _finite(*values: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _complexity(registry: Registry = REGISTRY) -> list[Block]:
    rows = [[name, granularity, family, f"`{f.state}`", f"`{f.request}`", f.knob] if f is not None
            else [name, granularity, family, "(missing)", "(missing)", "-"]
            for name, granularity, family, f in complexity_rows(registry)]
    return [Heading("Complexity of every registered scheme", 2),
            Para("n events in the history, t new events per request, c candidates, L layers, d attention width "
                 "(H heads of d_h), b bytes per stored element; stored state in bytes per user (positions and "
                 "timestamps, 12 bytes per stored event and layer, left out), per-request cost in multiply-adds "
                 "(projection constants left out). Source: `src/malloc/bench/complexity.py`."),
            Table(["scheme", "granularity", "family", "stored state", "per-request cost", "ratio knob"], rows)]


def suite_blocks(folders: Sequence[Path], out: Path) -> tuple[list[Block], list[str]]:
    """The blocks of one suite, read from its folders (:func:`read_merged`), and the arms on a Pareto front (one
    line per plot)."""
    parts, records = read_merged(folders)
    manifest = parts[0].manifest
    name = manifest["suite"]["name"]
    blocks: list[Block] = [Heading(f"Suite `{name}`", 2), Para(manifest["suite"].get("description") or ""),
                           *_provenance(parts, records)]
    fronts = []
    for (dataset, backbone, task), by_arm in _groups(records).items():
        arms = list(by_arm.values())
        anchors = _anchors(arms)
        title = f"{backbone.upper()}, {task}, {dataset}"
        blocks += [Heading(title, 3), Para(f"Accuracy on the test split through the serving path (primary "
                                           f"metric {PRIMARY[task].upper()}; the p-value tests the per-user "
                                           f"{'AUC' if task == 'ctr' else 'NDCG@10'} deltas to Native, averaged "
                                           "over seeds). Rows in italics are anchors: scores with no sequence "
                                           "model and no stored state, on the same rows (`malloc.eval.anchors`); "
                                           "a scheme below them has lost what the history adds."),
                   _accuracy(task, arms, anchors), Para("Resources (KiB/user: the whole stored state at the end of the "
                                               "replay; request ms: batch 1, append 1 event + read)."),
                   _resources(arms)]
        failures = _failures(arms)
        if failures is not None:
            blocks += [Para("Not run, not reachable or failed:"), failures]
        group_fronts = []
        for cost, xlabel in (("memory_ratio", "measured memory ratio (stored bytes / Native's)"),
                             ("macs_per_request", "MACs per request")):
            points, front = _pareto(arms, task, cost)
            if not points:
                continue
            stem = f"pareto-{name}-{dataset}-{backbone}-{task}-{'memory' if cost == 'memory_ratio' else 'macs'}"
            path = out / f"{stem}.png"
            floors = {anchor: mean_std([s.get(PRIMARY[task]) for s in seeds])[0] for anchor, seeds in anchors.items()}
            _plot(points, front, xlabel, PRIMARY[task].upper(), f"{name}: {title}", path, cost == "memory_ratio",
                  floors)
            names = [points[i][0].name for i in front]
            blocks += [Image(path, f"{title}: {PRIMARY[task].upper()} against {xlabel}")]
            group_fronts.append((xlabel, ", ".join(names) or "none"))
            fronts.append(f"`{name}` {title}, {PRIMARY[task].upper()} vs {xlabel}: {', '.join(names) or 'none'}")
        if group_fronts:
            blocks.append(Bullets([f"**Pareto front** against {x}: {names}" for x, names in group_fronts]))
    return blocks, fronts


def build_report(folders: Sequence[str | Path], out: str | Path | None = None, markdown: str | Path | None = None,
                 command: str | None = None, registry: Registry = REGISTRY) -> Path:
    """Write ``index.md``, ``index.html`` and the PNG plots to ``out`` (default ``<folders[0]>/report``).

    Args:
        folders: suite results folders (``<results>/<suite>``); those of one suite and plan are merged
            (:func:`suite_folders`).
        markdown: also write the Markdown to this file, image links relative to it (e.g. ``docs/RESULTS.md``).
            If the file exists and holds the lines :data:`BEGIN` and :data:`END`, only the text between them is
            replaced, so hand-written sections around the generated report survive a regeneration.
        command: the report command to record.
        registry: the schemes of the complexity table (the package's by default).
    Returns:
        The ``index.html`` path.
    """
    if not folders:
        raise ResultsError("malloc report needs at least one suite results folder")
    out_dir = Path(out) if out is not None else Path(folders[0]) / "report"
    check_writable(out_dir)
    if markdown is not None:
        if Path(markdown).is_dir():
            raise ResultsError(f"{markdown}: is a folder; --markdown takes a file (e.g. docs/RESULTS.md)")
        check_writable(Path(markdown).parent)
    blocks: list[Block] = [Heading("MALLOC benchmark report", 1),
                           Para("Every number is read from the results files of the suites below (written by "
                                "`malloc bench`); accuracy is read from stored states through the serving path, "
                                "against Native on the same users." + (f" Report command: `{command}`." if command
                                                                        else ""))]
    all_fronts = []
    for group in suite_folders(folders):
        suite, fronts = suite_blocks(group, out_dir)
        blocks += suite
        all_fronts += fronts
    blocks += _complexity(registry)
    if all_fronts:
        blocks[2:2] = [Heading("Pareto fronts", 2), Bullets(all_fronts)]
    atomic_write_text(out_dir / "index.md", _md(blocks, out_dir))
    atomic_write_text(out_dir / "index.html", _html(blocks, "MALLOC benchmark report"))
    if markdown is not None:
        atomic_write_text(markdown, splice(Path(markdown), _md(blocks, Path(markdown).parent)))
    return out_dir / "index.html"


BEGIN = "<!-- BEGIN malloc report: generated by `malloc report --markdown`; edits between these lines are lost -->"
END = "<!-- END malloc report -->"


def splice(path: Path, generated: str) -> str:
    """``path``'s text with the part between :data:`BEGIN` and :data:`END` replaced by ``generated`` (the whole
    text is ``generated`` when the file or either marker is missing)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    head, begin, rest = text.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END + "\n")
    if not (begin and end):
        return generated
    return f"{head}{BEGIN}\n{generated.rstrip()}\n{END}\n{tail}"
