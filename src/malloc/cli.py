"""The ``malloc`` command: train, eval, bench, data, methods, sensitivity, serve.

Every command takes ``--config FILE`` (YAML under ``configs/``) and any number of ``--set key.sub=value``
overrides. User errors (bad config key, bad data file, missing or refused checkpoint, unusable results folder, unknown
scheme or knob: :class:`~malloc.errors.MallocError`) print one line and exit with status 2; an interruption (Ctrl-C)
prints one line and exits with status 130, and the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from malloc.configio import ConfigError
from malloc.errors import MallocError

log = logging.getLogger("malloc")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.layers=4 (repeatable)")


def _load(args: argparse.Namespace):
    from malloc.config import load_config

    return load_config(args.config, args.overrides)


def _print_metrics(title: str, metrics: dict, meters: dict | None = None) -> None:
    print(title)
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:<28} {value:.4f}")
        elif isinstance(value, int):
            print(f"  {key:<28} {value}")
    for key, value in (meters or {}).items():
        if isinstance(value, (int, float)):
            print(f"  {key:<28} {value:,.2f}" if isinstance(value, float) else f"  {key:<28} {value:,}")


def cmd_train(args: argparse.Namespace) -> int:
    from malloc.distributed import launch_from_environment
    from malloc.runner import run

    cfg = _with_scheme(_load(args), args)
    result = run(cfg, force=args.force, show_progress=not args.quiet)
    launch = launch_from_environment()
    if launch is None or launch.rank == 0:  # under torchrun every rank has the result; one prints it
        _print_metrics(f"{result['run_id']}: test ({cfg.task})", result["metrics"], result["meters"])
    return 0


def _with_scheme(cfg, args: argparse.Namespace):
    """``--scheme/--memory-ratio/--knob`` of ``malloc train``: a trained-in scheme for the model (checked before
    any work); the run is named ``<name>-<scheme>``."""
    from dataclasses import replace

    from malloc.memory.policy import SchemeError
    from malloc.memory.registry import build_architecture

    if args.scheme is None:
        if args.memory_ratio is not None or args.knobs:
            raise SchemeError("--memory-ratio and --knob need --scheme NAME (see `malloc methods`)")
        return cfg
    ratio = parse_ratio(args.memory_ratio) if args.memory_ratio is not None else 1.0
    if not 0.0 < ratio <= 1.0:
        raise SchemeError(f"{args.scheme}: --memory-ratio must be in (0, 1], got {ratio:g}")
    model = replace(cfg.model, scheme=args.scheme, memory_ratio=ratio, knobs=parse_knobs(args.knobs))
    build_architecture(model)
    return replace(cfg, name=f"{cfg.name}-{args.scheme}" if args.scheme != "native" else cfg.name, model=model)


def parse_knobs(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=v", "inner_knobs.window=8"]`` -> ``{"k": v, "inner_knobs": {"window": 8}}`` (values read as YAML)."""
    from malloc.configio import parse_yaml
    from malloc.memory.policy import SchemeError

    knobs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise SchemeError(f"--knob expects KEY=VALUE, got {pair!r}")
        try:
            value = parse_yaml(text, f"--knob {key}") if text.strip() else None
        except ConfigError as exc:
            raise SchemeError(str(exc)) from exc
        *parents, leaf = key.strip().split(".")
        node = knobs
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SchemeError(f"--knob {key}: {part} is both a value and a mapping")
        node[leaf] = value
    return knobs


def parse_ratio(text: str) -> float:
    """A memory ratio from the command line: a float (``0.25``) or a fraction (``1/4``)."""
    from malloc.memory.policy import SchemeError

    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise SchemeError(f"--memory-ratio must be a number in (0, 1] such as 0.25 or 1/4, got {text!r}") from exc


def _scheme_identity(result: dict) -> dict:
    keys = ("scheme", "knobs", "memory_ratio_target", "split", "eval")
    return json.loads(json.dumps({k: result.get(k) for k in keys}, sort_keys=True, default=str))


