"""The ``malloc`` command: train, eval, bench, data.

Every command takes ``--config FILE`` (YAML under ``configs/``) and any number of ``--set key.sub=value``
overrides. User errors (bad config key, bad data file, missing checkpoint) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from malloc.configio import ConfigError
from malloc.data.sequences import DataError

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
    from malloc.runner import run

    cfg = _load(args)
    result = run(cfg, force=args.force, show_progress=not args.quiet)
    _print_metrics(f"{result['run_id']}: test ({cfg.task})", result["metrics"], result["meters"])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from malloc.bench.results import atomic_write_json
    from malloc.evaluate import evaluate
    from malloc.runner import load_trained

    cfg = _load(args)
    model, view, run_dir = load_trained(cfg)
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
    from malloc.bench.default_job import run_default_job

    print(run_default_job(args.configs, force=args.force, overrides=args.overrides, show_progress=not args.quiet))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malloc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a backbone and evaluate its test split through the serving path")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="rerun even if the run's results exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run's checkpoint through the serving path")
    _config_args(p)
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="data set utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("stats", help="users, items, events and history-length percentiles")
    s.add_argument("source", nargs="?", help="data source name (default: the config's data.source)")
    s.add_argument("--path", help="file or directory for sources that are not embedded")
    s.add_argument("--json", action="store_true", help="print JSON")
    _config_args(s)
    s.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="the default job: HSTU and SASRec on MovieLens-100K, CTR and retrieval")
    p.add_argument("--configs", default="configs/bench", help="folder of run configs (default: configs/bench)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run config")
    p.add_argument("--force", action="store_true", help="rerun even if results exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"malloc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
