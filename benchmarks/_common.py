"""What the benchmark scripts share: argument parsers and the aligned table."""

from __future__ import annotations

import argparse

from malloc.models import BACKBONES


def table_line(cells: list[str], headers: list[str], min_width: int) -> str:
    """Right-aligned cells, each at least as wide as its column header and ``min_width``."""
    return "  ".join(cell.rjust(max(min_width, len(name))) for cell, name in zip(cells, headers, strict=True))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(name not in BACKBONES for name in names):
        raise argparse.ArgumentTypeError(f"expected backbones among {sorted(BACKBONES)}, got {text!r}")
    return names


def switch_list(text: str) -> list[str]:
    """Comma-separated ``on`` / ``off``, in the given order, each once."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(name not in ("on", "off") for name in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"expected on, off or both comma-separated, got {text!r}")
    return names
