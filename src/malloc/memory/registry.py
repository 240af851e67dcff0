"""Look up schemes by name, build them from a memory ratio and knobs, and describe them (``malloc methods``).

A :class:`Registry` holds three tables: the training-free cache policies (``schemes.POLICIES``), the trained-in
schemes (``schemes.ARCHITECTURES``) and the wrappers (:data:`WRAPPERS`, policies that take other policies as
fields). :data:`REGISTRY` is the one the package serves; the module functions (:func:`build_policy`,
:func:`build_architecture`, :func:`describe`, ...) use it. :meth:`Registry.with_schemes` returns a copy with more
classes, so a scheme can be served, listed and reported without touching the package's tables (the contributing
test registers the example of CONTRIBUTING.md that way).

A wrapper is built from the *names* of its inner schemes plus one knob dict per inner scheme, so every spec is
plain data (a CLI flag, a YAML entry, a JSON result)::

    build_policy("pyramid", 0.25, inner="h2o", inner_knobs={"window": 8}, beta=20)
    build_policy("compose", 0.125, evict="snapkv", quant="kivi", quant_knobs={"bits": 4})

Knob values are converted by the scheme's declarations (:mod:`malloc.memory.knobs`: ``1`` is a valid float knob, a
float knob is finite) and checked by the scheme class itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from malloc.configio import ConfigError, convert
from malloc.memory.architecture import TRAINED_IN, ArchitectureScheme
from malloc.memory.complexity import Complexity, own_complexity
from malloc.memory.knobs import SchemeError, check_value, knobs_of
from malloc.memory.policy import CachePolicy
from malloc.memory.schemes import ARCHITECTURES, POLICIES, registry
from malloc.memory.wrappers import Compose, Pyramid
from malloc.models import SequentialRecommender, build_model
from malloc.models.config import ModelConfig

TRAINING_FREE = "training-free"
WRAPPER = "wrapper"
RATIO = "memory_ratio"  # every scheme's budget knob, set apart from the others (``--memory-ratio``)


@dataclass(frozen=True)
class SchemeInfo:
    """One row of ``malloc methods``.

    Attributes:
        knobs: every knob (but ``memory_ratio``) with its default; rules: what each knob allows, in words.
        complexity: the formulas the class states (None: it states none, which the tests refuse).
    """

    name: str
    granularity: str
    family: str
    knobs: dict[str, Any]
    summary: str
    rules: dict[str, str] = field(default_factory=dict)
    complexity: Complexity | None = None

    def knob_text(self) -> str:
        """``"window=8: an integer >= 1; kernel=5: an odd integer >= 1"``, or ``"-"`` without knobs."""
        return "; ".join(f"{key}={json.dumps(value, default=str)}" + (f": {self.rules[key]}" if key in self.rules
                                                                      else "")
                         for key, value in self.knobs.items()) or "-"


@dataclass(frozen=True)
class Wrapper:
    """A registered wrapper.

    Attributes:
        cls: its class (its plain knobs are declared on it, as a scheme's).
        build: ``build(registry, memory_ratio, **knobs)`` from inner scheme names and knob dicts.
        schemes: the knobs that name inner schemes or carry their knobs, with their defaults and rules.
    """

    cls: type[CachePolicy]
    build: Callable[..., CachePolicy]
    schemes: dict[str, tuple[Any, str]]


def _plain_knobs(cls: type) -> dict[str, Any]:
    """The declared knobs of ``cls`` but ``memory_ratio``."""
    return {key: spec for key, spec in knobs_of(cls).items() if key != RATIO}


def _knobs(name: str, cls: type, knobs: dict[str, Any], others: tuple[str, ...] = ()) -> dict[str, Any]:
    """``knobs`` checked against the declarations of the scheme class ``cls``: every name a declared knob of it,
    and every value converted to the declared kind by the config rules (:func:`malloc.configio.convert`).

    Args:
        others: knobs handled elsewhere (a wrapper's inner schemes), listed when a knob is unknown.
    Raises:
        SchemeError: an unknown knob (the scheme's knobs listed) or a value of the wrong type, naming the knob.
    """
    declared = _plain_knobs(cls)
    unknown = sorted(set(knobs) - set(declared))
    if unknown:
        allowed = sorted([*declared, *others])
        takes = f"knobs: {', '.join(allowed)}" if allowed else f"{name} takes no knobs"
        raise SchemeError(f"{name}: unknown knob(s) {', '.join(unknown)}; {takes}")
    try:
        return {key: convert(declared[key].hint(), value, f"{name}: knob {key}") for key, value in knobs.items()}
    except ConfigError as exc:
        raise SchemeError(str(exc)) from exc


def _inner(registry: Registry, wrapper: str, field_name: str, name: Any, knobs: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(name, str) or not name:
        raise SchemeError(f"{wrapper}: knob {field_name!r} must name a scheme (one of "
                          f"{', '.join(registry.policies)}), got {name!r}")
    if name in registry.wrappers:
        raise SchemeError(f"{wrapper}: knob {field_name!r} must be a scheme, not the wrapper {name!r}")
    if not isinstance(knobs, dict):
        raise SchemeError(f"{wrapper}: knob {field_name}_knobs must be a mapping of knob -> value, got {knobs!r}")
    return name, knobs


def _build_pyramid(registry: Registry, memory_ratio: float, inner: Any = None, inner_knobs: Any = None,
                   **knobs: Any) -> Pyramid:
    knobs = _knobs("pyramid", Pyramid, knobs, others=("inner", "inner_knobs"))
    name, inner_knobs = _inner(registry, "pyramid", "inner", inner, {} if inner_knobs is None else inner_knobs)
    return Pyramid(memory_ratio=memory_ratio, inner=registry.build_scheme(name, memory_ratio, inner_knobs), **knobs)


def _build_compose(registry: Registry, memory_ratio: float, evict: Any = None, quant: Any = None,
                   evict_knobs: Any = None, quant_knobs: Any = None, **knobs: Any) -> Compose:
    knobs = _knobs("compose", Compose, knobs, others=("evict", "evict_knobs", "quant", "quant_knobs"))
    evict_name, evict_knobs = _inner(registry, "compose", "evict", evict, {} if evict_knobs is None else evict_knobs)
    quant_name, quant_knobs = _inner(registry, "compose", "quant", quant, {} if quant_knobs is None else quant_knobs)
    # the quantizer at its own knobs: built at ratio 1, so unset bits mean its largest (Compose's budget rule)
    return Compose(memory_ratio=memory_ratio, evict=registry.build_scheme(evict_name, memory_ratio, evict_knobs),
                   quant=registry.build_scheme(quant_name, 1.0, quant_knobs), **knobs)


WRAPPERS: dict[str, Wrapper] = {
    "pyramid": Wrapper(Pyramid, _build_pyramid, {
        "inner": (None, "the name of an eviction scheme (required)"),
        "inner_knobs": ({}, "the inner scheme's knobs")}),
    "compose": Wrapper(Compose, _build_compose, {
        "evict": (None, "the name of an eviction scheme (required)"),
        "quant": (None, "the name of a precision scheme (required)"),
        "evict_knobs": ({}, "the eviction scheme's knobs"),
        "quant_knobs": ({}, "the precision scheme's knobs")}),
}


@dataclass(frozen=True)
class Registry:
    """Scheme tables by name, in ``malloc methods`` order: ``policies`` (training-free), ``architectures``
    (trained-in) and ``wrappers``."""

    policies: Mapping[str, type[CachePolicy]]
    architectures: Mapping[str, type[ArchitectureScheme]]
    wrappers: Mapping[str, Wrapper]

    def with_schemes(self, *classes: type) -> Registry:
        """A copy with ``classes`` registered after the others (a trained-in scheme among the architectures, any
        other among the policies); this registry is left as it was.

        Raises:
            ValueError: a class that is no scheme, without a name, or whose name is taken in any table.
        """
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, (CachePolicy, ArchitectureScheme))):
                raise ValueError(f"{cls!r} is not a scheme class (a CachePolicy or an ArchitectureScheme)")
        policies = registry((*self.policies.values(), *[c for c in classes if issubclass(c, CachePolicy)]))
        architectures = registry((*self.architectures.values(),
                                  *[c for c in classes if issubclass(c, ArchitectureScheme)]))
        shared = sorted((set(policies) & set(architectures)) | ((set(policies) | set(architectures))
                                                                & set(self.wrappers)))
        if shared:
            raise ValueError(f"scheme name(s) {', '.join(shared)} registered twice")
        return Registry(policies, architectures, dict(self.wrappers))

    def scheme_names(self) -> list[str]:
        """The registered training-free schemes (not the wrappers), in ``malloc methods`` order."""
        return list(self.policies)

    def wrapper_names(self) -> list[str]:
        return list(self.wrappers)

    def build_scheme(self, name: str, memory_ratio: float, knobs: dict[str, Any]) -> CachePolicy:
        """The training-free scheme ``name`` (not a wrapper) with ``knobs`` checked and converted."""
        if name in self.architectures:
            raise SchemeError(f"{name} is a trained-in scheme: train a model with it (`malloc train --scheme "
                              f"{name}`); training-free policies: {', '.join([*self.policies, *self.wrappers])}")
        if name not in self.policies:
            known = ", ".join([*self.policies, *self.wrappers])
            raise SchemeError(f"unknown scheme {name!r}; known schemes: {known}")
        cls = self.policies[name]
        return cls(memory_ratio=memory_ratio, **_knobs(name, cls, knobs))

    def build_policy(self, name: str, memory_ratio: float = 1.0, **knobs: Any) -> CachePolicy:
        """The policy ``name`` (a scheme or a wrapper) at ``memory_ratio`` with the given knobs.

        Wrapper knobs: ``pyramid``: ``inner`` (a scheme name, required), ``inner_knobs`` (dict), ``beta``;
        ``compose``: ``evict`` and ``quant`` (scheme names, required), ``evict_knobs``, ``quant_knobs`` (dicts).

        Raises:
            SchemeError: unknown name (the known ones are listed), unknown knob, or a bad knob value or ratio (a
                wrapper's ratio is checked by its own declaration before its inner schemes are built).
        """
        cls = self.wrappers[name].cls if name in self.wrappers else self.policies.get(name)
        if cls is None:  # not a training-free name: the error says what it is
            return self.build_scheme(name, memory_ratio, knobs)
        check_value(name, RATIO, knobs_of(cls)[RATIO], memory_ratio)
        if name in self.wrappers:
            return self.wrappers[name].build(self, float(memory_ratio), **knobs)
        return self.build_scheme(name, float(memory_ratio), knobs)

    def build_architecture(self, cfg: ModelConfig) -> ArchitectureScheme | None:
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
        if name not in self.architectures:
            hint = (f"{name} is a training-free policy: evaluate a trained Native model with `malloc eval --scheme "
                    f"{name}`" if name in self.policies or name in self.wrappers
                    else f"unknown trained-in scheme {name!r}")
            raise SchemeError(f"{hint}; trained-in schemes: native, {', '.join(self.architectures)}")
        cls = self.architectures[name]
        knobs = _knobs(name, cls, cfg.knobs)
        if cfg.backbone not in cls.backbones:
            raise SchemeError(f"{name}: does not apply to backbone {cfg.backbone!r} "
                              f"({(cls.__doc__ or name).splitlines()[0]})")
        scheme = cls(memory_ratio=cfg.memory_ratio, **knobs)
        scheme.knob_values(cfg)  # resolves and checks the knobs against the model's sizes
        return scheme

    def build_model_for(self, cfg: ModelConfig, num_items: int) -> SequentialRecommender:
        """The model ``cfg`` describes, its trained-in scheme (``cfg.scheme``, knobs checked) built first.

        Raises:
            SchemeError: as :meth:`build_architecture`.
        """
        return build_model(cfg, num_items, self.build_architecture(cfg))

    def describe(self) -> list[SchemeInfo]:
        """Every registered scheme, then every wrapper: granularity, family, knobs (defaults and rules, from the
        declarations), what it keeps and its complexity formulas."""
        def info(name: str, cls: type, family: str, extra: Mapping[str, tuple[Any, str]] | None = None
                 ) -> SchemeInfo:
            declared = _plain_knobs(cls)
            defaults = {key: default for key, (default, _) in (extra or {}).items()}
            rules = {key: rule for key, (_, rule) in (extra or {}).items()}
            defaults.update({f.name: f.default for f in dataclasses.fields(cls) if f.name in declared})
            rules.update({key: spec.rule() for key, spec in declared.items()})
            return SchemeInfo(name=name, granularity=cls.granularity, family=family, knobs=defaults,
                              summary=cls.summary, rules=rules, complexity=own_complexity(cls))

        return ([info(name, cls, TRAINING_FREE) for name, cls in self.policies.items()]
                + [info(name, cls, TRAINED_IN) for name, cls in self.architectures.items()]
                + [info(name, w.cls, WRAPPER, w.schemes) for name, w in self.wrappers.items()])


REGISTRY = Registry(POLICIES, ARCHITECTURES, WRAPPERS)


def scheme_names() -> list[str]:
    """The registered schemes (not the wrappers), in ``malloc methods`` order."""
    return REGISTRY.scheme_names()


def wrapper_names() -> list[str]:
    return REGISTRY.wrapper_names()


def build_policy(name: str, memory_ratio: float = 1.0, **knobs: Any) -> CachePolicy:
    """:meth:`Registry.build_policy` of :data:`REGISTRY`."""
    return REGISTRY.build_policy(name, memory_ratio, **knobs)


def build_architecture(cfg: ModelConfig) -> ArchitectureScheme | None:
    """:meth:`Registry.build_architecture` of :data:`REGISTRY`."""
    return REGISTRY.build_architecture(cfg)


def build_model_for(cfg: ModelConfig, num_items: int) -> SequentialRecommender:
    """:meth:`Registry.build_model_for` of :data:`REGISTRY`."""
    return REGISTRY.build_model_for(cfg, num_items)


def describe() -> list[SchemeInfo]:
    """:meth:`Registry.describe` of :data:`REGISTRY`."""
    return REGISTRY.describe()
