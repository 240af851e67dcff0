"""Look up schemes by name, build them from a memory ratio and knobs, and describe them (``malloc methods``).

Two tables: the schemes (``schemes.POLICIES``, training-free cache policies) and the wrappers (:data:`WRAPPERS`,
policies that take other policies as fields). A wrapper is built from the *names* of its inner schemes plus
one knob dict per inner scheme, so every spec is plain data (a CLI flag, a YAML entry, a JSON result)::

    build_policy("pyramid", 0.25, inner="h2o", inner_knobs={"window": 8}, beta=20)
    build_policy("compose", 0.125, evict="snapkv", quant="kivi", quant_knobs={"bits": 4})
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from malloc.configio import ConfigError, convert
from malloc.memory.architecture import TRAINED_IN, ArchitectureScheme
from malloc.memory.policy import CachePolicy, SchemeError
from malloc.memory.schemes import ARCHITECTURES, POLICIES
from malloc.memory.wrappers import Compose, Pyramid
from malloc.models import SequentialRecommender, build_model
from malloc.models.config import ModelConfig

TRAINING_FREE = "training-free"
WRAPPER = "wrapper"


@dataclass(frozen=True)
class SchemeInfo:
    """One row of ``malloc methods``."""

    name: str
    granularity: str
    family: str
    knobs: dict[str, Any]
    summary: str


def scheme_names() -> list[str]:
    """The registered schemes (not the wrappers), in ``malloc methods`` order."""
    return list(POLICIES)


def wrapper_names() -> list[str]:
    return list(WRAPPERS)


# knob types a knob value is checked and converted against (as config fields are); others are the scheme's to check
_PLAIN = (int, float, bool, str, int | None, float | None, str | None)


def _knobs(name: str, cls: type, knobs: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``knobs`` checked against the scheme class ``cls``: every name a knob of it, and every value of a plain
    type (int, float, ...) converted by the config rules (a float knob is finite; ``1`` is a valid float).

    Raises:
        SchemeError: an unknown knob (the scheme's knobs listed) or a value of the wrong type, naming the knob.
    """
    allowed = {f.name for f in dataclasses.fields(cls)} - {"memory_ratio", *exclude}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        takes = f"knobs: {', '.join(sorted(allowed))}" if allowed else f"{name} takes no knobs"
        raise SchemeError(f"{name}: unknown knob(s) {', '.join(unknown)}; {takes}")
    hints = typing.get_type_hints(cls)
    converted = dict(knobs)
    for key, value in knobs.items():
        if hints.get(key) in _PLAIN:
            try:
                converted[key] = convert(hints[key], value, f"{name}: knob {key}")
            except ConfigError as exc:
                raise SchemeError(str(exc)) from exc
    return converted


def _build_scheme(name: str, memory_ratio: float, knobs: dict[str, Any]) -> CachePolicy:
    if name in ARCHITECTURES:
        raise SchemeError(f"{name} is a trained-in scheme: train a model with it (`malloc train --scheme {name}`); "
                          f"training-free policies: {', '.join([*POLICIES, *WRAPPERS])}")
    if name not in POLICIES:
        known = ", ".join([*POLICIES, *WRAPPERS])
        raise SchemeError(f"unknown scheme {name!r}; known schemes: {known}")
    cls = POLICIES[name]
    knobs = _knobs(name, cls, knobs)
    try:
        return cls(memory_ratio=memory_ratio, **knobs)
    except SchemeError:
        raise
    except (TypeError, ValueError) as exc:  # a knob of the wrong type or range
        raise SchemeError(f"{name}: bad knob value ({exc})") from exc


