"""Seconds and peak memory of reading a large MovieLens-format ratings file, parsed and then from the parse cache.

Each load runs in a fresh process: ``load_dataset(--source, FILE)`` (:mod:`malloc.data.sources`), timed, then one
pass over every array of the sequences (what any use of the data costs at least). The process reports its peak
resident size (``ru_maxrss``) and its resident size after the imports. ``--loads N`` loads in turn, sharing one
empty parse cache (``MALLOC_DATA_CACHE`` set to a temporary folder): the first parses the file and writes the
cache, the later ones read it (memory-mapped). ``--pythonpath DIR`` runs the loads against another source tree
(an older commit unpacked by ``git archive COMMIT src | tar -x -C DIR``) to compare before and after.

    python benchmarks/make_ratings.py /tmp/ml-synthetic/ratings.csv --events 10000000
    python benchmarks/large_ratings.py /tmp/ml-synthetic/ratings.csv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import table_line

HEADERS = ["load", "seconds", "pass_s", "peak_rss_mib", "import_rss_mib", "users", "events"]
WIDTH = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="a ratings file (e.g. written by make_ratings.py)")
    parser.add_argument("--source", default="ml-20m", help="its data source (default ml-20m: ratings.csv)")
    parser.add_argument("--loads", type=int, default=2, help="loads in turn, sharing one parse cache (default 2)")
    parser.add_argument("--pythonpath", help="import malloc from this source folder instead (its src/)")
    parser.add_argument("--json", action="store_true", help="one JSON object per load, one per line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one load, in this process
    return parser.parse_args(argv)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_here(args: argparse.Namespace) -> dict:
    """One load in this process: seconds, a pass over the arrays, peak and import-time resident sizes."""
    import resource

    import numpy as np

    from malloc.data.sources import load_dataset

    imported = _rss_mib()
    tic = time.perf_counter()
    seqs = load_dataset(args.source, str(args.file)).sequences
    seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    for array in (seqs.offsets, seqs.items, seqs.timestamps, seqs.labels, seqs.user_ids, seqs.item_ids):
        np.asarray(array).sum()
    touched = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "pass_s": touched, "peak_rss_mib": peak, "import_rss_mib": imported,
            "users": seqs.num_users, "events": seqs.num_events}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(load_here(args)))
        return 0
    if not args.json:
        print(table_line(HEADERS, HEADERS, WIDTH))
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MALLOC_DATA_CACHE": cache}
        if args.pythonpath:
            env["PYTHONPATH"] = str(Path(args.pythonpath).resolve() / "src")
        for load in range(1, args.loads + 1):
            job = subprocess.run([sys.executable, __file__, str(args.file), "--source", args.source, "--child"],
                                 env=env, capture_output=True, text=True)
            if job.returncode != 0:
                print(f"load {load} failed:\n{job.stderr[-3000:]}", file=sys.stderr)
                return 1
            seen = json.loads(job.stdout.splitlines()[-1])
            if args.json:
                print(json.dumps({"load": load, **seen, "file": str(args.file), "pythonpath": args.pythonpath}))
            else:
                print(table_line([str(load), f"{seen['seconds']:.1f}", f"{seen['pass_s']:.2f}",
                                  f"{seen['peak_rss_mib']:,.0f}", f"{seen['import_rss_mib']:,.0f}",
                                  f"{seen['users']:,}", f"{seen['events']:,}"], HEADERS, WIDTH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
