"""Pareto fronts of accuracy against cost (measured memory ratio, MACs per request).

A point ``(cost, accuracy)`` is dominated when another point costs no more and is no less accurate, and is
strictly better in one of the two. The front is the set of non-dominated points; equal points are all kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points, in order of increasing cost.

    Args:
        points: ``(cost, accuracy)`` pairs; lower cost is better; a pair with a missing (None) or non-finite value
            is never on the front.
        higher_is_better: whether a larger accuracy is better (False for a loss such as Logloss).
    """
    sign = 1.0 if higher_is_better else -1.0
    valid = [(i, float(c), sign * float(a)) for i, (c, a) in enumerate(points)
             if c is not None and a is not None and math.isfinite(c) and math.isfinite(a)]
    front = []
    for i, cost, acc in valid:
        dominated = any(c <= cost and a >= acc and (c < cost or a > acc) for j, c, a in valid if j != i)
        if not dominated:
            front.append((cost, -acc, i))
    return [i for _, _, i in sorted(front)]
