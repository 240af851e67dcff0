"""Peak resident memory, measured in a fresh process per measurement.

A process's peak RSS only ever grows, so each measurement runs its workload in its own ``python -c``
subprocess: :func:`measure_peak_in_subprocess` imports a function given as ``"module:function"``, calls it
with JSON keyword arguments, and reports the function's JSON-serialisable result together with the peak RSS
before the call (interpreter + imports, torch included) and after it.

The workloads that ``benchmarks/memory.py`` measures live here too, so the subprocess can import them:
:func:`training_workload` and :func:`serving_workload`.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from typing import Any

import numpy as np

_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_MARKER = "__malloc_peak_result__ "

# The child reads {"target", "kwargs"} from stdin and writes one marked JSON line; anything else the workload
# prints is ignored.
_CHILD = f"""
import importlib, json, sys
from malloc.profiling.memory import peak_rss_mb
spec = json.loads(sys.stdin.read())
module_name, function_name = spec["target"].split(":")
function = getattr(importlib.import_module(module_name), function_name)
import_rss_mb = peak_rss_mb()
result = function(**spec["kwargs"])
line = json.dumps({{"result": result, "import_rss_mb": import_rss_mb, "peak_rss_mb": peak_rss_mb()}})
sys.stdout.write({_MARKER!r} + line + "\\n")
"""


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage`` max RSS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def measure_peak_in_subprocess(target: str, kwargs: dict[str, Any], timeout: float | None = None
                               ) -> dict[str, Any]:
    """Run ``target(**kwargs)`` in a fresh Python process and measure its peak RSS.

    Args:
        target: ``"package.module:function"``; the function must return something JSON-serialisable.
        kwargs: JSON-serialisable keyword arguments.
        timeout: seconds before the subprocess is killed (None: no limit).
    Returns:
        ``{"result": <the function's return value>, "import_rss_mb": peak RSS after imports and before the
        call, "peak_rss_mb": peak RSS of the whole process}``.
    Raises:
        ValueError: ``target`` is not of the form ``"module:function"``, or ``kwargs`` is not
            JSON-serialisable.
        RuntimeError: the subprocess failed or produced no result; the message carries its stderr.
    """
    if not isinstance(target, str) or not _TARGET.match(target):
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    try:
        spec = json.dumps({"target": target, "kwargs": kwargs})
    except TypeError as error:
        raise ValueError(f"kwargs for {target} must be JSON-serialisable: {error}") from error
    try:
        completed = subprocess.run([sys.executable, "-c", _CHILD], input=spec, capture_output=True, text=True,
                                   timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{target} did not finish within {timeout} s") from error
    lines = [line for line in completed.stdout.splitlines() if line.startswith(_MARKER)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{target}({kwargs}) failed in a subprocess (exit code {completed.returncode}); "
                           f"stderr:\n{completed.stderr.strip()}")
    return json.loads(lines[-1][len(_MARKER):])


# -- workloads (imported by the measuring subprocess) -----------------------------------------------

def allocate(megabytes: int) -> dict[str, Any]:
    """Touch a ``megabytes`` MiB buffer (a known amount of memory, for checks)."""
    buffer = np.ones(megabytes * 1024 * 1024, dtype=np.uint8)
    return {"allocated_mb": megabytes, "checksum": int(buffer[::4096].sum())}


def training_workload(backbone: str, steps: int = 5, batch_size: int = 32, max_len: int = 200,
                      num_items: int = 10_000, threads: int = 0, seed: int = 0) -> dict[str, Any]:
    """``steps`` training steps (forward, backward, AdamW) of the default-size model on random full windows.

    Args:
        threads: ``torch.set_num_threads`` (0: torch's default).
    Returns:
        ``{"backbone", "steps", "batch_size", "max_len", "num_items", "parameters"}``.
    """
    import torch

    from malloc.memory.registry import build_model_for
    from malloc.models import ModelConfig
    from malloc.profiling.latency import synthetic_training_batch, training_step

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model_for(ModelConfig(backbone=backbone, max_len=max_len), num_items)  # type: ignore[arg-type]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        training_step(model, optimiser, synthetic_training_batch(batch_size, max_len, num_items, seed + step))
    return {"backbone": backbone, "steps": steps, "batch_size": batch_size, "max_len": max_len,
            "num_items": num_items, "parameters": sum(p.numel() for p in model.parameters())}


def serving_workload(backbone: str, users: int = 256, history: int = 512, candidates: int = 100,
                     user_batch: int = 32, num_items: int = 10_000, prefill_chunk: int = 1024,
                     threads: int = 0, seed: int = 0, scheme: str = "native", memory_ratio: float = 1.0
                     ) -> dict[str, Any]:
    """Write ``users`` histories of ``history`` events (``user_batch`` users at a time) under the training-free
    policy ``scheme`` at ``memory_ratio`` (Native: keep every event) and keep every state, then score
    ``candidates`` candidates for every user from the stored states. A query-aware scheme (H2O, SnapKV, TOVA)
    observes the attention of every write.

    Returns:
        ``{"backbone", "scheme", "memory_ratio", "users", "history", "candidates", "user_batch", "state_bytes"}``
        where ``state_bytes`` is the total stored bytes of all users' states.
    """
    import torch

    from malloc.memory.registry import build_model_for, build_policy
    from malloc.models import ModelConfig
    from malloc.profiling.latency import synthetic_events
    from malloc.serving.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model_for(ModelConfig(backbone=backbone), num_items).eval()  # type: ignore[arg-type]
    engine = Engine(model, build_policy(scheme, memory_ratio), prefill_chunk=prefill_chunk)
    states = []
    with torch.no_grad():
        for start in range(0, users, user_batch):
            count = min(user_batch, users - start)
            events = synthetic_events(count, history, num_items, seed + start)
            states.extend(engine.write(events))
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, users, user_batch):
            part = states[start:start + user_batch]
            items = torch.randint(1, num_items + 1, (len(part), candidates), generator=generator)
            times = torch.tensor([[s.last_timestamp + 1] for s in part]).expand(len(part), candidates)
            engine.score(part, items, times)
    return {"backbone": backbone, "scheme": scheme, "memory_ratio": memory_ratio, "users": users,
            "history": history, "candidates": candidates,
            "user_batch": user_batch, "state_bytes": sum(s.nbytes() for s in states)}
