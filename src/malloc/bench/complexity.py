"""The complexity table: every registered scheme's stored state and per-request cost as formulas.

Symbols: ``n`` events in the history, ``t`` new events of a request, ``c`` candidates scored, ``L`` layers, ``d``
the attention width ``H d_h`` (= the model width for the default sizes), ``H`` heads, ``b`` bytes per stored
element (4 for fp32). *Stored state* is per user and counts keys and values (``2 d`` elements per event and
layer for Native) plus what the scheme keeps besides (positions and timestamps, 12 bytes per stored event and
layer, are left out of the formulas but counted in every measurement). *Per request* counts multiply-adds of
appending ``t`` events and scoring ``c`` candidates: projections ``(t + c) d^2`` per layer (up to a backbone
constant: HSTU 5, SASRec 4 + 2 ffn_mult) plus attention, 2 per (query, key, channel). The formulas follow the
schemes' docstrings (docs/schemes.md); the measured bytes and the analytic MACs of each run are in its
results (``malloc.models.macs``). A scheme registered without an entry here fails ``tests/test_report.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from malloc.memory.registry import describe


@dataclass(frozen=True)
class Complexity:
    """One row: ``state`` (bytes per user), ``request`` (MACs per request), ``knob`` (how the ratio sets it)."""

    state: str
    request: str
    knob: str


_NATIVE_REQUEST = "L (t + c) [d^2 + 2 (n + t) d]"


def _kept(budget: str) -> str:
    return f"L (t + c) [d^2 + 2 ({budget} + t) d]"


# scheme or wrapper name -> formulas; B = kept events (eviction schemes), mr = the target memory ratio
COMPLEXITY: dict[str, Complexity] = {
    "native": Complexity("2 L n d b", _NATIVE_REQUEST, "none (mr = 1)"),
    "recency": Complexity("2 L B d b", _kept("B"), "B = mr n"),
    "random": Complexity("2 L B d b", _kept("B"), "B = mr n"),
    "streaming_llm": Complexity("2 L (s + w) d b", _kept("(s + w)"), "s + w = mr n"),
    "h2o": Complexity("2 L B d b + 4 L H B (carried scores)", _kept("B") + " + L H t B (score update)",
                      "B_h + B_r = mr n"),
    "snapkv": Complexity("2 L B d b", _kept("B") + " + L H t B (window votes)", "B = mr n (window inside)"),
    "tova": Complexity("2 L B d b", _kept("B") + " + L H t B (scores)", "B = mr n"),
    "kivi": Complexity("L [(n - R) 2 d q / 8 + R 2 d b], q = bits + 2 s / G", _NATIVE_REQUEST + " (dequantized read)",
                       "bits in {2, 4}; residual R, group G fixed"),
    "intactkv": Complexity("L [P 2 d b + (n - P) 2 d q / 8]", _NATIVE_REQUEST + " (dequantized read)",
                           "bits in {2, 4, 8}; pivots P"),
    "int8": Complexity("L n (2 d + 4 H) (int8 + scales)", _NATIVE_REQUEST + " (dequantized read)",
                       "fixed (8 bits)"),
    "mqa": Complexity("2 L n (d / H) b", _NATIVE_REQUEST + " (K, V projections / H)", "fixed (mr = 1 / H)"),
    "gqa": Complexity("2 L n G (d / H) b", _NATIVE_REQUEST + " (K, V projections x G / H)", "G = mr H"),
    "mla": Complexity("L n d_c b", "L (t + c) [d^2 + 2 H (n + t) d_c]", "d_c = mr 2 d"),
    "linformer": Complexity("2 L k d b (+ a length counter)", "L (t + c) [d^2 + 2 k d] + 2 L t k d (update)",
                            "k = mr n_max"),
    "reformer": Complexity("2 L n d b (ratio 1)", _NATIVE_REQUEST + " + L H r (n + t) d_h b_k / 2 (hashing)",
                           "none (n_hashes r, buckets b_k: compute only)"),
    "longformer": Complexity("2 L (w + g) d b", _kept("(w + g)"), "w + g = mr n_max"),
    "beacon": Complexity("2 L (n / a + r) d b", _kept("(n / a + r)") + " + beacon tokens t / a",
                         "condensing ratio a ~ 1 / mr; open chunk r < w"),
    "rwkv": Complexity("5 L d b (fixed)", "L (t + c) d^2 (no attention)", "none (fixed state)"),
    "pyramid": Complexity("2 sum_l B_l d b, mean_l B_l = mr n", "as the inner scheme", "B_l falls with depth"),
    "compose": Complexity("L B 2 d q / 8, B = kept events", "as the eviction scheme (dequantized read)",
                          "one byte budget: eviction then precision"),
}


def complexity_rows() -> list[tuple[str, str, str, Complexity | None]]:
    """``(name, granularity, family, formulas or None)`` for every registered scheme and wrapper, in
    ``malloc methods`` order."""
    return [(row.name, row.granularity, row.family, COMPLEXITY.get(row.name)) for row in describe()]


def missing_entries() -> list[str]:
    """Registered names without formulas (a test keeps this empty)."""
    return [name for name, _, _, formulas in complexity_rows() if formulas is None]
