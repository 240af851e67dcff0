"""One user's state as bytes and back, exactly, without pickle: the entry format of every state store.

An entry is a fixed prefix, a JSON header and the payload::

    offset  size  field
    0       8     magic b"MALLOCST"
    8       4     format version (uint32, little-endian; FORMAT_VERSION)
    12      4     J: bytes of the JSON header (uint32)
    16      8     P: bytes of the payload (uint64)
    24      4     CRC-32 (zlib) of bytes [0, 24) + the JSON header + the payload
    28      J     JSON header (UTF-8, keys sorted, no spaces)
    28 + J  P     payload: next_position and last_timestamp (int64 each), then every tensor's raw bytes

The payload is exactly the bytes ``UserState.nbytes()`` counts (the two counters are its ``SCALAR_BYTES``), so an
entry is ``state.nbytes() + 28 + J`` bytes. The JSON header holds the byte order, the model identity (a string the
caller passes, e.g. a digest of the checkpoint), the scheme identity (name and knobs, any JSON object), the field
names of every stored class the entry uses (``layout``), and the state's tree: one node per stored layer, where a
stored class is ``{"c": name, "f": [field, ...]}`` (fields in declaration order), a tensor is ``[dtype, shape]``
(its bytes follow in the payload in tree order, depth first), and ints, strings, booleans and None are themselves.
``J`` grows with the number of tensors (about 20 bytes each plus the digits of their shapes), the length of the
two identities and the class names used; :func:`header_bytes` reads it from an entry.

Decoding trusts nothing: it builds only the classes of :data:`STORED_CLASSES` (an explicit registry by name),
checks every field against the class's type hints, never evaluates text and never unpickles. An entry that fails a
check raises, and the caller treats it as a miss (recomputes the state from the event log):

- :class:`~malloc.serving.store.errors.CorruptEntry`: too short, not an entry (magic), lengths that disagree with
  the entry's size (truncated or padded), a checksum mismatch, or a malformed header or tree. CRC-32 detects every
  change of one byte (indeed every error burst of up to 32 bits) and misses other damage with probability
  ``2^-32``, at several times the speed of a cryptographic hash (docs/SERVING.md); it is no defence against a
  deliberate forger, and neither would an unkeyed hash be, since anyone who can write the entry can recompute it;
- :class:`~malloc.serving.store.errors.StaleEntry`: another format version (read before the checksum, since
  another version's layout cannot be checked), another byte order, model or scheme, or a stored class whose
  fields differ from this build's or that this build does not know.

Decoded tensors own their memory (one buffer each): a decoded state keeps alive exactly its ``nbytes()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
import types
import typing
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

from malloc.core.state import LayerState, UserState
from malloc.memory.quant import QuantizedLayer, QuantizedTensor
from malloc.memory.schemes.architecture.rwkv import RecurrentState
from malloc.memory.schemes.sequence.linformer import ProjectionState
from malloc.results import to_jsonable
from malloc.serving.store.errors import CorruptEntry, StaleEntry

FORMAT_VERSION = 1
MAGIC = b"MALLOCST"
# magic, version, JSON header bytes, payload bytes, CRC-32
_PREFIX = struct.Struct("<8sIIQI")
PREFIX_BYTES = _PREFIX.size  # 28
_CHECKED_PREFIX = 24  # the checksum covers the prefix up to itself
_COUNTERS = struct.Struct("<qq")

# The stored-layer formats (every class a scheme stores per layer) and the classes they nest. Decoding builds no
# other class. A new stored format is one more entry here (the round-trip tests cover every registered scheme).
STORED_LAYERS: dict[str, type] = {cls.__name__: cls for cls in (LayerState, QuantizedLayer, ProjectionState,
                                                                 RecurrentState)}
STORED_CLASSES: dict[str, type] = {**STORED_LAYERS, QuantizedTensor.__name__: QuantizedTensor}

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_DIMS = 8


def _fields(cls: type) -> list[str]:
    """The fields a stored class keeps (not those marked ``metadata={"stored": False}``: in-memory helpers)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("stored", True)]


_LAYOUT = {name: _fields(cls) for name, cls in STORED_CLASSES.items()}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in STORED_CLASSES.items()}


