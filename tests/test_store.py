"""The state store: exact round trips of every scheme's states, unusable entries refused, and every backend.

States are built as ``test_state_storage.py`` builds them (tiny models, a batched write of users of different
lengths with a cold user among them, then a batched append), for every registered training-free scheme and
wrapper and every trained-in scheme on both backbones, and the precision schemes on the trained-in schemes that
store per-event keys and values. Each state is encoded, stored, read back and decoded: every tensor is equal bit
for bit (``torch.equal``, same dtype and shape), the decoded states serve equal scores and retrieval logits
through :class:`~malloc.serving.engine.Engine`, and an entry is ``nbytes()`` plus its header.

The backends are real: SQLite and LMDB files in a temporary folder, and a ``redis-server`` started by the test
on a free loopback port (``tests/redis_server.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from typing import Any

import pytest
import torch

from malloc.core.state import SCALAR_BYTES, UserState
from malloc.memory.registry import build_policy
from malloc.serving.engine import Engine
from malloc.serving.store import (
    CorruptEntry,
    EntryIdentity,
    HotTier,
    StaleEntry,
    StateStore,
    StoreError,
    StoreFull,
    StoreUnavailable,
    decode,
    encode,
    entry_identity,
    header_bytes,
    model_digest,
    open_store,
    persistent_url,
    read_header,
)
from malloc.serving.store.codec import FORMAT_VERSION, PREFIX_BYTES, STORED_CLASSES, canonical_json
from redis_server import free_port, redis_server
from test_architecture_matrix import CASES as ARCHITECTURE_CASES
from test_architecture_matrix import tiny
from test_scheme_matrix import SPECS, one_thread, tiny_model  # noqa: F401 (one_thread: autouse fixture)
from test_state_storage import APPENDED, NUM_ITEMS, PLAIN_KV, PRECISION, RATIO, WRITTEN, bytes_kept_alive, events

MODEL_ID = "test-model"
CANDIDATES = 5


def _cases() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(test id, kind, name, extra) of every state format to round-trip."""
    cases = [(f"{case}-{backbone}", "policy", backbone, {"name": name, "knobs": knobs})
             for backbone in ("hstu", "sasrec") for case, name, knobs in SPECS]
    cases += [(f"{scheme}-{backbone}", "trained", backbone, {"scheme": scheme})
              for scheme, backbone in ARCHITECTURE_CASES]
    cases += [(f"{scheme}+{policy}-{backbone}", "trained", backbone, {"scheme": scheme, "policy": policy})
              for scheme in PLAIN_KV for policy in PRECISION for backbone in ("hstu", "sasrec")]
    return cases


CASES = _cases()
CASE_IDS = [case[0] for case in CASES]
_BUILT: dict[str, tuple[Engine, list[UserState]]] = {}


def built(case_id: str) -> tuple[Engine, list[UserState]]:
    """The engine of a case and its users' states after a write and an append (built once per session)."""
    if case_id not in _BUILT:
        _, kind, backbone, extra = CASES[CASE_IDS.index(case_id)]
        if kind == "policy":
            name = extra["name"]
            policy = build_policy(name, 1.0 if name == "native" else RATIO, **extra["knobs"])
            engine = Engine(tiny_model(backbone), policy, prefill_chunk=16)
        else:
            model = tiny(extra["scheme"], backbone, RATIO).eval()
            policy = build_policy(extra["policy"], 1.0) if "policy" in extra else None
            engine = Engine(model, policy, prefill_chunk=16)
        states = engine.write(events(WRITTEN, seed=0, start=1_500_000_000))
        states = engine.append(states, events(APPENDED, seed=1, start=1_600_000_000))
        _BUILT[case_id] = (engine, states)
    return _BUILT[case_id]


