"""The registry of memory schemes: one line per scheme, grouped by granularity.

Adding a scheme: one file under ``schemes/<granularity>/<name>.py`` with a frozen dataclass, and one line here.
"""

from __future__ import annotations

from malloc.memory.policy import CachePolicy
from malloc.memory.schemes.reference.native import Native
from malloc.memory.schemes.token_prune.recency import Recency

# name -> class; the order is the order of `malloc methods` and of reports
POLICIES: dict[str, type[CachePolicy]] = {cls.name: cls for cls in (
    Native,
    Recency,
)}
