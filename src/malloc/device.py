"""Where a run computes: ``RunConfig.device`` ("cpu", "cuda", "cuda:N" or "auto") to a ``torch.device``.

The device is not part of a run's identity (its hash): a model trained on a GPU and one trained on a CPU from the
same config are the same run up to floating-point reordering, and each result records the device it ran on.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

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