def identity_of(engine: Engine) -> EntryIdentity:
    return entry_identity(engine, MODEL_ID)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal trees: same classes, equal scalars, tensors equal bit for bit with the same dtype and shape."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} != {b.dtype}{b.shape}"
        assert torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b), where
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            if field.metadata.get("stored", True):  # not the in-memory helpers (a dense layer's spare rows)
                assert_same(getattr(a, field.name), getattr(b, field.name), f"{where}.{field.name}")
    elif isinstance(a, tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def header_bound(entry: bytes, identity: EntryIdentity) -> int:
    """The documented bound on an entry's header (docs/SERVING.md): 540 + len(model id) + len(scheme JSON) + 48
    per tensor."""
    tensors = len(read_header(entry).tensors)
    return 540 + len(identity.model) + len(identity.scheme_json) + 48 * tensors


# -- the codec -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASE_IDS)
def test_round_trip_is_exact_and_serves_equal_scores(case):
    engine, states = built(case)
    identity = identity_of(engine)
    decoded = []
    for user, state in enumerate(states):
        entry = encode(state, identity)
        assert len(entry) == state.nbytes() + header_bytes(entry), case
        assert header_bytes(entry) <= header_bound(entry, identity), case
        assert read_header(entry).payload_bytes == state.nbytes()
        back = decode(entry, identity)
        assert_same(state, back, f"{case} user {user}")
        assert back.nbytes() == state.nbytes()
        assert bytes_kept_alive(back) + SCALAR_BYTES == back.nbytes(), f"{case}: decoded tensors share buffers"
        assert encode(back, identity) == entry  # deterministic
        decoded.append(back)
    g = torch.Generator().manual_seed(7)
    items = torch.randint(1, NUM_ITEMS + 1, (len(states), CANDIDATES), generator=g)
    times = torch.full((len(states), CANDIDATES), 1_700_000_000)
    with torch.no_grad():
        assert torch.equal(engine.score(decoded, items, times), engine.score(states, items, times)), case
        assert torch.equal(engine.retrieve(decoded), engine.retrieve(states)), case
        # the decoded states serve further appends as the originals do
        more = events([2, 1, 3, 0], seed=3, start=1_650_000_000)
        assert_same(tuple(engine.append(decoded, more)), tuple(engine.append(states, more)), f"{case} append")


def test_every_stored_class_is_exercised():
    seen = set()

    def walk(obj: Any) -> None:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            seen.add(type(obj).__name__)
            for field in dataclasses.fields(obj):
                walk(getattr(obj, field.name))
        elif isinstance(obj, tuple):
            for item in obj:
                walk(item)

    for case in CASE_IDS:
        for state in built(case)[1]:
            walk(state)
    assert set(STORED_CLASSES) <= seen


def test_other_dtypes_round_trip():
    """bfloat16, float16 and float64 states (the model's ``state_dtype``, and the exactness tests' float64)."""
    base = built("native-hstu")[1][0]
    identity = EntryIdentity(MODEL_ID, {"dtype": "mixed"})
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        layers = tuple(dataclasses.replace(layer, keys=layer.keys.to(dtype), values=layer.values.to(dtype))
                       for layer in base.layers)
        state = dataclasses.replace(base, layers=layers, last_hidden=base.last_hidden.to(dtype))
        back = decode(encode(state, identity), identity)
        assert_same(state, back, str(dtype))


def sealed(entry: bytes, header: dict | None = None, version: int = FORMAT_VERSION, text: bytes | None = None
           ) -> bytes:
    """An entry rebuilt by the documented format with another header (a dict, or raw ``text``) or version: a valid
    checksum over whatever it holds (what a buggy or hostile writer could produce, not a damaged entry)."""
    start = header_bytes(entry)
    if text is None:
        text = entry[PREFIX_BYTES:start] if header is None else canonical_json(header).encode()
    body = entry[start:]
    checked = struct.pack("<8sIIQ", b"MALLOCST", version, len(text), len(body))
    return checked + struct.pack("<I", zlib.crc32(text + body, zlib.crc32(checked))) + text + body


def header_of(entry: bytes) -> dict:
    return json.loads(entry[PREFIX_BYTES:header_bytes(entry)])


@pytest.fixture(scope="module")
def kivi_entry() -> tuple[bytes, EntryIdentity]:
    engine, states = built("kivi-hstu")
    identity = identity_of(engine)
    return encode(states[3], identity), identity


def test_every_flipped_byte_is_refused(kivi_entry):
    """One flipped byte anywhere: corrupt (checksum, magic, lengths), or stale where it hits the version field."""
    entry, identity = kivi_entry
    for position in range(len(entry)):
        damaged = bytearray(entry)
        damaged[position] ^= 0x01
        error = StaleEntry if 8 <= position < 12 else CorruptEntry
        with pytest.raises(error):
            decode(bytes(damaged), identity)


def test_truncated_and_padded_entries_are_corrupt(kivi_entry):
    entry, identity = kivi_entry
    for cut in (0, 1, 20, PREFIX_BYTES, header_bytes(entry), len(entry) - 1):
        with pytest.raises(CorruptEntry, match="truncated"):
            decode(entry[:cut], identity)
    with pytest.raises(CorruptEntry, match="trailing"):
        decode(entry + b"\0", identity)
    with pytest.raises(CorruptEntry, match="not a state entry"):
        decode(b"\x80\x04\x95" + bytes(60), identity)  # a pickle is not an entry


def test_another_version_model_or_scheme_is_stale(kivi_entry):
    entry, identity = kivi_entry
    with pytest.raises(StaleEntry, match="format version 2"):
        decode(sealed(entry, version=FORMAT_VERSION + 1), identity)
    with pytest.raises(StaleEntry, match="model"):
        decode(entry, EntryIdentity("another-model", identity.scheme))
    other_bits = entry_identity(Engine(tiny_model("hstu"), build_policy("kivi", RATIO, bits=2)), MODEL_ID)
    assert other_bits.scheme_json != identity.scheme_json
    with pytest.raises(StaleEntry, match="scheme"):
        decode(entry, other_bits)
    other_scheme = entry_identity(Engine(tiny_model("hstu"), build_policy("int8", 0.5)), MODEL_ID)
    with pytest.raises(StaleEntry, match="scheme"):
        decode(entry, other_scheme)
    # the same policy on the other backbone's model: another model identity (the caller's digest)
    assert model_digest(tiny_model("hstu")) != model_digest(tiny_model("sasrec"))


def test_changed_layout_or_unknown_class_is_stale_and_never_built(kivi_entry):
    entry, identity = kivi_entry
    header = header_of(entry)
    header["layout"]["QuantizedTensor"] = [*header["layout"]["QuantizedTensor"][:-1], "width"]
    with pytest.raises(StaleEntry, match="fields"):
        decode(sealed(entry, header), identity)
    header = header_of(entry)
    header["layout"]["Popen"] = ["args"]
    header["state"]["layers"][0] = {"c": "Popen", "f": ["true"]}
    with pytest.raises(StaleEntry, match="Popen"):
        decode(sealed(entry, header), identity)


def test_malformed_trees_with_valid_checksums_are_corrupt(kivi_entry):
    entry, identity = kivi_entry
    base = header_of(entry)

    def refused(edit) -> None:
        header = header_of(entry)
        edit(header)
        with pytest.raises(CorruptEntry):
            decode(sealed(entry, header), identity)

    layer = base["state"]["layers"][0]["f"]
    assert layer[0]["c"] == "QuantizedTensor" and layer[2][0] == "float32"
    full = layer[2][1][1]  # full-precision events of layer 0
    refused(lambda h: h["state"]["layers"][0]["f"][0]["f"].__setitem__(3, "4"))  # bits: a string, not an int
    refused(lambda h: h["state"]["layers"][0]["f"][0]["f"].__setitem__(5, "diagonal"))  # axis outside its Literal
    refused(lambda h: h["state"]["layers"][0]["f"].__setitem__(6, 1))  # full_first: an int, not a bool
    refused(lambda h: h["state"]["layers"][0]["f"][2].__setitem__(0, "complex64"))  # unknown dtype
    refused(lambda h: h["state"]["layers"][0]["f"][2][1].__setitem__(1, -1))  # negative size
    refused(lambda h: h["state"]["layers"][-1]["f"][2][1].__setitem__(1, full + 1000))  # more than the payload
    refused(lambda h: h["state"]["last_hidden"][1].__setitem__(0, 0))  # payload bytes left over
    refused(lambda h: h["state"].__setitem__("last_hidden", None))
    refused(lambda h: h["state"]["layers"][0].__setitem__("f", []))
    refused(lambda h: h["state"]["layers"].__setitem__(0, ["float32", [1]]))  # a tensor where a layer goes
    refused(lambda h: h.pop("layout"))
    with pytest.raises(CorruptEntry, match="not UTF-8 JSON"):
        decode(sealed(entry, text=b"{not json"), identity)


def test_unregistered_stored_class_cannot_be_encoded():
    @dataclasses.dataclass(frozen=True)
    class Unknown:
        keys: torch.Tensor

        num_tokens = 0

        def nbytes(self) -> int:
            return 0

    state = UserState(layers=(Unknown(torch.zeros(1)),), last_hidden=torch.zeros(0), next_position=0,
                      last_timestamp=0)
    with pytest.raises(TypeError, match="STORED_LAYERS"):
        encode(state, EntryIdentity(MODEL_ID, {}))


def test_unusable_entries_are_counted_as_misses():
    engine, states = built("h2o-sasrec")
    states_store = StateStore(open_store("memory://"), identity_of(engine))
    states_store.put("good", states[0])
    entry = encode(states[2], identity_of(engine))
    states_store.store.put("corrupt", entry[:-1] + bytes([entry[-1] ^ 0xFF]))
    states_store.store.put("stale", encode(states[2], EntryIdentity("old-checkpoint", identity_of(engine).scheme)))
    assert_same(states_store.get("good"), states[0])
    assert states_store.get("corrupt") is None
    assert states_store.get("stale") is None
    assert states_store.get("missing") is None
    assert states_store.hits == 1
    assert dict(states_store.misses) == {"corrupt": 1, "stale": 1, "missing": 1}
    states_store.put("stale", states[2])  # the recomputed state replaces the unusable entry
    assert_same(states_store.get("stale"), states[2])


def test_model_digest_follows_the_weights():
    model = tiny("native", "hstu", 1.0)
    first = model_digest(model)
    assert first == model_digest(tiny("native", "hstu", 1.0))  # same seed, same weights
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert model_digest(model) != first


# -- the backends ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as (url, _):
        yield url


BACKENDS = ["memory", "sqlite", "lmdb", "redis"]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        base = request.getfixturevalue("redis_url")
        return f"{base}?prefix=t{free_port()}:"  # a fresh namespace per test
    return f"{request.param}://{tmp_path}/states.{request.param}"


def test_every_case_round_trips_through_each_backend(store_url):
    with open_store(store_url) as store:
        expected_total = 0
        for case in CASE_IDS:
            engine, states = built(case)
            states_store = StateStore(store, identity_of(engine))
            for user, state in enumerate(states):
                key = f"{case}/{user}"
                expected_total += states_store.put(key, state)
                assert store.size(key) == state.nbytes() + header_bytes(store.get(key))
            for user, state in enumerate(states):
                assert_same(states_store.get(f"{case}/{user}"), state, f"{store_url} {case} user {user}")
        assert store.nbytes() == expected_total
        assert sorted(store.keys()) == sorted(f"{case}/{u}" for case in CASE_IDS for u in range(len(WRITTEN)))
        assert len(store) == len(CASE_IDS) * len(WRITTEN)


def test_interface(store_url):
    with open_store(store_url, max_bytes=1000) as store:
        assert store.get("u") is None and store.size("u") is None and "u" not in store
        store.put("u", b"a" * 300)
        store.put("v", bytearray(b"b" * 200))
        store.put("w", memoryview(b"c" * 100))
        assert (store.get("u"), store.get("v"), store.get("w")) == (b"a" * 300, b"b" * 200, b"c" * 100)
        assert store.nbytes() == 600 and store.size("v") == 200 and "v" in store
        store.put("u", b"d" * 700)  # replacing counts the difference: 900 <= 1000
        assert store.nbytes() == 1000
        with pytest.raises(StoreFull, match="full"):
            store.put("x", b"e")
        with pytest.raises(StoreFull):
            store.put("w", b"f" * 101)
        assert store.get("x") is None and store.get("w") == b"c" * 100 and store.nbytes() == 1000
        assert store.delete("u") and not store.delete("u")
        assert store.nbytes() == 300 and sorted(store.keys()) == ["v", "w"]
        store.put("é/ü 1", b"")  # any UTF-8 key, an empty value
        assert store.get("é/ü 1") == b"" and store.size("é/ü 1") == 0
        for bad in ("", "k" * 401):
            with pytest.raises(StoreError, match="key"):
                store.put(bad, b"x")
    store.close()  # closing twice is allowed
    with pytest.raises(StoreError, match="closed"):
        store.get("v")


def test_many_keys_iterate_once_each(store_url):
    with open_store(store_url) as store:
        for i in range(2500):  # more than one batch of the paged backends
            store.put(f"user{i:05d}", b"x")
        keys = list(store.keys())
        assert len(keys) == 2500 and set(keys) == {f"user{i:05d}" for i in range(2500)}
        assert store.nbytes() == 2500


@pytest.mark.parametrize("backend", ["sqlite", "lmdb"])
def test_embedded_stores_persist_across_reopen(backend, tmp_path):
    engine, states = built("longformer-sasrec")
    identity = identity_of(engine)
    url = f"{backend}://{tmp_path}/states.db" if backend == "sqlite" else persistent_url(tmp_path / "states.db")
    with open_store(url) as store:
        StateStore(store, identity).put("a", states[0])
        StateStore(store, identity).put("b", states[2])
        total = store.nbytes()
    with open_store(url, max_bytes=total) as store:
        assert store.nbytes() == total and sorted(store.keys()) == ["a", "b"]
        assert_same(StateStore(store, identity).get("b"), states[2])
        with pytest.raises(StoreFull):
            store.put("c", b"x")  # the total read back is what the capacity counts
        store.delete("a")
    with open_store(url) as store:
        assert list(store.keys()) == ["b"] and store.nbytes() == total - len(encode(states[0], identity))


def test_two_connections_share_one_sqlite_file(tmp_path):
    url = f"sqlite://{tmp_path}/shared.db"
    with open_store(url) as first, open_store(url) as second:
        first.put("u", b"12345")
        assert second.get("u") == b"12345" and second.nbytes() == 5


def test_hot_tier_keeps_recent_entries_and_writes_through(tmp_path):
    url = f"lmdb://{tmp_path}/states.lmdb"
    with HotTier(open_store(url, max_bytes=2500), capacity=1000) as hot:
        hot.put("a", b"a" * 300)
        hot.put("b", b"b" * 300)
        assert hot.get("a") == b"a" * 300 and (hot.hits, hot.misses) == (1, 0)
        hot.put("c", b"c" * 500)  # 1,100 bytes: "b", the least recently used, leaves memory (not the store)
        assert hot.hot_bytes == 800
        assert hot.get("b") == b"b" * 300 and (hot.hits, hot.misses) == (1, 1)  # read back from the store
        assert hot.hot_bytes == 800  # "b" kept again, "a" out
        hot.put("big", b"x" * 1001)  # larger than the tier: stored, not kept
        assert hot.get("big") == b"x" * 1001 and hot.misses == 2 and hot.hot_bytes == 800
        with pytest.raises(StoreFull):
            hot.put("c", b"c" * 1000)  # the store refuses it: memory keeps the stored value
        assert hot.get("c") == b"c" * 500
        assert hot.delete("c") and hot.get("c") is None and not hot.delete("c")
        assert hot.nbytes() == 1601 and sorted(hot.keys()) == ["a", "b", "big"] and hot.size("a") == 300
    with open_store(url) as warm:  # every write reached the store
        assert warm.get("a") == b"a" * 300 and warm.get("c") is None and warm.nbytes() == 1601


@pytest.mark.parametrize("capacity", [0, -1, True, 1.5])
def test_hot_tier_capacity_must_be_positive_bytes(capacity):
    with pytest.raises(StoreError, match="capacity must be a whole number of bytes > 0"):
        HotTier(open_store("memory://"), capacity)


def test_redis_down_is_a_clear_error_within_the_timeout():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as error:
        open_store(f"redis://127.0.0.1:{port}/0")
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert f"127.0.0.1:{port}" in message and "redis-server" in message and "\n" not in message


@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0?timeout=1&connect_timeout=1",
                                 "redis+cluster://127.0.0.1:{port}?timeout=1&connect_timeout=1"])
