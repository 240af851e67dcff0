"""The complexity table: every registered scheme's stored state and per-request cost as formulas.

Each scheme and wrapper states its formulas on its own class (``complexity``, a
:class:`~malloc.memory.complexity.Complexity`; the symbols are in :mod:`malloc.memory.complexity`); this module
reads them from a registry, in ``malloc methods`` order, so registering a scheme is all it takes to put its row in
the report. The formulas follow the schemes' docstrings; the measured bytes and the analytic MACs of each run are
in its results (``malloc.models.macs``). A scheme registered without formulas of its own fails
``tests/test_report.py``.
"""

from __future__ import annotations

from malloc.memory.complexity import Complexity
from malloc.memory.registry import REGISTRY, Registry


def complexity_rows(registry: Registry = REGISTRY) -> list[tuple[str, str, str, Complexity | None]]:
    """``(name, granularity, family, formulas or None)`` for every scheme and wrapper of ``registry``, in
    ``malloc methods`` order."""
    return [(row.name, row.granularity, row.family, row.complexity) for row in registry.describe()]


def complexity_table(registry: Registry = REGISTRY) -> dict[str, Complexity]:
    """Name -> formulas of every scheme and wrapper of ``registry`` that states them."""
    return {name: formulas for name, _, _, formulas in complexity_rows(registry) if formulas is not None}


def missing_entries(registry: Registry = REGISTRY) -> list[str]:
    """Registered names whose class states no formulas of its own (a test keeps this empty)."""
    return [name for name, _, _, formulas in complexity_rows(registry) if formulas is None]
