"""The state store on a real Redis Cluster: the store contract, a user's keys on one slot, clear errors within the
timeouts, and the replay (``malloc serve``) with 2 workers equal to one process, a master lost mid-replay included.

Each cluster is 3 masters without replicas on free loopback ports, created by ``redis-cli --cluster create`` and
stopped at the end (``tests/redis_server.py``); the tests skip, saying why, where redis-server or redis-cli is
missing. The contract tests of ``tests/test_store.py`` run here unchanged, on a cluster URL.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from malloc.cli import main
from malloc.config import load_config
from malloc.runner import load_trained, run
from malloc.serve import ServeError, serve
from malloc.serve.journal import load_checkpoint, read_records
from malloc.serve.requests import build_requests
from malloc.serving.store import StoreError, StoreUnavailable, open_store
from malloc.serving.store.redis_cluster_store import SLOTS, key_slot, slot_tags
from redis_server import cluster_ok, free_port, redis_cluster, redis_server
from test_scheme_matrix import one_thread  # noqa: F401 (autouse fixture, as in test_store.py)
from test_serve import SMOKE, overrides, predictions, quiet

# the store contract of the other backends, unchanged, here on the cluster (through the store_url fixture below)
from test_store import (  # noqa: F401
    test_every_case_round_trips_through_each_backend,
    test_interface,
    test_many_keys_iterate_once_each,
)

# a user's events a month apart on average: users' requests interleave over the whole replay (a user served before a
# checkpoint is often next requested dozens of requests later)
LONG_GAPS = "data.synthetic.mean_gap_seconds=2592000"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(config, results folder)`` of a trained tiny CTR run (as ``tests/test_serve.py`` trains it, with
    :data:`LONG_GAPS`)."""
    results = tmp_path_factory.mktemp("cluster-serve-results")
    cfg = load_config(SMOKE, [*overrides(results), LONG_GAPS])
    run(cfg, show_progress=False)
    return cfg, results


@pytest.fixture(scope="module")
def cluster():
    with redis_cluster() as running:
        yield running


@pytest.fixture()
def store_url(cluster, request) -> str:
    """A fresh namespace on the module's cluster for each test."""
    return f"{cluster.url}?prefix={request.node.name}:"