def test_silent_server_is_a_clear_error_within_the_timeout(url):
    """A port that accepts connections and never answers (a hung server, or a hung cluster node): the read timeout
    ends the wait."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer"):
            open_store(url.format(port=port))
        assert time.monotonic() - start < 5


def test_redis_stopping_mid_use_is_a_clear_error():
    with redis_server() as (url, process):
        store = open_store(f"{url}?connect_timeout=1&timeout=2")
        store.put("u", b"x")
        process.terminate()
        process.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer"):
            store.get("u")
        assert time.monotonic() - start < 5
        store.close()


def test_redis_server_out_of_memory_is_store_full():
    with redis_server("--maxmemory", "4mb", "--maxmemory-policy", "noeviction") as (url, _), open_store(url) as store:
        value = bytes(1 << 20)
        with pytest.raises(StoreFull, match="maxmemory"):
            for i in range(64):
                store.put(f"u{i}", value)
        assert 0 < store.nbytes() < 64 << 20 and store.nbytes() == sum(store.size(k) for k in store.keys())


def test_redis_store_namespaces_do_not_mix(redis_url):
    with open_store(f"{redis_url}?prefix=a:") as a, open_store(f"{redis_url}?prefix=a*:") as star:
        a.put("k", b"1")
        star.put("k", b"22")
        assert sorted(a.keys()) == ["k"] and sorted(star.keys()) == ["k"]
        assert (a.nbytes(), star.nbytes()) == (1, 2)
        a.delete("k")
        star.delete("k")


@pytest.mark.parametrize("url", [
    "foo://x", "memory://somewhere", "nonsense", "sqlite://", "lmdb://", "redis://", "redis://host:port/0",
    "redis://localhost/zero", "redis://localhost/0?colour=red", "redis://localhost/0?timeout=-1",
    "redis://localhost/0?prefix=",
])
def test_bad_urls_are_one_line(url):
    with pytest.raises(StoreError) as error:
        open_store(url)
    message = str(error.value)
    assert "\n" not in message and repr(url) in message
    assert "expected" in message or "must" in message


def test_redis_password_is_not_shown():
    with pytest.raises(StoreError) as error:
        open_store(f"redis://user:secret@127.0.0.1:{free_port()}/0")
    assert "secret" not in str(error.value) and "***" in str(error.value)


@pytest.mark.parametrize("backend", ["sqlite", "lmdb"])
def test_missing_folder_file_in_place_and_not_a_store(backend, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"{backend}://{tmp_path}/missing/states.db")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is not a folder"):
        open_store(f"{backend}://{tmp_path}/file/states.db")
    with pytest.raises(StoreError, match="is a folder"):
        open_store(f"{backend}://{tmp_path}")
    (tmp_path / "junk.db").write_bytes(b"not a database " * 300)
    with pytest.raises(StoreError, match="not a usable"):
        open_store(f"{backend}://{tmp_path}/junk.db")


READ_ONLY_CHECK = """
import sys
from malloc.serving.store import StoreError, open_store
for url in sys.argv[1:]:
    try:
        open_store(url)
    except StoreError as exc:
        print(exc)
