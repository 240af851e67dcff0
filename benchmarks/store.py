"""State store latency: put and get per backend and value size, and encoding and decoding a real state.

Backends (``--backends``, default all): ``memory``, ``sqlite`` (64 KiB pages, the store's setting),
``sqlite-4k`` (SQLite's default 4 KiB pages, for comparison) and ``lmdb`` (files in ``--dir``, default a new
temporary folder, removed after), ``redis`` (a ``redis-server`` this script starts on a free loopback port
with no persistence and stops after; ``--redis-url`` uses a running one instead) and ``redis-cluster`` (a Redis
Cluster of 3 masters without replicas this script starts likewise, created with ``redis-cli --cluster create``;
``--redis-cluster-url`` uses a running one instead). For each value size
(``--sizes`` in KiB, default 64, 1024, 16384) ``--repeats`` values of random bytes are put under new keys (each
put a new user), then got back in a shuffled order; each call is timed alone (``time.perf_counter``) after
``--warmup`` untimed puts and gets of other keys, and the store is emptied before the next size. p50 and p99
per call, and the throughput at the median (MB/s, 10^6 bytes).

The codec: one user of the default model (HSTU, D=64, 2 layers, 4 heads of 16, float32 state; untrained weights,
random events: what is stored does not depend on them), written through the serving path with Native and with
KIVI at ratio 1/4, at each of ``--lengths`` events; then :func:`~malloc.serving.store.codec.encode` and
:func:`~malloc.serving.store.codec.decode` are timed (``--codec-repeats`` calls each), with the state's
``nbytes()`` and its entry's header bytes.

The checksum: CRC-32 (zlib, the entry format's) against two cryptographic hashes (blake2b-128, sha256) over
``--checksum-mib`` MiB of random bytes, ``--codec-repeats`` calls each: why the format uses CRC-32.

    python benchmarks/store.py                                  # both tables
    python benchmarks/store.py --json > store.jsonl             # one JSON object per point
    python benchmarks/store.py --sizes 64 --repeats 20 --lengths 64 --codec-repeats 3   # smoke test
    python benchmarks/store.py --backends redis,redis-cluster --sizes 4,64,1024 --repeats 300,200,100 \
        --lengths 64 --codec-repeats 3                          # one server against a cluster
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import int_list, table_line
from malloc.device import environment
from malloc.memory.registry import build_model_for, build_policy
from malloc.models import ModelConfig
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine
from malloc.serving.store import (
    EntryIdentity,
    Store,
    StoreError,
    decode,
    encode,
    header_bytes,
    open_store,
    scheme_identity,
)
from malloc.serving.store.sqlite_store import SQLiteStore

BACKENDS = ("memory", "sqlite", "sqlite-4k", "lmdb", "redis", "redis-cluster")
CLUSTER_MASTERS = 3
NUM_ITEMS = 1000
STORE_COLUMNS = [("backend", ""), ("value_kib", "d"), ("put_ms_p50", ".3f"), ("put_ms_p99", ".3f"),
                 ("get_ms_p50", ".3f"), ("get_ms_p99", ".3f"), ("put_mb_s", ".0f"), ("get_mb_s", ".0f"),
                 ("repeats", "d")]
CODEC_COLUMNS = [("scheme", ""), ("history_len", "d"), ("state_bytes", "d"), ("header_bytes", "d"),
                 ("encode_ms_p50", ".3f"), ("encode_ms_p99", ".3f"), ("decode_ms_p50", ".3f"),
                 ("decode_ms_p99", ".3f"), ("repeats", "d")]
CHECKSUM_COLUMNS = [("checksum", ""), ("mib", "d"), ("ms_p50", ".3f"), ("ms_p99", ".3f"), ("mb_s", ".0f"),
                    ("repeats", "d")]
WIDTH = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, among " + ", ".join(BACKENDS))
    parser.add_argument("--sizes", type=int_list, default=[64, 1024, 16384], help="value sizes in KiB")
    parser.add_argument("--repeats", type=int_list, default=[200, 100, 30],
                        help="timed puts (and gets) per size, one number per size or one for all")
    parser.add_argument("--warmup", type=int, default=3, help="untimed puts and gets per size")
    parser.add_argument("--dir", type=Path, default=None, help="folder of the sqlite and lmdb files (default: a "
                        "new temporary folder, removed after)")
    parser.add_argument("--redis-url", default=None, help="a running server (default: start redis-server)")
    parser.add_argument("--redis-cluster-url", default=None, help="a running cluster, redis+cluster://host:port,... "
                        "(default: start one of 3 masters)")
    parser.add_argument("--lengths", type=int_list, default=[1024, 4096], help="history lengths of the codec")
    parser.add_argument("--codec-repeats", type=int, default=20, help="timed encodes (and decodes) per state")
    parser.add_argument("--checksum-mib", type=int, default=4, help="MiB hashed by the checksum comparison")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per point, one per line")
    args = parser.parse_args(argv)
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        parser.error(f"--backends: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(BACKENDS)}")
    if len(args.repeats) == 1:
        args.repeats = args.repeats * len(args.sizes)
    if len(args.repeats) != len(args.sizes):
        parser.error(f"--repeats: give one number, or one per size ({len(args.sizes)}), got {len(args.repeats)}")
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir: {args.dir} is not an existing folder")
    if args.codec_repeats < 1 or args.warmup < 0 or args.checksum_mib < 1:
        parser.error("--codec-repeats and --checksum-mib must be >= 1, --warmup >= 0")
    return args


def percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    values = np.asarray(seconds) * 1e3
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


@contextlib.contextmanager
def local_redis(folder: Path) -> Iterator[str]:
    """A ``redis-server`` on a free 127.0.0.1 port, no persistence, working folder ``folder``; stopped after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("store.py: redis-server is not installed (make setup installs it); "
                         "pass --backends without redis, or --redis-url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                open_store(url).close()
                break
            except StoreError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait(process: subprocess.Popen, ready: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"store.py: {what} did not start (exit status {process.poll()})")
        time.sleep(0.05)


@contextlib.contextmanager
def local_redis_cluster(folder: Path) -> Iterator[str]:
    """A Redis Cluster of :data:`CLUSTER_MASTERS` masters without replicas on free 127.0.0.1 ports (each with its
    own cluster bus port), no persistence, files in ``folder``; created with ``redis-cli --cluster create``, every
    node stopped after."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise SystemExit("store.py: redis-server and redis-cli are needed for a cluster (make setup installs them); "
                         "pass --backends without redis-cluster, or --redis-cluster-url")
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(2 * CLUSTER_MASTERS)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        ports = [sock.getsockname()[1] for sock in sockets]
    nodes = [f"127.0.0.1:{port}" for port in ports[:CLUSTER_MASTERS]]
    processes = []
    try:
        for port, bus in zip(ports[:CLUSTER_MASTERS], ports[CLUSTER_MASTERS:], strict=True):
            processes.append(subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-port",
                 str(bus), "--cluster-config-file", f"nodes-{port}.conf", "--save", "", "--appendonly", "no",
                 "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, process in zip(ports[:CLUSTER_MASTERS], processes, strict=True):
            _wait(process, lambda p=port: subprocess.run([cli, "-p", str(p), "ping"], capture_output=True,
                                                         text=True).stdout.strip() == "PONG", f"redis-server {port}")
        subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port, process in zip(ports[:CLUSTER_MASTERS], processes, strict=True):
            _wait(process, lambda p=port: "cluster_state:ok" in subprocess.run(
                [cli, "-p", str(p), "cluster", "info"], capture_output=True, text=True).stdout,
                f"the cluster (node {port})")
        yield "redis+cluster://" + ",".join(nodes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def store_points(args: argparse.Namespace, folder: Path, redis_url: str | None,
                 cluster_url: str | None = None) -> Iterator[dict[str, Any]]:
    """One point per (backend, size): put and get latency."""
    rng = random.Random(args.seed)
    urls = {"memory": "memory://", "sqlite": f"sqlite://{folder}/bench.db", "lmdb": f"lmdb://{folder}/bench.lmdb",
            "redis": redis_url, "redis-cluster": cluster_url}
    for backend in args.backends:
        if backend == "sqlite-4k":
            url = f"sqlite://{folder}/bench-4k.db"
            opened: Store = SQLiteStore(url, folder / "bench-4k.db", page_size=4096)
        else:
            opened = open_store(urls[backend])
        with opened as store:
            for kib, repeats in zip(args.sizes, args.repeats, strict=True):
                size = kib * 1024
                values = [os.urandom(size) for _ in range(min(repeats, 8))]  # distinct contents, reused
                for i in range(args.warmup):
                    store.put(f"warmup{i}", values[i % len(values)])
                    store.get(f"warmup{i}")
                keys = [f"user{i:06d}" for i in range(repeats)]
                put, get = [], []
                for i, key in enumerate(keys):
                    value = values[i % len(values)]
                    tic = time.perf_counter()
                    store.put(key, value)
                    put.append(time.perf_counter() - tic)
                order = keys[:]
                rng.shuffle(order)
                for key in order:
                    tic = time.perf_counter()
                    got = store.get(key)
                    get.append(time.perf_counter() - tic)
                    assert got is not None and len(got) == size
                for key in [*keys, *(f"warmup{i}" for i in range(args.warmup))]:
                    store.delete(key)
                (put50, put99), (get50, get99) = percentiles(put), percentiles(get)
                yield {"backend": backend, "value_kib": kib, "put_ms_p50": put50, "put_ms_p99": put99,
                       "get_ms_p50": get50, "get_ms_p99": get99, "put_mb_s": size / put50 / 1e3,
                       "get_mb_s": size / get50 / 1e3, "repeats": repeats}


def codec_points(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One point per (scheme, length): encode and decode time of one user's state."""
    cfg = ModelConfig(backbone="hstu", max_len=max(args.lengths), dropout=0.0)
    torch.manual_seed(args.seed)
    model = build_model_for(cfg, NUM_ITEMS)
    for name, ratio in (("native", 1.0), ("kivi", 0.25)):
        engine = Engine(model, build_policy(name, ratio))
        identity = EntryIdentity("benchmark-model", scheme_identity(engine))
        for length in args.lengths:
            (state,) = engine.write(synthetic_events(1, length, NUM_ITEMS, args.seed + length))
            entry = encode(state, identity)
            encode_s, decode_s = [], []
            for _ in range(args.codec_repeats):
                tic = time.perf_counter()
                encode(state, identity)
                encode_s.append(time.perf_counter() - tic)
                tic = time.perf_counter()
                decode(entry, identity)
                decode_s.append(time.perf_counter() - tic)
            (enc50, enc99), (dec50, dec99) = percentiles(encode_s), percentiles(decode_s)
            yield {"scheme": f"{name}@{ratio:g}", "history_len": length, "state_bytes": state.nbytes(),
                   "header_bytes": header_bytes(entry), "encode_ms_p50": enc50, "encode_ms_p99": enc99,
                   "decode_ms_p50": dec50, "decode_ms_p99": dec99, "repeats": args.codec_repeats}


def checksum_points(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One point per checksum: ms per call and MB/s over ``--checksum-mib`` MiB."""
    data = os.urandom(args.checksum_mib << 20)
    functions = {"crc32": lambda: zlib.crc32(data), "blake2b-128": lambda: hashlib.blake2b(data, digest_size=16),
                 "sha256": lambda: hashlib.sha256(data)}
    for name, fn in functions.items():
        seconds = []
        for _ in range(args.codec_repeats):
            tic = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - tic)
        p50, p99 = percentiles(seconds)
        yield {"checksum": name, "mib": args.checksum_mib, "ms_p50": p50, "ms_p99": p99,
               "mb_s": len(data) / p50 / 1e3, "repeats": args.codec_repeats}


def report(kind: str, columns: list[tuple[str, str]], points: Iterator[dict[str, Any]], args: argparse.Namespace,
           env: dict[str, Any]) -> None:
    headers = [name for name, _ in columns]
    if not args.json:
        print(table_line(headers, headers, WIDTH), flush=True)
    for point in points:
        if args.json:
            print(json.dumps({"benchmark": "store", "kind": kind, **point, "warmup": args.warmup, **env}), flush=True)
        else:
            print(table_line([format(point[name], spec) for name, spec in columns], headers, WIDTH), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu")
    with contextlib.ExitStack() as stack:
        folder = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="malloc-store-bench-")))
        redis_url = args.redis_url
        if "redis" in args.backends and redis_url is None:
            redis_url = stack.enter_context(local_redis(folder))
        cluster_url = args.redis_cluster_url
        if "redis-cluster" in args.backends and cluster_url is None:
            cluster_url = stack.enter_context(local_redis_cluster(folder))
        if not args.json:
            print(f"put/get latency per call, files in {folder} (no fsync per commit), values of random bytes")
        report("store", STORE_COLUMNS, store_points(args, folder, redis_url, cluster_url), args, env)
        if not args.json:
            print("\nencode/decode of one user's state (HSTU D=64, L=2, H=4, d=16, float32)")
        report("codec", CODEC_COLUMNS, codec_points(args), args, env)
        if not args.json:
            print(f"\nchecksums over {args.checksum_mib} MiB of random bytes")
        report("checksum", CHECKSUM_COLUMNS, checksum_points(args), args, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
