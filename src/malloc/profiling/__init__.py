"""Profiling helpers: wall-clock latency of serving and training steps, and peak memory per process."""

from __future__ import annotations

from malloc.profiling.latency import (
    TrainingBatch,
    request_latency,
    synthetic_candidates,
    synthetic_events,
    synthetic_training_batch,
    time_call,
    training_step,
)
from malloc.profiling.memory import measure_peak_in_subprocess, peak_rss_mb

__all__ = [
    "TrainingBatch",
    "measure_peak_in_subprocess",
    "peak_rss_mb",
    "request_latency",
    "synthetic_candidates",
    "synthetic_events",
    "synthetic_training_batch",
    "time_call",
    "training_step",
]
