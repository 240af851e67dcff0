"""Write a MovieLens-20M-format ``ratings.csv`` of any size, for measuring the readers on data larger than MovieLens.

The file has the header ``userId,movieId,rating,timestamp`` and, like MovieLens-20M's, is sorted by user and then by
movie within a user, not by time (the reader sorts each user's events by time). Users' lengths are log-normal
(median ``--median-events``, at least ``--min-events``), movies Zipf-popular among ``--movies`` ids, ratings in half
stars from 0.5 to 5.0, timestamps seconds within 20 years; everything is drawn from ``--seed``. Written in chunks
of users, so its own memory stays small whatever ``--events``. Data are never committed: write it under /tmp.

    python benchmarks/make_ratings.py /tmp/ml-synthetic/ratings.csv --events 10000000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HEADER = "userId,movieId,rating,timestamp\n"
START = 946_684_800  # 2000-01-01, seconds
SPAN = 20 * 365 * 86_400


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the ratings.csv to write (its folder is created)")
    parser.add_argument("--events", type=int, default=10_000_000, help="rows to write (default 10,000,000)")
    parser.add_argument("--movies", type=int, default=27_000, help="distinct movie ids (default 27,000)")
    parser.add_argument("--median-events", type=float, default=140.0, help="median events per user (default 140)")
    parser.add_argument("--min-events", type=int, default=20, help="fewest events of a user (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.events < 1 or args.movies < 1 or args.min_events < 1 or not args.median_events >= args.min_events:
        parser.error("--events, --movies and --min-events must be >= 1 and --median-events >= --min-events")
    return args


def user_lengths(rng: np.random.Generator, events: int, median: float, low: int) -> np.ndarray:
    """``(U,)`` events per user, log-normal of median ``median`` above ``low``, summing to exactly ``events``."""
    lengths = []
    total = 0
    while total < events:
        draw = low + np.floor(rng.lognormal(np.log(median - low), 1.0, size=4096)).astype(np.int64)
        lengths.append(draw)
        total += int(draw.sum())
    out = np.concatenate(lengths)
    out = out[: int(np.searchsorted(np.cumsum(out), events)) + 1]
    out[-1] -= int(out.sum()) - events
    return out[out > 0]


def write(args: argparse.Namespace) -> tuple[int, int]:
    rng = np.random.default_rng(args.seed)
    lengths = user_lengths(rng, args.events, args.median_events, args.min_events)
    popularity = 1.0 / np.arange(1, args.movies + 1) ** 0.9
    popularity /= popularity.sum()
    movie_ids = rng.permutation(args.movies) * 3 + 1  # sparse ids, as MovieLens's
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="ascii") as out:
        out.write(HEADER)
        for first in range(0, len(lengths), 2000):
            chunk = lengths[first:first + 2000]
            users = np.repeat(np.arange(first + 1, first + 1 + len(chunk)), chunk)
            movies = movie_ids[rng.choice(args.movies, size=len(users), p=popularity)]
            order = np.lexsort((movies, users))  # by user, then movie: MovieLens-20M's order
            ratings = rng.integers(1, 11, size=len(users)) / 2
            times = START + rng.integers(0, SPAN, size=len(users))
            rows = np.stack([users[order], movies[order], times[order]], axis=1).tolist()
            stars = ratings[order].tolist()
            out.write("".join(f"{u},{m},{r:.1f},{t}\n" for (u, m, t), r in zip(rows, stars, strict=True)))
    return len(lengths), int(lengths.sum())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tic = time.perf_counter()
    users, events = write(args)
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {events:,} events of {users:,} users, {size / 2**20:,.0f} MiB "
          f"({time.perf_counter() - tic:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
