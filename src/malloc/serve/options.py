"""What ``malloc serve`` is asked to do, checked before any work: one :class:`ServeError` line per mistake.

:class:`ServeOptions` holds the command line's choices (store URL, scheme, allocator, budget, workers,
checkpointing); :func:`parse_fraction` reads ``1/8`` or ``0.125``. Every check names the option and what was
expected, so the command line prints one line and exits with status 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from malloc.errors import MallocError

ALLOCATORS = ("uniform", "lru", "adaptive")
MAX_WORKERS = 64


class ServeError(MallocError):
    """A ``malloc serve`` option or state that cannot be used: a bad budget or allocator, nothing to resume, a
    checkpoint of another replay, a store that is not empty."""


def parse_fraction(text: str | float, option: str) -> float:
    """A fraction in (0, 1] from the command line: ``0.125`` or ``1/8``.

    Raises:
        ServeError: naming ``option`` and the text.
    """
    try:
        if isinstance(text, str) and "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ServeError(f"{option} must be a fraction in (0, 1] such as 0.125 or 1/8, got {text!r}")
    return value


_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str, option: str) -> int:
    """A byte count from the command line: a whole number with an optional unit (``B``, ``KiB``, ``MiB``,
    ``GiB``, ``kB``, ``MB``, ``GB``), e.g. ``64MiB``; its range is checked by :class:`ServeOptions`.

    Raises:
        ServeError: naming ``option`` and the text.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ServeError(f"{option} must be a whole number of bytes with an optional unit (B, KiB, MiB, GiB, kB, "
                         f"MB, GB), e.g. 64MiB; got {text!r}")
    return int(match.group(1)) * _UNITS[unit]


def parse_number(text: str, option: str, whole: bool = True) -> float | int:
    """A number from the command line (a whole number where ``whole``); its range is checked by
    :class:`ServeOptions`.

    Raises:
        ServeError: naming ``option`` and the text.
    """
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ServeError(f"{option} must be {kind}, got {text!r}") from None


@dataclass(frozen=True)
class ServeOptions:
    """One replay's settings (the command line's ``malloc serve`` options).

    Attributes:
        store: the state store's URL (:func:`~malloc.serving.store.open_store`); ``memory://`` by default.
        scheme: the cache policy every stored state is compressed with (``native``: none).
        memory_ratio: the scheme's ratio under the uniform allocator without a budget (None: 1); the allocators
            with a budget choose ratios themselves.
        knobs: the scheme's knobs.
        allocator: ``uniform`` (one ratio for every user), ``lru`` (whole states, least recently used dropped) or
            ``adaptive`` (per-user ratios under the budget).
        budget: the total bytes of all states, as a fraction of Native's total on the same replay (None: no
            budget; required by ``lru`` and ``adaptive``).
        workers: processes serving disjoint sets of users (a stable hash of the user) from one shared store.
        threads: torch threads per worker (0: torch's default divided by the workers).
        batch: requests of distinct users served together (1: one at a time, the latency of one request).
        checkpoint_every: requests between checkpoints of a persistent store's replay (0: a hundredth of the
            worker's requests, at least 1,000; a checkpoint saves every meter so far, so its cost grows with them).
        max_requests: replay only the first N requests in time order (0: all).
        resume: continue the checkpointed replay of the same options.
        force: empty a store that holds entries before a fresh replay.
        anchors: also score the anchors (no sequence model) on the replayed rows.
        decay: the adaptive allocator's time constant in the data's seconds (0: the mean gap between a user's
            requests, as observed so far).
        hot_bytes: bytes of entries each worker keeps in process in front of a persistent store, least recently
            used out, written through (:class:`~malloc.serving.store.hot.HotTier`; 0: none).
        out: the folder of the result and checkpoints (None: ``<run>/serve/<id>/``).
    """

    store: str = "memory://"
    scheme: str = "native"
    memory_ratio: float | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    allocator: str = "uniform"
    budget: float | None = None
    workers: int = 1
    threads: int = 0
    batch: int = 1
    checkpoint_every: int = 0
    max_requests: int = 0
    resume: bool = False
    force: bool = False
    anchors: bool = True
    decay: float = 0.0
    hot_bytes: int = 0
    out: str | None = None

    def __post_init__(self) -> None:
        if self.allocator not in ALLOCATORS:
            raise ServeError(f"--allocator must be one of {', '.join(ALLOCATORS)}, got {self.allocator!r}")
        if self.budget is not None:
            parse_fraction(self.budget, "--budget")
        if self.memory_ratio is not None:
            parse_fraction(self.memory_ratio, "--memory-ratio")
        if self.allocator in ("lru", "adaptive") and self.budget is None:
            raise ServeError(f"--allocator {self.allocator} needs --budget (a fraction of Native's total bytes, "
                             "e.g. 1/8)")
        if self.allocator == "adaptive" and self.memory_ratio is not None:
            raise ServeError("--allocator adaptive chooses each user's ratio itself; drop --memory-ratio")
        if self.allocator == "uniform" and self.budget is not None and self.memory_ratio is not None:
            raise ServeError("--allocator uniform takes --budget or --memory-ratio, not both (the budget sets the "
                             "ratio)")
        for name, low, high in (("workers", 1, MAX_WORKERS), ("threads", 0, 1024), ("batch", 1, 4096),
                                ("checkpoint_every", 0, 1 << 40), ("max_requests", 0, 1 << 40),
                                ("hot_bytes", 0, 1 << 50)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ServeError(f"--{name.replace('_', '-')} must be a whole number in [{low}, {high}], "
                                 f"got {value!r}")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise ServeError(f"--decay must be a number of seconds >= 0 (0: learnt from the replay), got "
                             f"{self.decay!r}")
        if self.resume and self.force:
            raise ServeError("--resume continues a replay and --force starts one afresh; pass one of them")
        persistent = not self.store.startswith("memory:")
        if self.resume and not persistent:
            raise ServeError(f"--resume needs a persistent store (lmdb://, sqlite:// or redis://): {self.store} "
                             "keeps nothing after the process ends")
        if self.hot_bytes and not persistent:
            raise ServeError(f"--hot-bytes keeps entries in process in front of a persistent store; {self.store} "
                             "is already in process")
        if self.workers > 1 and not persistent:
            raise ServeError(f"--workers {self.workers} needs a store the processes share (redis://, lmdb:// or "
                             f"sqlite://), not {self.store}")

    @property
    def persistent(self) -> bool:
        """Whether the store outlives the process (so the replay checkpoints and can resume)."""
        return not self.store.startswith("memory:")


__all__ = ["ALLOCATORS", "ServeError", "ServeOptions", "parse_bytes", "parse_fraction", "parse_number"]
