"""A real ``redis-server`` for the tests, and a real Redis Cluster: started on free loopback ports in a temporary
folder, stopped after (even when the test fails).

No persistence (``--save "" --appendonly no``). Where ``redis-server`` (or, for a cluster, ``redis-cli``, Debian's
``redis-tools``) is not installed (``make setup`` installs both with apt; without apt it cannot), the tests that
need it skip, saying why.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")
    return False



def wait_until_answering(process: subprocess.Popen, port: int, name: str) -> None:
    """Wait until the server ``process`` answers PING on ``port``; RuntimeError naming ``name`` if it exits first
    (with the end of its stderr) or does not answer within START_TIMEOUT seconds."""
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(port):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: "
                               f"{process.stderr.read().decode(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer on port {port} within {START_TIMEOUT} s")
        time.sleep(0.05)

@contextlib.contextmanager
def redis_server(*options: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``(url, process)`` of a fresh ``redis-server`` on 127.0.0.1 with extra command-line ``options`` (e.g.
    ``--maxmemory 2mb``); skips the test where none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make setup installs it with apt-get; needs Debian's apt as root)")
    with tempfile.TemporaryDirectory(prefix="malloc-redis-") as folder:
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder,
             "--protected-mode", "yes", "--loglevel", "warning", *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until_answering(process, port, "redis-server")
            yield f"redis://127.0.0.1:{port}/0", process
        finally:
            _stop(process)


def cluster_ok(port: int) -> bool:
    """Whether the node on ``port`` reports ``cluster_state:ok``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"CLUSTER INFO\r\n")
        reply = b""
        while b"cluster_state:" not in reply or not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return b"cluster_state:ok" in reply
    return False


def _stop(process: subprocess.Popen) -> None:
    """Stop a server: SIGTERM, then SIGKILL after 10 s; its stderr pipe closed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


@dataclass
class LocalCluster:
    """A Redis Cluster of masters on loopback ports, each with its own cluster bus port and nodes file.

    Attributes:
        ports: ``(M,)`` each master's client port; url: ``redis+cluster://`` naming every master.
        processes: ``(M,)`` each master's process (None while stopped).
        options: extra ``redis-server`` command-line options of every master.
    """

    binary: str
    folder: Path
    ports: list[int]
    bus_ports: list[int]
    processes: list[subprocess.Popen | None] = field(default_factory=list)
    options: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, index: int) -> None:
        """Start master ``index`` (again: same ports and nodes file, so it rejoins as the same node, without its
        data) and wait until it answers."""
        port = self.ports[index]
        process = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(self.bus_ports[index]), "--cluster-config-file", f"nodes-{port}.conf",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder), "--protected-mode", "yes",
             "--loglevel", "warning", *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.processes[index] = process
        wait_until_answering(process, port, f"redis-server (cluster node {port})")

    def stop(self, index: int, kill: bool = False) -> None:
        """Stop master ``index``: SIGTERM (then SIGKILL after 10 s), or at once with SIGKILL (a crash)."""
        process = self.processes[index]
        if process is not None:
            if kill:
                process.kill()
            _stop(process)
            self.processes[index] = None

    def wait_ok(self) -> None:
        """Wait until every running master reports ``cluster_state:ok``."""
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        running = [port for port, process in zip(self.ports, self.processes, strict=True) if process is not None]
        while not all(cluster_ok(port) for port in running):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster on ports {running} did not reach cluster_state:ok within "
                                   f"{CLUSTER_TIMEOUT} s")
            time.sleep(0.1)


@contextlib.contextmanager
def redis_cluster(masters: int = 3, *options: str) -> Iterator[LocalCluster]:
    """A fresh Redis Cluster of ``masters`` masters and no replicas on 127.0.0.1 (``redis-cli --cluster create``),
    every slot served, with extra ``redis-server`` ``options`` (e.g. ``--cluster-node-timeout 1000``); every node
    stopped at the end. Skips the test where redis-server or redis-cli is missing."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        missing = "redis-server" if binary is None else "redis-cli"
        pytest.skip(f"{missing} is not installed (make setup installs redis-server and redis-tools with apt-get; "
                    "needs Debian's apt as root)")
    with tempfile.TemporaryDirectory(prefix="malloc-redis-cluster-") as folder:
        with contextlib.ExitStack() as sockets:  # distinct free ports: held open until all are chosen
            held = [sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    for _ in range(2 * masters)]
            for sock in held:
                sock.bind(("127.0.0.1", 0))
            chosen = [sock.getsockname()[1] for sock in held]
        cluster = LocalCluster(binary, Path(folder), chosen[:masters], chosen[masters:], [None] * masters, options)
        try:
            for index in range(masters):
                cluster.start(index)
            nodes = [f"127.0.0.1:{port}" for port in cluster.ports]
            created = subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0",
                                      "--cluster-yes"], capture_output=True, text=True, timeout=60)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({created.returncode}): "
                                   f"{(created.stdout + created.stderr)[-800:]}")
            cluster.wait_ok()
            yield cluster
        finally:
            for index in range(masters):
                cluster.stop(index)