def cmd_eval_scheme(args: argparse.Namespace) -> int:
    """``malloc eval --scheme NAME --memory-ratio R [--knob k=v ...]``: a scheme against Native, to JSON."""
    from malloc.configio import to_dict
    from malloc.eval.evaluate import evaluate_scheme, scheme_result_path
    from malloc.memory.registry import build_policy
    from malloc.results import cached, check_writable
    from malloc.runner import load_trained, run_dir_for

    ratio = parse_ratio(args.memory_ratio) if args.memory_ratio is not None else 1.0
    knobs = parse_knobs(args.knobs)
    policy = build_policy(args.scheme, ratio, **knobs)  # a bad scheme, knob or ratio fails before any work
    cfg = _load(args)
    path = scheme_result_path(run_dir_for(cfg).root, args.scheme, ratio, knobs, args.split, cfg.eval)
    identity = _scheme_identity({"scheme": args.scheme, "knobs": knobs, "memory_ratio_target": ratio,
                                 "split": args.split, "eval": to_dict(cfg.eval)})
    check_writable(path.parent)

    computed = []

    def compute() -> dict[str, Any]:
        model, view, run_dir = load_trained(cfg)
        result = evaluate_scheme(cfg, model, view, args.split, policy, args.scheme, knobs, run_dir.root)
        computed.append(path)
        return {**result, "run_id": run_dir.run_id}

    result = cached(path, compute, lambda done: _scheme_identity(done) == identity and _is_scheme_result(done),
                    force=args.force)
    print(f"wrote {path}" if computed else f"{path} exists; skipping (use --force to rerun)")
    _print_scheme(result)
    return 0


def _is_scheme_result(result: dict) -> bool:
    """Whether a stored scheme result has what :func:`_print_scheme` reads, with numbers in range (else it is
    recomputed)."""
    from malloc.results import metrics_problem

    shaped = (isinstance(result.get("meters"), dict) and isinstance(result.get("metrics"), dict)
              and isinstance(result.get("fidelity"), dict) and isinstance(result.get("native"), dict)
              and isinstance(result["native"].get("metrics"), dict)
              and isinstance(result.get("memory_ratio_target"), (int, float)))
    if not shaped:
        return False
    ratio = result["meters"].get("memory_ratio")
    problem = (metrics_problem(result["metrics"]) or metrics_problem(result["native"]["metrics"])
               or (None if isinstance(ratio, (int, float)) and ratio > 0 else f"memory_ratio is {ratio!r}"))
    if problem is not None:
        log.warning("a stored scheme result is unusable (%s); recomputing it", problem)
    return problem is None


def _print_scheme(result: dict) -> None:
    meters = result["meters"]
    ratios = {k: meters[k] for k in ("memory_ratio", "memory_ratio_state") if k in meters}
    shown = {k: meters[k] for k in ("state_bytes_mean", "stored_tokens_mean", "macs_per_request",
                                    "recompute_macs_per_request", "batched_request_ms_p50",
                                    "batched_request_ms_p99") if k in meters}
    native = {f"native {k}": v for k, v in result["native"]["metrics"].items()}
    _print_metrics(f"{result.get('run_id', '')}: {result['scheme']} at memory_ratio {result['memory_ratio_target']:g}"
                   f" ({result['task']}, {result['split']})",
                   {**result["metrics"], **native, **ratios, **result["fidelity"]}, shown)


