"""Per-request latency of real users through the serving path, for every suite item.

The replay's own latency (``batched_request_ms_*``) times a batched step of many users divided by its users: a
throughput figure. A suite item also measures what one user waits for: a request of batch 1, one appended event
plus the read (CTR: ``candidates`` candidates scored; retrieval: the full-catalogue logits), from the state the
scheme stored for that user's history (written under the scheme beforehand, not timed). Users are spread evenly
over the split's history lengths, so the percentiles follow the data's length distribution. Timing hygiene as in
:mod:`malloc.profiling.latency`: untimed warm-up requests first, then every request timed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from malloc.data.batching import events
from malloc.data.tasks import CTRView, RetrievalView
from malloc.profiling.latency import time_call
from malloc.serving.engine import Engine


@dataclass(frozen=True)
class LatencySpec:
    """How a suite item measures per-request latency.

    Attributes:
        users: test users timed (spread over history lengths); 0 turns the measurement off.
        candidates: CTR: candidates scored per request (random catalogue items, seeded).
        warmup: untimed requests before the first timed one.
        repeats: timed requests per user.
    """

    users: int = 32
    candidates: int = 100
    warmup: int = 3
    repeats: int = 3

    def __post_init__(self) -> None:
        for name, (low, high) in {"users": (0, 100_000), "candidates": (1, 1_000_000), "warmup": (0, 10_000),
                                  "repeats": (1, 10_000)}.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in {low}..{high:,}, got {getattr(self, name)}")


def _timed_users(view: CTRView | RetrievalView, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` users of the split spread evenly over history length, and each one's request position (the index
    of the event after the appended one: CTR the user's first row of the split, retrieval the target)."""
    if isinstance(view, CTRView):
        rows = view.split(split)
        users, first = np.unique(rows.user, return_index=True)
        stops = np.asarray(rows.history_len)[first]
    else:
        stops = view.target_index(split)
        users = np.arange(len(stops))
    keep = stops >= 2  # one written event and one appended event at least
    users, stops = users[keep], stops[keep]
    order = np.argsort(stops, kind="stable")
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(np.int64))]
    return users[picks], stops[picks]


def request_latency_served(engine: Engine, view: CTRView | RetrievalView, split: str, max_len: int,
                           spec: LatencySpec, seed: int = 0) -> dict[str, float | int]:
    """Latency of batch-1 requests (append 1 event, then read) from states stored under ``engine``'s policy.

    Returns:
        ``request_ms_p50``, ``request_ms_p99`` (over all timed requests), ``request_users``, ``request_repeats``,
        ``request_candidates`` (0 for retrieval: the whole catalogue is read), ``request_threads``; an empty dict
        when ``spec.users`` is 0 or the split has no user with two events.
    """
    if spec.users == 0:
        return {}
    seqs = view.sequences
    users, stops = _timed_users(view, split, spec.users)
    if len(users) == 0:
        return {}
    generator = torch.Generator().manual_seed(seed)
    samples: list[np.ndarray] = []
    with torch.no_grad():
        for index, (user, stop) in enumerate(zip(users.tolist(), stops.tolist(), strict=True)):
            start = max(0, stop - 1 - max_len)
            one = np.array([user])
            stored = engine.write(events(seqs, one, np.array([start]), np.array([stop - 1])))
            new = events(seqs, one, np.array([stop - 1]), np.array([stop]))
            if isinstance(view, CTRView):
                items = torch.randint(1, seqs.num_items + 1, (1, spec.candidates), generator=generator)
                times = torch.full((1, spec.candidates), int(seqs.timestamps[seqs.offsets[user] + stop]))

                def request(stored=stored, new=new, items=items, times=times) -> torch.Tensor:
                    return engine.request(stored, new, items, times)[1]
            else:
                def request(stored=stored, new=new) -> torch.Tensor:
                    return engine.retrieve(engine.append(stored, new))
            warmup = spec.warmup if index == 0 else 0
            samples.append(time_call(request, warmup=warmup, min_repeats=spec.repeats, min_seconds=0.0,
                                     max_repeats=spec.repeats))
    ms = np.concatenate(samples) * 1e3
    return {"request_ms_p50": float(np.percentile(ms, 50)), "request_ms_p99": float(np.percentile(ms, 99)),
            "request_users": len(users), "request_repeats": spec.repeats,
            "request_candidates": spec.candidates if isinstance(view, CTRView) else 0,
            "request_threads": torch.get_num_threads()}
