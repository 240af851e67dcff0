"""Typed knobs of the memory schemes: declared once, on the dataclass field, and checked once, by the base class.

A scheme declares each knob where it declares the field, with its type and the values it allows::

    window: int = knob(8, int, low=1)
    kernel: int = knob(5, int, low=1, odd=True)
    bits: int | None = knob(None, int, choices=(2, 4), optional=True)

The base classes (``CachePolicy``, and through it the wrappers and the precision schemes; ``ArchitectureScheme``)
call :func:`check_knobs` in ``__post_init__``: a value outside its declaration raises :class:`SchemeError` with
one line, ``"<scheme>: <knob> must be <rule>, got <value>"``. Kinds: ``int`` (a bool is not an int), ``float``
(finite; an int is a valid float), ``str``, ``bool``. ``optional`` lets a knob be None, which always means "set from
``memory_ratio`` by the scheme's ratio rule". Checks that depend on something else than the value (the model's
sizes, another knob) stay in the scheme's code and raise :class:`SchemeError` too.

The registry converts values read from the command line or YAML by the same declaration (:meth:`Knob.hint`), and
``malloc methods`` prints each knob's :meth:`Knob.rule`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from malloc.errors import MallocError

KNOB = "malloc.knob"  # the dataclass field metadata key of a declaration
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class SchemeError(MallocError, ValueError):
    """A bad scheme name or knob: the message names the scheme and the knob."""


def _text(value: Any) -> str:
    """A bound or a choice as a rule prints it: ``1.0`` as ``1``, strings bare."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Knob:
    """What values one knob takes.

    Attributes:
        kind: ``int``, ``float``, ``str`` or ``bool``.
        low, high: inclusive bounds (None: unbounded); ``open_low`` / ``open_high`` make them exclusive.
        choices: the only values allowed (empty: any value of the kind within the bounds).
        optional: None is allowed too (the knob is then set from ``memory_ratio``).
        even, odd: parity of an ``int`` knob.
        why: a reason printed after the rule (e.g. "it is the reference").
    """

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False
    even: bool = False
    odd: bool = False
    why: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TypeError(f"a knob's kind is one of int, float, str, bool, not {self.kind!r}")
        if (self.even or self.odd) and self.kind is not int:
            raise TypeError("only an int knob can be even or odd")
        if self.even and self.odd:
            raise TypeError("a knob cannot be both even and odd")

    def hint(self) -> Any:
        """The type a config value is converted to (:func:`malloc.configio.convert`)."""
        return self.kind | None if self.optional else self.kind

    def _range(self) -> str:
        low, high = self.low, self.high
        if low is not None and high is not None:
            if self.kind is int and not (self.open_low or self.open_high):
                return f"in {_text(low)}..{_text(high)}"
            return f"in {'(' if self.open_low else '['}{_text(low)}, {_text(high)}{')' if self.open_high else ']'}"
        if low is not None:
            return f"{'>' if self.open_low else '>='} {_text(low)}"
        if high is not None:
            return f"{'<' if self.open_high else '<='} {_text(high)}"
        return ""

    def rule(self) -> str:
        """The allowed values in words, e.g. ``"an odd integer >= 1"``, ``"one of 2, 4, or None (set by
        memory_ratio)"``."""
        if len(self.choices) == 1:
            text = _text(self.choices[0])
        elif self.choices:
            shown = sorted(self.choices) if all(isinstance(c, (int, float)) for c in self.choices) else self.choices
            text = "one of " + ", ".join(_text(c) for c in shown)
        else:
            noun = _KINDS[self.kind]
            if self.even or self.odd:
                noun = f"{'an even' if self.even else 'an odd'} integer"
            text = " ".join(part for part in (noun, self._range()) if part)
        if self.why:
            text += f" ({self.why})"
        return text + ", or None (set by memory_ratio)" if self.optional else text

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is of the kind and within the rule."""
        if value is None:
            return self.optional
        if self.kind is bool:
            return isinstance(value, bool) and (not self.choices or value in self.choices)
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if self.kind is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
            return False
        if self.kind is str and not isinstance(value, str):
            return False
        if self.choices and value not in self.choices:
            return False
        if self.low is not None and not (value > self.low if self.open_low else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.open_high else value <= self.high):
            return False
        return not (self.even and value % 2) and not (self.odd and not value % 2)

    def outside(self) -> list[Any]:
        """Values this rule rejects, one per way of breaking it (the wrong kind, None, each bound, the choices, the
        parity): what the bad-knob tests try on every declared knob."""
        found: list[Any] = ["not a number"] if self.kind in (int, float) else [1]
        if self.kind in (int, float):
            found += [True]
        if self.kind is int:
            found += [1.5]
        if self.kind is float:
            found += [math.nan, math.inf]
        if not self.optional:
            found += [None]
        step = 1 if self.kind is int else 0.5
        if self.low is not None:
            found += [self.low if self.open_low else self.low - step]
        if self.high is not None:
            found += [self.high if self.open_high else self.high + step]
        if self.choices:
            numeric = [c for c in self.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            found += [max(numeric) + 1] if numeric else ["no such " + str(self.choices[0])]
        if self.even or self.odd:  # the first value within the bounds, moved by one if it has the right parity
            value = 0 if self.low is None else int(self.low) + int(self.open_low)
            found += [value + 1 if (value % 2 == 0) == self.even else value]
        return [value for value in found if not self.accepts(value)]


def knob(default: Any, kind: type, **rule: Any) -> Any:
    """A dataclass field with ``default`` that carries its :class:`Knob` declaration (``kind`` and ``rule``)."""
    return dataclasses.field(default=default, metadata={KNOB: Knob(kind, **rule)})


def knobs_of(cls: type) -> dict[str, Knob]:
    """The declared knobs of a scheme class (``memory_ratio`` included), in field order."""
    return {f.name: f.metadata[KNOB] for f in dataclasses.fields(cls) if KNOB in f.metadata}


def check_knobs(scheme: Any) -> None:
    """Check every declared knob of ``scheme`` (a scheme dataclass instance) against its declaration.

    Raises:
        SchemeError: ``"<scheme name>: <knob> must be <rule>, got <value>"`` for the first knob out of its rule.
    """
    for name, spec in knobs_of(type(scheme)).items():
        check_value(scheme.name, name, spec, getattr(scheme, name))


def check_value(scheme: str, name: str, spec: Knob, value: Any) -> None:
    """Check one value of the knob ``name`` of ``scheme`` against its declaration ``spec``.

    Raises:
        SchemeError: ``"<scheme>: <name> must be <rule>, got <value>"``.
    """
    if not spec.accepts(value):
        raise SchemeError(f"{scheme}: {name} must be {spec.rule()}, got {value!r}")


__all__ = ["KNOB", "Knob", "SchemeError", "check_knobs", "check_value", "knob", "knobs_of"]