def canonical_json(value: Any) -> str:
    """``value`` as compact JSON with sorted keys (tuples as lists): equal identities give equal text."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class EntryIdentity:
    """What an entry must have been written for to be served.

    Attributes:
        model: the model's identity, e.g. a digest of its checkpoint (:func:`~malloc.serving.store.identity.
            model_digest`).
        scheme: the memory scheme's name and knobs, a JSON object (:func:`~malloc.serving.store.identity.
            scheme_identity` builds it from an engine).
    """

    model: str
    scheme: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EntryIdentity.model must be a non-empty string, got {self.model!r}")
        canonical_json(self.scheme)  # fails early on what JSON cannot hold

    @property
    def scheme_json(self) -> str:
        return canonical_json(self.scheme)


@dataclass(frozen=True)
class EntryHeader:
    """What an entry's prefix and JSON header say (read by :func:`read_header`; the identity is not checked).

    Attributes:
        version: format version; model: model identity; scheme: scheme identity (JSON object).
        tensors: ``(dtype name, shape)`` of every tensor, in payload order.
        header_bytes: ``28 + J``; payload_bytes: ``P`` (= the state's ``nbytes()``).
    """

    version: int
    model: str
    scheme: dict[str, Any]
    tensors: list[tuple[str, tuple[int, ...]]]
    header_bytes: int
    payload_bytes: int


# -- encoding --------------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as raw bytes (native order), without a copy where it is already contiguous on CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _encode_node(value: Any, tensors: list[torch.Tensor], layout: dict[str, list[str]], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{where}: tensor dtype {value.dtype} cannot be stored (known: {', '.join(DTYPES)})")
        tensors.append(value)
        return [_DTYPE_NAMES[value.dtype], list(value.shape)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    name = type(value).__name__
    if dataclasses.is_dataclass(value) and STORED_CLASSES.get(name) is type(value):
        layout[name] = _LAYOUT[name]
        return {"c": name, "f": [_encode_node(getattr(value, field), tensors, layout, f"{where}.{field}")
                                 for field in _LAYOUT[name]]}
    raise TypeError(f"{where}: {type(value).__module__}.{type(value).__qualname__} is not a stored class of the "
                    f"state store; register it in STORED_CLASSES (malloc.serving.store.codec)")


def encode(state: UserState, identity: EntryIdentity) -> bytes:
    """The entry of ``state`` for ``identity``: ``state.nbytes()`` payload bytes plus the header (module doc).

    Raises:
        TypeError: a stored layer (or a field of one) that is not a registered stored class, or a tensor dtype
            the format does not know.
    """
    tensors: list[torch.Tensor] = []
    layout: dict[str, list[str]] = {}
    layers = []
    for index, layer in enumerate(state.layers):
        if type(layer).__name__ not in STORED_LAYERS:
            raise TypeError(f"layer {index}: {type(layer).__qualname__} is not a stored-layer class of the state "
                            "store; register it in STORED_LAYERS (malloc.serving.store.codec)")
        layers.append(_encode_node(layer, tensors, layout, f"layer {index}"))
    hidden = _encode_node(state.last_hidden, tensors, layout, "last_hidden")
    header = {"byteorder": sys.byteorder, "layout": layout, "model": identity.model,
              "scheme": json.loads(identity.scheme_json), "state": {"last_hidden": hidden, "layers": layers}}
    text = canonical_json(header).encode("utf-8")
    parts = [memoryview(_COUNTERS.pack(state.next_position, state.last_timestamp))]
    parts += [_tensor_bytes(t) for t in tensors]
    payload_bytes = sum(part.nbytes for part in parts)
    checked = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(text), payload_bytes, 0)[:_CHECKED_PREFIX]
    crc = zlib.crc32(text, zlib.crc32(checked))
    for part in parts:
        crc = zlib.crc32(part, crc)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(text), payload_bytes, crc)
    return b"".join([prefix, text, *parts])


# -- decoding --------------------------------------------------------------------------------------------------
def _parse(data: bytes | bytearray | memoryview) -> tuple[memoryview, dict[str, Any], int]:
    """Check the prefix, lengths, checksum and version; return the entry, its JSON header and where the payload
    starts. Raises CorruptEntry or StaleEntry (module doc)."""
    view = memoryview(data).cast("B")
    if view.nbytes < PREFIX_BYTES:
        raise CorruptEntry(f"state entry of {view.nbytes} B: truncated (an entry has at least {PREFIX_BYTES} B)")
    magic, version, text_bytes, payload_bytes, checksum = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntry(f"not a state entry (starts with {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise StaleEntry(f"state entry of format version {version}; this build reads version {FORMAT_VERSION}")
    expected = PREFIX_BYTES + text_bytes + payload_bytes
    if view.nbytes != expected:
        raise CorruptEntry(f"state entry of {view.nbytes} B, its header says {expected} B "
                           f"({'truncated' if view.nbytes < expected else 'trailing bytes'})")
    if zlib.crc32(view[PREFIX_BYTES:], zlib.crc32(view[:_CHECKED_PREFIX])) != checksum:
        raise CorruptEntry("state entry: checksum mismatch (its bytes were changed after it was written)")
    try:
        header = json.loads(bytes(view[PREFIX_BYTES:PREFIX_BYTES + text_bytes]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry(f"state entry: its header is not UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict) or not {"byteorder", "layout", "model", "scheme", "state"} <= set(header):
        raise CorruptEntry("state entry: its header lacks byteorder, layout, model, scheme or state")
    return view, header, PREFIX_BYTES + text_bytes


def _check_identity(header: dict[str, Any], identity: EntryIdentity) -> None:
    if header["byteorder"] != sys.byteorder:
        raise StaleEntry(f"state entry written on a {header['byteorder']}-endian machine; this one is "
                         f"{sys.byteorder}-endian")
    if header["model"] != identity.model:
        raise StaleEntry(f"state entry of model {str(header['model'])[:40]!r}, expected {identity.model[:40]!r}")
    stored = canonical_json(header["scheme"])
    if stored != identity.scheme_json:
        raise StaleEntry(f"state entry of scheme {stored[:120]}, expected {identity.scheme_json[:120]}")
    layout = header["layout"]
    if not isinstance(layout, dict):
        raise CorruptEntry("state entry: its layout is not an object")
    for name, fields in layout.items():
        if name not in STORED_CLASSES:
            raise StaleEntry(f"state entry uses the stored class {str(name)[:40]!r}, which this build does not know")
        if fields != _LAYOUT[name]:
            raise StaleEntry(f"state entry's {name} has fields {fields}, this build's has {_LAYOUT[name]}")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a decoded field value is of its declared type (the hints of the registered classes only)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint)


class _Reader:
    """Builds the state's tree from the header, taking tensors from the payload in order."""

    def __init__(self, view: memoryview, offset: int, device: torch.device | str | None) -> None:
        self.view, self.offset, self.device = view, offset, device
        self.tensors: list[tuple[str, tuple[int, ...]]] = []

    def tensor(self, node: list[Any], where: str) -> torch.Tensor:
        dtype_name, shape = node
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CorruptEntry(f"state entry: {where}: unknown dtype {str(dtype_name)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CorruptEntry(f"state entry: {where}: bad shape {str(shape)[:60]}")
        dtype = DTYPES[dtype_name]
        size = math.prod(shape) * dtype.itemsize
        if self.offset + size > self.view.nbytes:
            raise CorruptEntry(f"state entry: {where}: its tensors need more bytes than the payload holds")
        self.tensors.append((dtype_name, tuple(shape)))
        if size == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:  # one owned buffer per tensor (a copy of its bytes), so the state keeps alive only what it counts
            tensor = torch.frombuffer(bytearray(self.view[self.offset:self.offset + size]), dtype=dtype).reshape(shape)
        self.offset += size
        return tensor if self.device is None else tensor.to(self.device)

    def node(self, node: Any, where: str) -> Any:
        if isinstance(node, list):
            if len(node) != 2:
                raise CorruptEntry(f"state entry: {where}: a tensor node is [dtype, shape]")
            return self.tensor(node, where)
        if isinstance(node, dict):
            name, values = node.get("c"), node.get("f")
            if (not isinstance(name, str) or name not in STORED_CLASSES or not isinstance(values, list)
                    or len(values) != len(_LAYOUT[name])):
                raise CorruptEntry(f"state entry: {where}: bad class node {str(node)[:60]}")
            hints = _HINTS[name]
            kwargs = {}
            for field, value in zip(_LAYOUT[name], values, strict=True):
                built = self.node(value, f"{where}.{field}")
                if not _conforms(built, hints[field]):
                    raise CorruptEntry(f"state entry: {where}.{field}: {type(built).__name__} where "
                                       f"{hints[field]} is declared")
                kwargs[field] = built
            try:
                return STORED_CLASSES[name](**kwargs)
            except (AssertionError, TypeError, ValueError) as exc:  # a class's own consistency checks
                raise CorruptEntry(f"state entry: {where}: inconsistent {name} ({exc})") from exc
        if node is None or isinstance(node, (bool, int, str, float)):
            return node
        raise CorruptEntry(f"state entry: {where}: unexpected node {str(node)[:60]}")


def decode(data: bytes | bytearray | memoryview, identity: EntryIdentity,
           device: torch.device | str | None = None) -> UserState:
    """The state an entry holds, bit for bit as encoded, if it was written for ``identity``.

    Args:
        data: the entry (:func:`encode`).
        identity: the model and scheme the caller serves; an entry of another one is stale.
        device: where the tensors go (None: the CPU).
    Raises:
        CorruptEntry, StaleEntry: the entry must not be used (module doc); treat it as a miss.
    """
    view, header, start = _parse(data)
    _check_identity(header, identity)
    state = header["state"]
    if not isinstance(state, dict) or not isinstance(state.get("layers"), list) or "last_hidden" not in state:
        raise CorruptEntry("state entry: its tree lacks layers or last_hidden")
    if view.nbytes - start < _COUNTERS.size:
        raise CorruptEntry("state entry: its payload is shorter than the two counters")
    next_position, last_timestamp = _COUNTERS.unpack_from(view, start)
    reader = _Reader(view, start + _COUNTERS.size, device)
    layers = []
    for index, node in enumerate(state["layers"]):
        if not isinstance(node, dict) or not isinstance(node.get("c"), str) or node["c"] not in STORED_LAYERS:
            raise CorruptEntry(f"state entry: layer {index} is not a stored-layer node")
        layers.append(reader.node(node, f"layer {index}"))
    hidden = reader.node(state["last_hidden"], "last_hidden")
    if not isinstance(hidden, torch.Tensor):
        raise CorruptEntry("state entry: last_hidden is not a tensor")
    if reader.offset != view.nbytes:
        raise CorruptEntry(f"state entry: {view.nbytes - reader.offset} payload bytes belong to no tensor")
    return UserState(layers=tuple(layers), last_hidden=hidden, next_position=next_position,
                     last_timestamp=last_timestamp)


def read_header(data: bytes | bytearray | memoryview) -> EntryHeader:
    """An entry's header, checked for corruption (checksum, version) but not against an identity.

    Raises:
        CorruptEntry, StaleEntry: as :func:`decode`, except for the identity checks.
    """
    view, header, start = _parse(data)
    tensors: list[tuple[str, tuple[int, ...]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, list) and len(node) == 2 and isinstance(node[1], list):
            tensors.append((str(node[0]), tuple(node[1])))
        elif isinstance(node, dict):
            for child in node.get("f", ()) if "c" in node else node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    state = header["state"]
    if isinstance(state, dict):
        walk(state.get("layers", []))
        walk(state.get("last_hidden"))
    return EntryHeader(version=FORMAT_VERSION, model=str(header["model"]), scheme=header["scheme"],
                       tensors=tensors, header_bytes=start, payload_bytes=view.nbytes - start)


def header_bytes(data: bytes | bytearray | memoryview) -> int:
    """``28 + J``: the bytes of an entry that are not the state's ``nbytes()`` (read from its prefix, unchecked)."""
    view = memoryview(data).cast("B")
    if view.nbytes < PREFIX_BYTES:
        raise CorruptEntry(f"state entry of {view.nbytes} B: truncated (an entry has at least {PREFIX_BYTES} B)")
    return PREFIX_BYTES + _PREFIX.unpack_from(view)[2]


__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "PREFIX_BYTES",
    "STORED_CLASSES",
    "STORED_LAYERS",
    "EntryHeader",
    "EntryIdentity",
    "canonical_json",
    "decode",
    "encode",
    "header_bytes",
    "read_header",
]
