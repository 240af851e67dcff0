"""Where a run computes: ``RunConfig.device`` ("cpu", "cuda", "cuda:N" or "auto") to a ``torch.device``.

The device is not part of a run's identity (its hash): a model trained on a GPU and one trained on a CPU from the
same config are the same run up to floating-point reordering, and each result records the device it ran on.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malloc.configio import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved: config checks stay light
    import torch

DEVICE_PATTERN = re.compile(r"cpu|auto|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is "cpu", "auto", "cuda" or "cuda:N"."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {name!r}")


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for a configured name; "auto" is the first GPU when torch sees one, else the CPU.

    Raises:
        ConfigError: a malformed name, or a GPU asked for where torch sees none (or not that many).
    """
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device={name!r}: torch {torch.__version__} sees {count} CUDA device(s); "
                               "use device=cpu (or auto) on this machine")
    return device


def device_name(device: torch.device) -> str:
    """What a result records about its device: "cpu" or the GPU's model name."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer read after it counts it; a no-op on a CPU run.

    Only when CUDA was used in this process: never initialise a GPU context just to time a CPU run.
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def environment(device: str = "cpu") -> dict[str, Any]:
    """What a result records about where it ran: library versions, the platform, the CPU model (Linux), its core
    count, torch's thread count, the GPU torch sees (or None), and ``device`` resolved ("cpu" or the GPU's name).
    """
    import numpy as np
    import torch

    from malloc import __version__

    cpu = platform.processor() or platform.machine()
    try:  # the CPU model name on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"versions": {"malloc": __version__, "python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__},
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "device": device_name(resolve_device(device))}
