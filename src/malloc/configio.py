"""Typed loading of nested config dataclasses from YAML files, dicts and ``--set`` overrides.

Precedence is file < overrides: ``from_dict(cls, apply_overrides(load_yaml(path), overrides))``.
Every error a user can cause raises :class:`ConfigError` naming the dotted key (``model.layers``) and what
was expected. Range checks live in each dataclass's ``__post_init__``; a ``ValueError`` raised there is
re-raised as a :class:`ConfigError` prefixed with the dataclass's dotted path.

Supported field types: ``int``, ``float`` (finite only; an int is accepted; a string such as ``"1e-3"``, which
YAML 1.1 reads as a string, is parsed), ``bool`` (strict: only true/false), ``str``, ``pathlib.Path``,
``Literal[...]``, unions such as ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``,
``dict[str, X]``, ``Any`` and nested dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from malloc.errors import MallocError

T = TypeVar("T")


class ConfigError(MallocError, ValueError):
    """A config a user wrote is invalid: unknown key, wrong type, out-of-range value, bad file or override."""


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, checking keys and types.

    Args:
        cls: a dataclass type (frozen or not); nested dataclass fields are built recursively.
        data: the mapping, e.g. parsed YAML. Missing keys take the dataclass defaults.
        where: dotted path of ``data`` inside the top-level config, used in error messages.

    Raises:
        ConfigError: on an unknown or missing key, a value of the wrong type, or a ``ValueError`` raised by
            the dataclass's own validation.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or 'config'}: expected a mapping for {cls.__name__}, got {_describe(data)}"
        )

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(_join(where, str(key)), str(key), list(fields)))

    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(where, name)}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _unknown_key_message(dotted: str, key: str, allowed: list[str]) -> str:
    message = f"unknown key '{dotted}'; allowed keys: {', '.join(allowed) or '(none)'}"
    close = difflib.get_close_matches(key, allowed, n=1)
    return message + (f" (did you mean '{close[0]}'?)" if close else "")


def convert(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it converted (the rules of :func:`from_dict`).

    Raises:
        ConfigError: naming ``where`` and what was expected.
    """
    return _convert(hint, value, where)


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint`` and return it converted (lists to tuples, dicts to
    dataclasses, ...)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        return _convert_literal(args, value, where)
    if origin is Union or origin is types.UnionType:
        return _convert_union(args, value, where)
    if origin in (tuple, list):
        return _convert_sequence(origin, args, value, where)
    if origin is dict:
        return _convert_mapping(args, value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if hint in _SCALARS:
        return _SCALARS[hint](value, where)
    raise TypeError(f"{where}: unsupported config field type {hint!r}")


def _convert_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected an int, got {_describe(value)}")


def _convert_float(value: Any, where: str) -> float:
    """A finite float: NaN and infinities are rejected here, once for every float field (a range check of the
    form ``x <= 0`` lets NaN through)."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{where}: expected a float, got {_describe(value)}")
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _convert_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")


def _convert_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected a string, got {_describe(value)}")


def _convert_path(value: Any, where: str) -> Path:
    if isinstance(value, (str, Path)):
        return Path(value)
    raise ConfigError(f"{where}: expected a path, got {_describe(value)}")


def _convert_none(value: Any, where: str) -> None:
    if value is None:
        return None
    raise ConfigError(f"{where}: expected null, got {_describe(value)}")


_SCALARS = {
    int: _convert_int,
    float: _convert_float,
    bool: _convert_bool,
    str: _convert_str,
    Path: _convert_path,
    type(None): _convert_none,
}


def _convert_literal(allowed: tuple[Any, ...], value: Any, where: str) -> Any:
    # Compare types too, so that True does not pass for Literal[1].
    if any(value == option and type(value) is type(option) for option in allowed):
        return value
    raise ConfigError(f"{where}: expected one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _convert_union(options: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(option, value, where)
        except ConfigError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{where}: {_describe(value)} matches none of: " + "; ".join(errors))


def _convert_sequence(origin: type, args: tuple[Any, ...], value: Any, where: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(
            _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    item_hint = args[0] if args else Any
    items = [_convert(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_mapping(args: tuple[Any, ...], value: Any, where: str) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
    key_hint, value_hint = args if args else (Any, Any)
    return {
        _convert(key_hint, k, f"{where} key {k!r}"): _convert(value_hint, v, _join(where, str(k)))
        for k, v in value.items()
    }


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able form of a config: dataclasses become dicts (fields with ``init=False`` are
    left out, so that ``from_dict(type(c), to_dict(c)) == c``), tuples become lists, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot convert {type(obj).__name__} to a plain config value")


# Values a config may expand to, aliases counted each time they are used: far above any real config, far below what
# hangs hashing (a "billion laughs" document of a few lines expands to billions of values).
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_BYTES = 16 << 20


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (almost always an editing mistake: YAML would
    keep the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """Safe-load YAML, refusing repeated keys, nesting too deep to parse, and a document that expands to more than
    :data:`MAX_CONFIG_VALUES` values.

    YAML aliases share one object, so a short document can stand for an exponentially large config, which
    hashing and printing would expand; it is rejected here, before any use.

    Raises:
        ConfigError: naming ``where``: not valid YAML, a repeated key, too deep, or too large once expanded.
    """
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain values only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {where}{line}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {where}: {' '.join(str(exc).split())}") from exc
    except RecursionError as exc:
        raise ConfigError(f"invalid YAML in {where}: nested too deeply") from exc
    pending, seen = [data], 0
    while pending:
        node = pending.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_CONFIG_VALUES:,} values (nested aliases?)")
        if isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file gives ``{}``).

    Raises:
        ConfigError: if the file is missing, not a regular file, larger than :data:`MAX_CONFIG_BYTES`,
            unreadable, not UTF-8, not valid YAML (:func:`parse_yaml`), or its top level is not a mapping.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" if not path.exists()
                              else f"config file {path} is not a regular file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from exc
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a copy of ``data``.

    Each value is parsed with ``yaml.safe_load`` (``4`` is an int, ``[1, 2]`` a list, ``null`` None). Missing
    intermediate mappings are created; unknown keys are left for :func:`from_dict` to reject by name.

    Raises:
        ConfigError: on an override without ``=``, with an empty key part, with an unparsable value, or that
            descends into a key that holds a non-mapping value.
    """
    result = copy.deepcopy(dict(data))
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        parts = key.strip().split(".")
        if not sep or any(not part for part in parts):
            raise ConfigError(f"malformed override {override!r}: expected key.sub=value")
        value = parse_yaml(raw_value, f"override {override!r}")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {override!r}: '{prefix}' holds {_describe(child)}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return result


def config_hash(obj: Any) -> str:
    """Short stable hash of a config (dataclass or mapping): 8 hex chars of the SHA-256 of the canonical JSON
    of :func:`to_dict` (sorted keys, no whitespace). Key order does not matter; every value does."""
    canonical = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]


__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_hash",
    "convert",
    "from_dict",
    "load_yaml",
    "parse_yaml",
    "to_dict",
]
