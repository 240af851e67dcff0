"""Look up schemes by name, build them from a memory ratio and knobs, and describe them (``malloc methods``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from malloc.memory.policy import CachePolicy, SchemeError
from malloc.memory.schemes import POLICIES

TRAINING_FREE = "training-free"


@dataclass(frozen=True)
class SchemeInfo:
    """One row of ``malloc methods``."""

    name: str
    granularity: str
    family: str
    knobs: dict[str, Any]
    summary: str


def scheme_names() -> list[str]:
    return list(POLICIES)


def build_policy(name: str, memory_ratio: float = 1.0, **knobs: Any) -> CachePolicy:
    """The policy ``name`` at ``memory_ratio`` with the given knobs.

    Raises:
        SchemeError: unknown name (the known ones are listed), unknown knob, or a bad knob value.
    """
    if name not in POLICIES:
        raise SchemeError(f"unknown scheme {name!r}; known schemes: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        raise SchemeError(f"{name}: unknown knob(s) {', '.join(unknown)}; knobs: {', '.join(sorted(allowed))}")
    return cls(memory_ratio=memory_ratio, **knobs)


def describe() -> list[SchemeInfo]:
    """Every registered scheme with its granularity, family, knobs (defaults) and what it keeps."""
    return [SchemeInfo(name=name, granularity=cls.granularity, family=TRAINING_FREE,
                       knobs={f.name: f.default for f in dataclasses.fields(cls) if f.name != "memory_ratio"},
                       summary=cls.summary)
            for name, cls in POLICIES.items()]
