"""A real ``redis-server`` for the tests: started on a free loopback port in a temporary folder, stopped after.

No persistence (``--save "" --appendonly no``). Where ``redis-server`` is not installed (``make setup`` installs
it with apt; without apt it cannot), the tests that need it skip, saying why.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

START_TIMEOUT = 10.0


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
            deadline = time.monotonic() + START_TIMEOUT
            while not _answers(port):
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {process.returncode}: "
                                       f"{process.stderr.read().decode(errors='replace')[-500:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {port} within {START_TIMEOUT} s")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0", process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stderr.close()
