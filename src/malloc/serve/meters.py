"""What a replay measures, request by request: the time of each stage, bytes read and written, and what the store
answered.

Per request ``i`` (arrays of the worker's ``R`` requests, filled as they are served, so a checkpoint saves them
and a resumed replay continues them):

- ``stages[i, s]``: seconds spent in stage ``s`` of :data:`STAGES` (NaN where the stage did not run: ``recompute``
  on a batch without a miss, ``journal`` on an in-process store);
- ``total[i]``: the request's wall time, first ``get`` to last ``put``; requests served as one batch
  (``--batch``) are each given the batch's times, since each waits for the whole batch;
- ``read[i]``, ``written[i]``: bytes moved to and from the store (the user's entry, and any entry the allocator
  recompressed or dropped to make room);
- ``outcome[i]``: :data:`OUTCOMES` (a hit, or why the state had to be recomputed).

:func:`latency_table` and :func:`summary` turn them into milliseconds at p50, p99 and p99.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the stages of a request, in the order they run
STAGES = ("get", "decode", "recompute", "score", "append", "encode", "allocate", "journal", "put")
STAGE = {name: index for index, name in enumerate(STAGES)}
# what the store answered: a usable entry, or why the state was recomputed from the event log
OUTCOMES = ("hit", "cold", "dropped", "corrupt", "stale")
OUTCOME = {name: index for index, name in enumerate(OUTCOMES)}
QUANTILES = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9))


@dataclass
class RequestMeters:
    """Per-request measurements of ``R`` requests (module docstring).

    Attributes:
        stages: ``(R, S)`` float64 seconds (NaN: not run); total: ``(R,)`` float64 seconds (NaN: not served yet).
        read, written: ``(R,)`` int64 bytes; outcome: ``(R,)`` int8 index into :data:`OUTCOMES` (-1: not served).
        recomputed: ``(R,)`` int64 events written from the log on a miss (0 on a hit).
    """

    stages: np.ndarray
    total: np.ndarray
    read: np.ndarray
    written: np.ndarray
    outcome: np.ndarray
    recomputed: np.ndarray

    @classmethod
    def empty(cls, requests: int) -> RequestMeters:
        return cls(stages=np.full((requests, len(STAGES)), np.nan), total=np.full(requests, np.nan),
                   read=np.zeros(requests, dtype=np.int64), written=np.zeros(requests, dtype=np.int64),
                   outcome=np.full(requests, -1, dtype=np.int8), recomputed=np.zeros(requests, dtype=np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"stages": self.stages, "total": self.total, "read": self.read, "written": self.written,
                "outcome": self.outcome, "recomputed": self.recomputed}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RequestMeters:
        return cls(**{name: np.array(arrays[name]) for name in ("stages", "total", "read", "written", "outcome",
                                                                "recomputed")})

    @classmethod
    def merged(cls, parts: list[tuple[np.ndarray, RequestMeters]], requests: int) -> RequestMeters:
        """One meter of ``requests`` requests from workers' parts ``(global request index (r,), meters)``."""
        out = cls.empty(requests)
        for index, part in parts:
            for name, array in part.arrays().items():
                getattr(out, name)[index] = array
        return out


class StageClock:
    """Times consecutive stages of a batch of requests (``lap`` after each stage) and writes them into the batch's
    rows of :class:`RequestMeters` when ``done``: every request of a batch waits for the whole batch, so each is
    given the batch's stage times."""

    def __init__(self, meters: RequestMeters, requests: list[int], now: float) -> None:
        self.meters, self.rows, self.start, self.last = meters, requests, now, now
        self.spent: list[float | None] = [None] * len(STAGES)

    def lap(self, stage: str, now: float) -> None:
        """The time since the previous lap is ``stage``'s (added, if the stage runs twice)."""
        index = STAGE[stage]
        before = self.spent[index]
        self.spent[index] = now - self.last if before is None else before + now - self.last
        self.last = now

    def done(self, now: float) -> None:
        row = np.array([np.nan if value is None else value for value in self.spent])
        if len(self.rows) == 1:
            self.meters.stages[self.rows[0]] = row
            self.meters.total[self.rows[0]] = now - self.start
        else:
            self.meters.stages[self.rows] = row
            self.meters.total[self.rows] = now - self.start


def _quantiles_ms(seconds: np.ndarray) -> dict[str, float]:
    values = seconds[~np.isnan(seconds)] * 1e3
    out = {"n": len(values), "mean": float(values.mean()) if len(values) else float("nan")}
    for name, q in QUANTILES:
        out[name] = float(np.percentile(values, q)) if len(values) else float("nan")
    return out


def latency_table(meters: RequestMeters) -> dict[str, dict[str, float]]:
    """``{"request" | stage: {"n", "mean", "p50", "p99", "p999"}}`` in milliseconds, each over the requests that
    ran the stage (``n`` of them)."""
    table = {"request": _quantiles_ms(meters.total)}
    for index, name in enumerate(STAGES):
        table[name] = _quantiles_ms(meters.stages[:, index])
    return table


def summary(meters: RequestMeters) -> dict[str, object]:
    """Counts and bytes of the served requests: outcomes, recomputed events, bytes moved per request."""
    served = meters.outcome >= 0
    moved = (meters.read + meters.written)[served].astype(np.float64)
    counts = {name: int((meters.outcome == index).sum()) for index, name in enumerate(OUTCOMES)}
    return {
        "requests": int(served.sum()),
        "hits": counts["hit"],
        "misses": {name: counts[name] for name in OUTCOMES[1:]},
        "recomputes": int(served.sum()) - counts["hit"],
        "recomputed_events": int(meters.recomputed[served].sum()),
        "bytes_moved_per_request": {"mean": float(moved.mean()) if len(moved) else 0.0,
                                    "p50": float(np.percentile(moved, 50)) if len(moved) else 0.0,
                                    "p99": float(np.percentile(moved, 99)) if len(moved) else 0.0},
        "bytes_read": int(meters.read[served].sum()),
        "bytes_written": int(meters.written[served].sum()),
    }


__all__ = ["OUTCOME", "OUTCOMES", "STAGE", "STAGES", "RequestMeters", "StageClock", "latency_table", "summary"]