"""


def test_read_only_folder_is_one_line(tmp_path):
    """Root ignores permission bits, so as root the check runs in a subprocess without the capabilities that
    override them (``setpriv``), where a folder of mode 0555 is read-only as for anyone else."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    urls = [f"sqlite://{folder}/states.db", f"lmdb://{folder}/states.lmdb"]
    command = [sys.executable, "-c", READ_ONLY_CHECK, *urls]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a folder read-only")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0 and "setpriv" in result.stderr:
            pytest.skip(f"setpriv cannot drop capabilities here: {result.stderr.strip()[-200:]}")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == len(urls), result.stdout
        for url, line in zip(urls, lines, strict=True):
            assert "cannot write in folder" in line and repr(url) in line
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_new_sqlite_files_get_large_pages(tmp_path):
    with open_store(f"sqlite://{tmp_path}/s.db") as store:
        store.put("u", b"x" * 100_000)
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 65536
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_benchmark_runs(benchmark_script, capsys):
    backends = "memory,sqlite,sqlite-4k,lmdb" + (",redis" if shutil.which("redis-server") else "")
    argv = ["--backends", backends, "--sizes", "4,16", "--repeats", "3", "--warmup", "1", "--lengths", "8,20",
            "--codec-repeats", "2", "--checksum-mib", "1", "--json"]
    assert benchmark_script("store").main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    store = [r for r in records if r["kind"] == "store"]
    codec = [r for r in records if r["kind"] == "codec"]
    assert [(r["backend"], r["value_kib"]) for r in store] == [(b, k) for b in backends.split(",") for k in (4, 16)]
    assert all(0 < r["put_ms_p50"] <= r["put_ms_p99"] and 0 < r["get_ms_p50"] <= r["get_ms_p99"] for r in store)
    assert [(r["scheme"], r["history_len"]) for r in codec] == [(s, n) for s in ("native@1", "kivi@0.25")
                                                                for n in (8, 20)]
    assert [r["checksum"] for r in records if r["kind"] == "checksum"] == ["crc32", "blake2b-128", "sha256"]
    native_8 = codec[0]
    # default model: L=2 layers of H=4 heads of d=16, fp32: n (2 (4 16 2 4 + 12)) + 64 4 (last hidden) + 16
    assert native_8["state_bytes"] == 8 * 2 * (4 * 16 * 2 * 4 + 12) + 64 * 4 + 16