def cmd_methods(args: argparse.Namespace, registry: Any = None) -> int:
    """``malloc methods``: the schemes of ``registry`` (a :class:`~malloc.memory.registry.Registry`; the package's
    by default), their knobs with defaults and allowed values (from the declarations)."""
    from malloc.memory.registry import REGISTRY

    rows = (registry or REGISTRY).describe()
    if args.json:
        print(json.dumps([{"name": r.name, "granularity": r.granularity, "family": r.family, "knobs": r.knobs,
                           "knob_rules": r.rules, "keeps": r.summary} for r in rows], indent=2, default=str))
        return 0
    table = [("name", "granularity", "family", "knobs (default and allowed values)", "keeps")]
    table += [(r.name, r.granularity, r.family, r.knob_text(), r.summary) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for index, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])
        if index == 0:
            print("  ".join("-" * width for width in widths) + "  " + "-" * len(row[4]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from malloc.eval.evaluate import evaluate
    from malloc.memory.policy import SchemeError
    from malloc.results import atomic_write_json, check_writable
    from malloc.runner import load_trained

    if args.scheme is not None:
        return cmd_eval_scheme(args)
    if args.memory_ratio is not None or args.knobs:
        raise SchemeError("--memory-ratio and --knob need --scheme NAME (see `malloc methods`)")
    cfg = _load(args)
    model, view, run_dir = load_trained(cfg)
    check_writable(run_dir.root)
    result = evaluate(cfg, model, view, args.split)
    atomic_write_json(run_dir.root / f"eval-{args.split}.json", result)
    _print_metrics(f"{run_dir.run_id}: {args.split} ({cfg.task})", result["metrics"], result["meters"])
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from malloc.data.sources import load_dataset
    from malloc.data.stats import dataset_stats, format_stats

    cfg = _load(args)
    d = cfg.data
    ds = load_dataset(args.source or d.source, args.path or d.path, label_threshold=d.label_threshold,
                      min_events=d.min_events, synthetic=d.synthetic)
    stats = dataset_stats(ds)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``malloc bench --suite NAME``: run a suite (configs/suites/NAME.yaml) into <results>/<NAME>/."""
    from malloc.bench.suite import load_suite
    from malloc.bench.sweep import SuiteRunner
    from malloc.device import resolve_device

    paths = {}
    for pair in args.data:
        label, sep, path = pair.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--data expects NAME=PATH, got {pair!r}")
        paths[label] = path
    spec = load_suite(args.suite)
    if args.device is not None:  # where the suite computes is not part of any run's hash
        resolve_device(args.device)  # a bad name or a missing GPU fails here, not in every item
        spec = dataclasses.replace(spec, base={**spec.base, "device": args.device})
    index, sep, count = (args.shard or "0/1").partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ConfigError(f"--shard expects I/N with 0 <= I < N (e.g. 0/4), got {args.shard!r}")
    runner = SuiteRunner(spec, args.results, force=args.force, data_paths=paths, show_progress=not args.quiet,
                         command=" ".join(["malloc", *(args.argv or [])]), shard=(int(index), int(count)),
                         only=args.only)
    print(f"suite {spec.name}: {len(runner.shard_items)} of {len(runner.items)} items -> {runner.out_dir}")
    outcome = runner.run()
    print(f"suite {spec.name}: {outcome.ran} run, {outcome.skipped} already done, {len(outcome.failed)} failed, "
          f"{len(outcome.unreachable)} not reachable ({outcome.seconds / 60:.1f} min); report: malloc report "
          f"{outcome.out_dir}")
    for item, error in outcome.unreachable.items():
        print(f"  not reachable: {item}: {error}")
    for item, error in outcome.failed.items():
        print(f"  failed: {item}: {error}")
    return 1 if outcome.failed else 0  # a failed item is kept in the results; the status says it happened


def cmd_report(args: argparse.Namespace) -> int:
    """``malloc report DIR...``: index.md, index.html and Pareto plots from suite results files."""
    from malloc.bench.report import build_report

    path = build_report(args.folders, out=args.out, markdown=args.markdown,
                        command=" ".join(["malloc", *(args.argv or [])]))
    print(f"wrote {path} and {path.with_name('index.md')}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from malloc.sensitivity import format_table, sensitivity, sensitivity_config, sensitivity_path

    cfg = sensitivity_config(args.dataset, args.task, path=args.path, config=args.config, overrides=args.overrides)
    result = sensitivity(cfg, split=args.split, resamples=args.bootstrap, seed=args.seed, force=args.force,
                         show_progress=not args.quiet)
    print(format_table(result), end="")
    path = sensitivity_path(Path(cfg.results_dir) / result["run_id"], args.split)
    print(f"wrote {path} (and {path.with_suffix('.md').name}, {path.with_suffix('.png').name})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``malloc serve``: a trained run's events replayed over time against a state store (docs/SERVING.md)."""
    from malloc.serve import ServeOptions, parse_fraction, serve
    from malloc.serve.options import parse_bytes, parse_number
    from malloc.serve.result import format_table

    options = ServeOptions(
        store=args.store, scheme=args.scheme, knobs=parse_knobs(args.knobs), allocator=args.allocator,
        memory_ratio=None if args.memory_ratio is None else parse_fraction(args.memory_ratio, "--memory-ratio"),
        budget=None if args.budget is None else parse_fraction(args.budget, "--budget"),
        workers=parse_number(args.workers, "--workers"), threads=parse_number(args.threads, "--threads"),
        batch=parse_number(args.batch, "--batch"),
        checkpoint_every=parse_number(args.checkpoint_every, "--checkpoint-every"),
        max_requests=parse_number(args.max_requests, "--max-requests"), resume=args.resume, force=args.force,
        anchors=not args.no_anchors, decay=parse_number(args.decay, "--decay", whole=False),
        hot_bytes=parse_bytes(args.hot_bytes, "--hot-bytes"), out=args.out)
    cfg = _load(args)
    try:
        result = serve(cfg, options, show_progress=not args.quiet, command=" ".join(["malloc", *(args.argv or [])]))
    except KeyboardInterrupt:
        again = "; rerun with --resume to continue from the last checkpoint" if options.persistent else ""
        print(f"malloc serve: interrupted{again}", file=sys.stderr)
        return 130
    print(format_table(result), end="")
    print(f"wrote {result['out']}/result.json and predictions.npz")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malloc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a backbone and evaluate its test split through the serving path")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="rerun even if the run's results exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--scheme", metavar="NAME",
                   help="train with this trained-in scheme (see `malloc methods`; default: the config's "
                        "model.scheme, native)")
    p.add_argument("--memory-ratio", metavar="R", help="the scheme's target stored bytes / Native's, in (0, 1]")
    p.add_argument("--knob", dest="knobs", action="append", default=[], metavar="KEY=VALUE",
                   help="scheme knob, e.g. --knob groups=2")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run's checkpoint through the serving path")
    _config_args(p)
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--scheme", metavar="NAME",
                   help="evaluate this memory scheme (see `malloc methods`) against Native; writes "
                        "<run>/schemes/<name>-r<ratio>[-<knob hash>].json")
    p.add_argument("--memory-ratio", metavar="R", help="target stored bytes / Native's, in (0, 1] (default 1)")
    p.add_argument("--knob", dest="knobs", action="append", default=[], metavar="KEY=VALUE",
                   help="scheme knob, e.g. --knob window=8, --knob inner=h2o, --knob inner_knobs.window=8")
    p.add_argument("--force", action="store_true", help="with --scheme: rerun even if the result exists")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("methods", help="list the memory schemes and wrappers: granularity, knobs, what they keep")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("data", help="data set utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("stats", help="users, items, events and history-length percentiles")
    s.add_argument("source", nargs="?", help="data source name (default: the config's data.source)")
    s.add_argument("--path", help="file or directory for sources that are not embedded")
    s.add_argument("--json", action="store_true", help="print JSON")
    _config_args(s)
    s.set_defaults(func=cmd_data)

    p = sub.add_parser("sensitivity", help="memory-sensitivity curve: Native served with its history truncated to "
                                          "1/2 .. 1/64 and to fixed lengths, next to trivial anchors")
    p.add_argument("dataset", help="data source (as in `malloc data stats`), or synthetic:<preset> (long-range, "
                                   "reconsume, short, default)")
    p.add_argument("--task", choices=["ctr", "retrieval"], default="ctr", help="default: ctr")
    p.add_argument("--path", help="file or directory for sources that are not embedded (data.path)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N", help="per-user bootstrap resamples (200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (0)")
    p.add_argument("--force", action="store_true", help="recompute the curve even if its result exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _config_args(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("bench", help="run a benchmark suite (configs/suites/NAME.yaml): every scheme at every "
                                     "ratio, resumable")
    p.add_argument("--suite", default="default",
                   help="suite name under configs/suites/ or a YAML path (default: default; also smoke, paper, long)")
    p.add_argument("--results", default="results", help="results root; the suite writes <results>/<suite>/")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="path of a suite data set that needs one (e.g. --data microvideo=~/data/MicroVideo1.7M_x1)")
    p.add_argument("--force", action="store_true", help="rerun every item and retrain every run")
    p.add_argument("--shard", metavar="I/N", help="run items I, I+N, I+2N, ... of the plan only (N processes "
                   "sharing --results run the suite in parallel; shared training runs are trained once)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="run only the items whose id matches (repeatable; items run in the order of the patterns, "
                        "e.g. --only '*-r0.25' --only '*' runs every 1/4 item first)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto for every run of the suite (default: the suite's, cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="replay a trained run's events over time as requests against a state store "
                                     "(latency per stage, bytes, accuracy; a global budget and its allocators)")
    _config_args(p)
    p.add_argument("--store", default="memory://", metavar="URL",
                   help="memory:// (default, in process), lmdb:///path, sqlite:///path or redis://host:port/db")
    p.add_argument("--scheme", default="native", metavar="NAME", help="cache policy of the stored states")
    p.add_argument("--memory-ratio", metavar="R", help="the scheme's ratio (uniform or lru, without --budget)")
    p.add_argument("--knob", dest="knobs", action="append", default=[], metavar="KEY=VALUE", help="scheme knob")
    p.add_argument("--allocator", default="uniform", metavar="NAME", help="uniform (default), lru or adaptive")
    p.add_argument("--budget", metavar="F", help="total bytes of all states as a fraction of Native's, e.g. 1/8")
    p.add_argument("--decay", default="0", metavar="SECONDS",
                   help="adaptive: time constant of a user's recency (0: the mean gap between its requests)")
    p.add_argument("--hot-bytes", default="0", metavar="SIZE",
                   help="entries kept in each worker's memory in front of a persistent store, e.g. 64MiB (0: none)")
    p.add_argument("--workers", default="1", metavar="N", help="processes sharing the store (users by hash)")
    p.add_argument("--threads", default="0", metavar="N", help="torch threads per worker (0: divided evenly)")
    p.add_argument("--batch", default="1", metavar="N", help="requests of distinct users served together (1)")
    p.add_argument("--checkpoint-every", default="0", metavar="N",
                   help="requests between checkpoints (0: 1%% of the requests, at least 1,000)")
    p.add_argument("--max-requests", default="0", metavar="N", help="replay the first N requests only (0: all)")
    p.add_argument("--resume", action="store_true", help="continue the checkpointed replay of the same options")
    p.add_argument("--force", action="store_true", help="empty the store and the checkpoints, start afresh")
    p.add_argument("--no-anchors", action="store_true", help="do not score the anchors on the replayed rows")
    p.add_argument("--out", metavar="DIR", help="result folder (default: <run>/serve/<allocator>-<scheme>-<hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="write the report (Markdown, one-file HTML, Pareto plots) of suite results")
    p.add_argument("folders", nargs="+", metavar="DIR", help="suite results folder(s), e.g. results/default")
    p.add_argument("--out", help="output folder (default: <first DIR>/report)")
    p.add_argument("--markdown", metavar="FILE", help="also write the Markdown here (e.g. docs/RESULTS.md)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded by bench and report
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (MallocError, FileNotFoundError) as exc:
        print(f"malloc {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # an I/O fault without a path is not the user's input
            raise
        # a path of the user's that cannot be used: no permission, a folder where a file belongs, or the reverse
        print(f"malloc {args.command}: error: {exc.filename}: {exc.strerror or _one_line(exc)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        print(f"malloc {args.command}: error: not enough memory ({_one_line(exc)[:160]}); reduce the sizes the "
              "config asks for (model.dim, model.max_len, data.synthetic.*, batch sizes, knobs)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # results and checkpoints are written atomically, so whatever finished is kept and the rest resumes
        resumable = args.command in ("train", "eval", "bench", "sensitivity")
        print(f"malloc {args.command}: interrupted" + ("; rerun the same command to resume" if resumable else ""),
              file=sys.stderr)
        return 130


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed (NumPy's and Python's MemoryError, PyTorch's allocator errors): the sizes a user
    asked for, not a bug."""
    text = str(exc)
    return isinstance(exc, MemoryError) or any(
        marker in text for marker in ("can't allocate memory", "DefaultCPUAllocator", "out of memory"))


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (a message that spans lines is joined with spaces)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def console() -> int:
    """The installed ``malloc`` script and ``python -m malloc``: :func:`main` in a process that keeps freed memory
    in its heap (:mod:`malloc.heap`; what that saves per training step: docs/BENCHMARKS.md, "The heap")."""
    from malloc.heap import retain_freed_memory

    retain_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(console())