def _inner(wrapper: str, field: str, name: Any, knobs: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(name, str) or not name:
        raise SchemeError(f"{wrapper}: knob {field!r} must name a scheme (one of {', '.join(POLICIES)}), "
                          f"got {name!r}")
    if name in WRAPPERS:
        raise SchemeError(f"{wrapper}: knob {field!r} must be a scheme, not the wrapper {name!r}")
    if not isinstance(knobs, dict):
        raise SchemeError(f"{wrapper}: knob {field}_knobs must be a mapping of knob -> value, got {knobs!r}")
    return name, knobs


def _build_pyramid(memory_ratio: float, inner: Any = None, inner_knobs: Any = None, **knobs: Any) -> Pyramid:
    knobs = _knobs("pyramid", Pyramid, knobs, exclude=("inner",))
    name, inner_knobs = _inner("pyramid", "inner", inner, {} if inner_knobs is None else inner_knobs)
    return Pyramid(memory_ratio=memory_ratio, inner=_build_scheme(name, memory_ratio, inner_knobs), **knobs)


def _build_compose(memory_ratio: float, evict: Any = None, quant: Any = None, evict_knobs: Any = None,
                   quant_knobs: Any = None, **knobs: Any) -> Compose:
    knobs = _knobs("compose", Compose, knobs, exclude=("evict", "quant"))
    evict_name, evict_knobs = _inner("compose", "evict", evict, {} if evict_knobs is None else evict_knobs)
    quant_name, quant_knobs = _inner("compose", "quant", quant, {} if quant_knobs is None else quant_knobs)
    # the quantizer at its own knobs: built at ratio 1, so unset bits mean its largest (Compose's budget rule)
    return Compose(memory_ratio=memory_ratio, evict=_build_scheme(evict_name, memory_ratio, evict_knobs),
                   quant=_build_scheme(quant_name, 1.0, quant_knobs), **knobs)


# wrapper name -> (class, builder from names and knob dicts, knobs with their defaults for `malloc methods`)
WRAPPERS: dict[str, tuple[type[CachePolicy], Callable[..., CachePolicy], dict[str, Any]]] = {
    "pyramid": (Pyramid, _build_pyramid, {"inner": None, "inner_knobs": {}, "beta": 20.0}),
    "compose": (Compose, _build_compose, {"evict": None, "quant": None, "evict_knobs": {}, "quant_knobs": {}}),
}


def build_policy(name: str, memory_ratio: float = 1.0, **knobs: Any) -> CachePolicy:
    """The policy ``name`` (a scheme or a wrapper) at ``memory_ratio`` with the given knobs.

    Wrapper knobs: ``pyramid``: ``inner`` (a scheme name, required), ``inner_knobs`` (dict), ``beta``;
    ``compose``: ``evict`` and ``quant`` (scheme names, required), ``evict_knobs``, ``quant_knobs`` (dicts).

    Raises:
        SchemeError: unknown name (the known ones are listed), unknown knob, or a bad knob value or ratio.
    """
    if isinstance(memory_ratio, bool) or not isinstance(memory_ratio, (int, float)):
        raise SchemeError(f"{name}: memory_ratio must be a number in (0, 1], got {memory_ratio!r}")
    if name in WRAPPERS:
        return WRAPPERS[name][1](float(memory_ratio), **knobs)
    return _build_scheme(name, float(memory_ratio), knobs)


def build_architecture(cfg: ModelConfig) -> ArchitectureScheme | None:
    """The trained-in scheme ``cfg.scheme`` at ``cfg.memory_ratio`` with ``cfg.knobs`` (None for "native").

    Raises:
        SchemeError: unknown scheme (the trained-in ones are listed), a training-free policy named as an
            architecture, an unknown knob or a bad knob value, or a backbone the scheme does not apply to.
    """
    name = cfg.scheme
    if name == "native":
        if cfg.memory_ratio != 1.0 or cfg.knobs:
            raise SchemeError("native: takes no memory_ratio below 1 and no knobs (name a scheme with --scheme)")
        return None
    if name not in ARCHITECTURES:
        hint = (f"{name} is a training-free policy: evaluate a trained Native model with `malloc eval --scheme "
                f"{name}`" if name in POLICIES or name in WRAPPERS else f"unknown trained-in scheme {name!r}")
        raise SchemeError(f"{hint}; trained-in schemes: native, {', '.join(ARCHITECTURES)}")
    cls = ARCHITECTURES[name]
    knobs = _knobs(name, cls, cfg.knobs)
    if cfg.backbone not in cls.backbones:
        raise SchemeError(f"{name}: does not apply to backbone {cfg.backbone!r} ({cls.__doc__.splitlines()[0]})")
    try:
        scheme = cls(memory_ratio=cfg.memory_ratio, **knobs)
        scheme.knob_values(cfg)  # resolves and checks the knobs against the model's sizes
    except SchemeError:
        raise
    except (TypeError, ValueError) as exc:
        raise SchemeError(f"{name}: bad knob value ({exc})") from exc
    return scheme


def describe() -> list[SchemeInfo]:
    """Every registered scheme, then every wrapper, with granularity, family, knobs (defaults), what it keeps."""
    rows = [SchemeInfo(name=name, granularity=cls.granularity, family=TRAINING_FREE,
                       knobs={f.name: f.default for f in dataclasses.fields(cls) if f.name != "memory_ratio"},
                       summary=cls.summary)
            for name, cls in POLICIES.items()]
    rows += [SchemeInfo(name=name, granularity=cls.granularity, family=TRAINED_IN,
                        knobs={f.name: f.default for f in dataclasses.fields(cls) if f.name != "memory_ratio"},
                        summary=cls.summary)
             for name, cls in ARCHITECTURES.items()]
    rows += [SchemeInfo(name=name, granularity=cls.granularity, family=WRAPPER, knobs=dict(defaults),
                        summary=cls.summary)
             for name, (cls, _, defaults) in WRAPPERS.items()]
    return rows


def build_model_for(cfg: ModelConfig, num_items: int) -> SequentialRecommender:
    """The model ``cfg`` describes, its trained-in scheme (``cfg.scheme``, knobs checked) built first.

    Raises:
        SchemeError: as :func:`build_architecture`.
    """
    return build_model(cfg, num_items, build_architecture(cfg))
