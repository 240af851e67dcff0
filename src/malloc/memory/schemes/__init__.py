"""The registry of memory schemes: one line per scheme, grouped by granularity.

Two tables: the training-free cache policies (:data:`POLICIES`) and the trained-in architecture schemes
(:data:`ARCHITECTURES`). Adding a scheme: one file under ``schemes/<granularity>/<name>.py`` with a frozen
dataclass (its knobs declared with :func:`~malloc.memory.knobs.knob`, its formulas stated as ``complexity``), and
one line here. ``malloc.memory.registry`` builds schemes by name from these tables (or from a copy with more
classes: ``REGISTRY.with_schemes``).
"""

from __future__ import annotations

from malloc.memory.architecture import ArchitectureScheme
from malloc.memory.policy import CachePolicy
from malloc.memory.schemes.architecture.rwkv import RWKV
from malloc.memory.schemes.head.gqa import GQA
from malloc.memory.schemes.head.mla import MLA
from malloc.memory.schemes.head.mqa import MQA
from malloc.memory.schemes.precision.int8 import Int8
from malloc.memory.schemes.precision.intactkv import IntactKV
from malloc.memory.schemes.precision.kivi import KIVI
from malloc.memory.schemes.reference.native import Native
from malloc.memory.schemes.sequence.linformer import Linformer
from malloc.memory.schemes.sequence.reformer import Reformer
from malloc.memory.schemes.token_merge.beacon import Beacon
from malloc.memory.schemes.token_merge.longformer import Longformer
from malloc.memory.schemes.token_prune.h2o import H2O
from malloc.memory.schemes.token_prune.random_policy import Random
from malloc.memory.schemes.token_prune.recency import Recency
from malloc.memory.schemes.token_prune.snapkv import SnapKV
from malloc.memory.schemes.token_prune.streaming_llm import StreamingLLM
from malloc.memory.schemes.token_prune.tova import TOVA


def registry(classes: tuple[type, ...]) -> dict[str, type]:
    """``{name: class}`` in the given order; every class must carry a name of its own.

    Raises:
        ValueError: a class without a name, or two classes of one name (a later one would hide the first).
    """
    table: dict[str, type] = {}
    for cls in classes:
        if not getattr(cls, "name", ""):
            raise ValueError(f"scheme class {cls.__name__} has no name")
        if cls.name in table:
            raise ValueError(f"scheme name {cls.name!r} is taken by {table[cls.name].__name__} and {cls.__name__}")
        table[cls.name] = cls
    return table


# name -> class; the order is the order of `malloc methods` and of reports
POLICIES: dict[str, type[CachePolicy]] = registry((
    Native,
    Recency,
    Random,
    StreamingLLM,
    H2O,
    SnapKV,
    TOVA,
    KIVI,
    IntactKV,
    Int8,
))

# trained-in schemes: name -> class ("native", plain attention, is the backbone's own layer)
ARCHITECTURES: dict[str, type[ArchitectureScheme]] = registry((
    MQA,
    GQA,
    MLA,
    Linformer,
    Reformer,
    Longformer,
    Beacon,
    RWKV,
))
