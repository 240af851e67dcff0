"""The complexity formulas a scheme declares on its own class (``complexity: ClassVar[Complexity]``).

Symbols: ``n`` events in the history, ``t`` new events of a request, ``c`` candidates scored, ``L`` layers, ``d``
the attention width ``H d_h`` (= the model width for the default sizes), ``H`` heads, ``b`` bytes per stored
element (4 for fp32), ``mr`` the target memory ratio, ``B`` the kept events of an eviction scheme. *Stored state*
is per user and counts keys and values (``2 d`` elements per event and layer for Native) plus what the scheme keeps
besides (positions and timestamps, 12 bytes per stored event and layer, are left out of the formulas but counted in
every measurement). *Per request* counts multiply-adds of appending ``t`` events and scoring ``c`` candidates:
projections ``(t + c) d^2`` per layer (up to a backbone constant: HSTU 5, SASRec 4 + 2 ffn_mult) plus attention, 2
per (query, key, channel). The measured bytes and the analytic MACs of each run are in its results
(``malloc.models.macs``); ``malloc.bench.complexity`` collects the declarations into the report's table.
"""

from __future__ import annotations

from dataclasses import dataclass

# Native's request: every layer projects t + c tokens and each reads the n + t stored and new keys and values
NATIVE_REQUEST = "L (t + c) [d^2 + 2 (n + t) d]"


@dataclass(frozen=True)
class Complexity:
    """One scheme's formulas: ``state`` (bytes per user), ``request`` (MACs per request), ``knob`` (how the ratio
    sets the scheme's knob)."""

    state: str
    request: str
    knob: str


def kept_request(budget: str) -> str:
    """Native's request formula with ``budget`` stored keys read in place of ``n``."""
    return f"L (t + c) [d^2 + 2 ({budget} + t) d]"


def own_complexity(cls: type) -> Complexity | None:
    """The formulas declared on ``cls`` itself (None if only a base class declares some, or none does): a scheme
    that subclasses another scheme states its own."""
    found = vars(cls).get("complexity")
    return found if isinstance(found, Complexity) else None


__all__ = ["NATIVE_REQUEST", "Complexity", "kept_request", "own_complexity"]