def node_client(port: int) -> redis.Redis:
    """A plain client of one node (no redirection: a key of another node's slot is answered with MOVED)."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


# -- keys ------------------------------------------------------------------------------------------------------
def test_slot_tags_land_on_their_slots(cluster) -> None:
    tags = slot_tags()
    assert len(tags) == SLOTS == len(set(tags))
    assert all(key_slot(f"x:n:{{{tag}}}") == slot for slot, tag in enumerate(tags))
    with node_client(cluster.ports[0]) as client:  # the server's own hash, on a sample of the slots
        for slot in range(0, SLOTS, 97):
            assert client.cluster("KEYSLOT", f"malloc:n:{{{tags[slot]}}}") == slot
        for key in ("u1", "a}b", "{x", "é/ü 1", "{}", "k" * 400):
            assert client.cluster("KEYSLOT", f"malloc:e:{{{key}}}") == key_slot(f"malloc:e:{{{key}}}")


def test_a_users_keys_live_on_one_slot_and_users_spread_over_every_master(cluster, store_url) -> None:
    users = [f"u{i}" for i in range(60)]
    prefix = store_url.split("prefix=", 1)[1]
    with open_store(store_url) as store:
        for i, user in enumerate(users):
            store.put(user, bytes(i + 1))
        held: dict[int, set[str]] = {}
        for port in cluster.ports:
            with node_client(port) as client:
                held[port] = {raw.decode() for raw in client.scan_iter(match=f"{prefix}*", count=1000)}
        for user in users:
            entry = f"{prefix}e:{{{user}}}"
            total = f"{prefix}n:{{{slot_tags()[key_slot(entry)]}}}"
            owners = [port for port, keys in held.items() if entry in keys]
            assert len(owners) == 1 and total in held[owners[0]], user  # entry and its slot's total: one node
            with node_client(owners[0]) as client:
                assert client.cluster("KEYSLOT", entry) == client.cluster("KEYSLOT", total)
        assert all(any(k.startswith(f"{prefix}e:") for k in keys) for keys in held.values())  # every master
        assert store.nbytes() == sum(range(1, 61)) == sum(store.size(u) for u in users)
        assert sorted(store.keys()) == sorted(users)


def test_a_prefix_with_braces_is_refused(cluster) -> None:
    with pytest.raises(StoreError, match=r"must not contain \{ or \}"):
        open_store(f"{cluster.url}?prefix=a{{b}}:")


# -- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "redis+cluster://", "redis+cluster://host:port", "redis+cluster://127.0.0.1:7000,",
    "redis+cluster://127.0.0.1:7000,:7001", "redis+cluster://127.0.0.1:7000/2", "redis+cluster://127.0.0.1:7000/x",
    "redis+cluster://127.0.0.1:7000?colour=red", "redis+cluster://127.0.0.1:7000?timeout=0",
    "redis+cluster://127.0.0.1:7000?prefix=",
])
def test_bad_cluster_urls_are_one_line(url: str) -> None:
    with pytest.raises(StoreError) as error:
        open_store(url)
    message = str(error.value)
    assert "\n" not in message and repr(url) in message and ("expected" in message or "must" in message)


def test_unreachable_cluster_is_a_clear_error_within_the_timeout() -> None:
    ports = [free_port(), free_port()]  # nothing listens there
    url = f"redis+cluster://user:secret@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}?connect_timeout=1"
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as error:
        open_store(url)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message and "Redis Cluster" in message and str(ports[0]) in message
    assert "secret" not in message and "***" in message


def test_single_server_and_cluster_urls_are_not_mixed_up(cluster) -> None:
    with pytest.raises(StoreError, match=r"is a Redis Cluster node .*redis\+cluster://"):
        open_store(f"redis://127.0.0.1:{cluster.ports[0]}/0")
    with redis_server() as (url, _):
        single = url.replace("redis://", "redis+cluster://").removesuffix("/0")
        with pytest.raises(StoreError, match="not a Redis Cluster"):
            open_store(single)


def test_a_master_stopped_mid_use_is_a_clear_error() -> None:
    """Its users' keys fail at once, the others' are served until the cluster marks it failed (after the node
    timeout, 1 s here): then every key fails, as a cluster that is down."""
    with redis_cluster(3, "--cluster-node-timeout", "1000") as running:
        store = open_store(f"{running.url}?connect_timeout=1&timeout=2")
        users = [f"u{i}" for i in range(30)]
        for user in users:
            store.put(user, b"x")
        lost = running.ports[1]
        with node_client(lost) as client:
            on_lost = {raw.decode()[len("malloc:e:{"):-1] for raw in client.scan_iter(match="malloc:e:*")}
        assert 0 < len(on_lost) < len(users)
        running.stop(1)
        for user in users:
            start = time.monotonic()
            if user in on_lost:
                with pytest.raises(StoreUnavailable) as error:
                    store.get(user)
                assert str(lost) in str(error.value) and "\n" not in str(error.value)
            else:
                assert store.get(user) == b"x"  # the masters still up still answer
            assert time.monotonic() - start < 5
        with pytest.raises(StoreUnavailable):
            store.nbytes()
        with pytest.raises(StoreUnavailable):
            open_store(running.url)
        deadline = time.monotonic() + 30
        while cluster_ok(running.ports[0]):  # the masters up mark the stopped one failed
            assert time.monotonic() < deadline, "the cluster never noticed the stopped master"
            time.sleep(0.1)
        survivor = next(u for u in users if u not in on_lost)
        with pytest.raises(StoreUnavailable, match=r"the Redis Cluster is down .*cluster_state:ok"):
            store.get(survivor)
        store.close()


# -- the replay --------------------------------------------------------------------------------------------------
def test_replay_with_two_workers_on_the_cluster_equals_one_process_on_one_server(trained, cluster) -> None:
    """The same predictions, counts (bytes moved included: both keep an undo log) and store bytes as one process
    on a single redis-server."""
    cfg, _ = trained
    with redis_server() as (single, _):
        one = serve(cfg, quiet(store=single, max_requests=150), show_progress=False)
    url = f"{cluster.url}?prefix=replay:"
    tic = time.monotonic()
    many = serve(cfg, quiet(store=url, workers=2, max_requests=150), show_progress=False)
    assert time.monotonic() - tic < 240  # bounded: 150 requests, 2 processes, 3 masters
    assert np.array_equal(predictions(many)["logit"], predictions(one)["logit"])
    assert many["counts"] == one["counts"] and many["counts"]["requests"] == 150
    assert many["allocator_counts"] == one["allocator_counts"]
    with open_store(url) as store:
        assert store.nbytes() == many["store_bytes"]["final"] == one["store_bytes"]["final"]
        assert len(store) == many["users"]
    with pytest.raises(ServeError, match=r"holds \d+ entries"):  # a fresh replay on a used store: one line
        serve(cfg, quiet(store=url, max_requests=10), show_progress=False)


def at_risk(users: list[int], every: int) -> tuple[int, int, int]:
    """``(cursor, user, margin)``: the checkpoint cursor (a multiple of ``every``) and a user served before it whose
    next request comes the most requests after it (``margin``), in a replay serving ``users`` in order."""
    best = (0, -1, -1)
    for cursor in range(every, len(users), every):
        for user in set(users[:cursor]):
            if user in users[cursor:]:
                margin = users[cursor:].index(user)
                best = max(best, (margin, cursor, user))
    margin, cursor, user = best
    return cursor, user, margin


def test_a_master_lost_mid_replay_fails_in_one_line_and_the_resumed_replay_recomputes(trained, tmp_path, capsys
                                                                                      ) -> None:
    """A master killed mid-replay: ``malloc serve`` exits with status 2 and one line naming the store and the
    master, and writes no result. The master restarted empty (no persistence), ``--resume`` finishes the replay
    from the checkpoint: exactly the entries lost with the master that the rest of the replay needs (written
    before the checkpoint, not rewritten after it, so not in the undo log) are counted as misses and recomputed
    from the event log, and every prediction equals the uninterrupted replay's (within the recompute's float
    tolerance, as for LRU drops): none lost, none silently wrong.

    When and which master: at the checkpoint after which a user already served waits longest for its next request
    (:func:`at_risk`, dozens of requests on this data), the master holding that user's entry; so at least one
    entry the resumed replay needs is lost, with the serving loop far from that user's next request."""
    cfg, results = trained
    every, limit = 10, 150
    whole = serve(cfg, quiet(max_requests=limit), show_progress=False)
    _, view, _ = load_trained(cfg)
    users = build_requests(view, cfg.model.max_len, limit).user.tolist()
    cursor, user, margin = at_risk(users, every)
    assert margin >= 20, "the data has no checkpoint far from a served user's next request"
    out = tmp_path / "replay"
    folder = out / "checkpoints" / "worker-0"
    with redis_cluster() as running:
        with RedisCluster(host="127.0.0.1", port=running.ports[0]) as client:
            def master(u: int) -> int:
                return running.ports.index(client.get_node_from_key(f"malloc:e:{{u{u}}}").port)

            lost = master(user)
            owner = {u: master(u) for u in set(users)}
        url = f"{running.url}?connect_timeout=1&timeout=5"
        command = ["serve", "--config", SMOKE, "--quiet", "--no-anchors", "--threads", "1", "--store", url,
                   "--out", str(out), "--checkpoint-every", str(every), "--max-requests", str(limit),
                   *[x for pair in overrides(results) for x in ("--set", pair)], "--set", LONG_GAPS]
        seen: list[int] = []

        def kill_at_the_checkpoint() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                loaded = load_checkpoint(folder)
                if loaded is not None and loaded[0]["cursor"] >= cursor:
                    running.stop(lost, kill=True)
                    seen.append(loaded[0]["cursor"])
                    return
                time.sleep(0.002)

        watcher = threading.Thread(target=kill_at_the_checkpoint, daemon=True)
        watcher.start()
        start = time.monotonic()
        assert main(command) == 2
        watcher.join(timeout=10)
        assert time.monotonic() - start < 240 and seen == [cursor], f"killed at checkpoint {seen}, not {cursor}"
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("malloc serve: error: store 'redis+cluster://"), err
        assert "Redis Cluster" in err and f"127.0.0.1:{running.ports[lost]}" in err
        assert not (out / "result.json").exists() and not (out / "predictions.npz").exists()
        # what the resumed replay must recompute: users stored at the checkpoint on the lost master, requested
        # again after it, and not rewritten since (a rewritten entry's pre-image is in the undo log, put back)
        header, _ = load_checkpoint(folder)
        final = header["cursor"]
        log = folder / f"undo-{header['epoch']}.log"
        rewritten = {key for key, _ in read_records(log)} if log.is_file() else set()
        needed = {u for u in set(users[:final]) & set(users[final:]) if owner[u] == lost and f"u{u}" not in rewritten}
        assert user in needed
        running.start(lost)
        running.wait_ok()
        assert main([*command, "--resume"]) == 0
    resumed = json.loads((out / "result.json").read_text())
    counts, reference = resumed["counts"], whole["counts"]
    assert counts["requests"] == reference["requests"] == limit
    # a lost entry of a user served before reads as missing: counted with the dropped entries, and recomputed
    assert counts["misses"]["dropped"] - reference["misses"]["dropped"] == len(needed)
    assert counts["recomputes"] == reference["recomputes"] + len(needed)
    assert counts["hits"] == reference["hits"] - len(needed)
    again, first = predictions({"out": str(out)}), predictions(whole)
    assert np.array_equal(again["user"], first["user"]) and np.array_equal(again["event"], first["event"])
    np.testing.assert_allclose(again["logit"], first["logit"], atol=1e-5, rtol=0)


# -- the benchmark ---------------------------------------------------------------------------------------------
def test_benchmark_starts_a_cluster_and_measures_it(benchmark_script, capsys) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server or redis-cli is not installed (make setup installs both with apt-get)")
    argv = ["--backends", "redis-cluster", "--sizes", "4,16", "--repeats", "5", "--warmup", "1", "--lengths", "8",
            "--codec-repeats", "1", "--checksum-mib", "1", "--json"]
    assert benchmark_script("store").main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    store = [r for r in records if r["kind"] == "store"]
    assert [(r["backend"], r["value_kib"]) for r in store] == [("redis-cluster", 4), ("redis-cluster", 16)]
    assert all(0 < r["put_ms_p50"] <= r["put_ms_p99"] and 0 < r["get_ms_p50"] <= r["get_ms_p99"] for r in store)
