"""Data-parallel processes started by torchrun: who this process is, and the collectives training and evaluation use.

``torchrun --nproc-per-node N -m malloc train ...`` starts N processes and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`launch_from_environment` reads it: None for a plain process and for a world of one process, which runs
exactly as a plain process. :func:`joined` starts the process group (gloo on a CPU, NCCL on GPUs) with a timeout,
so that a rank that stops answering fails the job instead of hanging it, and yields a :class:`World`: the rank's
share of a batch, sums and gathers of NumPy arrays, and the broadcast from rank 0 of a tree of tensors and plain
values (a resume state, a checkpoint's weights, a result). Rank 0 is the only rank that reads or writes the run
folder; what the others need of it travels by broadcast, so the ranks need no shared file system.

A collective that fails (a rank died, or did not answer within the timeout) raises :class:`DistributedError`: one
line naming this rank and what it was doing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from malloc.errors import MallocError

# seconds a rank waits for the others in one collective before the job fails (MALLOC_DIST_TIMEOUT overrides it)
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_VARIABLE = "MALLOC_DIST_TIMEOUT"
# what the messages of a failed collective hold (gloo raises a plain RuntimeError when a peer dies or times out)
_COLLECTIVE_MARKERS = ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out")


class DistributedError(MallocError):
    """A torchrun job that cannot go on: a malformed launch environment, a process group that does not start, or
    a rank that died or stopped answering."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job: global ``rank`` of ``size`` processes, ``local_rank`` on its
    machine."""

    rank: int
    size: int
    local_rank: int


def launch_from_environment(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun job this process belongs to, or None (no ``WORLD_SIZE``, or a world of one process).

    Raises:
        DistributedError: a variable torchrun sets is missing or out of range (naming it).
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    size = _integer(env, "WORLD_SIZE", 1)
    if size == 1:
        return None
    rank = _integer(env, "RANK", 0)
    local_rank = _integer(env, "LOCAL_RANK", 0)
    if rank >= size:
        raise DistributedError(f"RANK={rank} must be below WORLD_SIZE={size} (set by torchrun)")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise DistributedError(f"{name} is not set: start the job with torchrun (WORLD_SIZE={size} is set)")
    return Launch(rank=rank, size=size, local_rank=local_rank)


def _integer(env: Mapping[str, str], name: str, low: int) -> int:
    text = env.get(name)
    if text is None:
        raise DistributedError(f"{name} is not set: start the job with torchrun (WORLD_SIZE is set)")
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise DistributedError(f"{name} must be an integer >= {low}, got {text!r}")
    return value


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """The collective timeout: ``MALLOC_DIST_TIMEOUT`` seconds if set, else :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        DistributedError: the variable is not a number of seconds > 0.
    """
    env = os.environ if environ is None else environ
    text = env.get(TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise DistributedError(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0, got {text!r}")
    return value


def rank_device(name: str, launch: Launch) -> str:
    """The device name of this rank for a configured ``device``: ``cpu`` stays; ``cuda`` (and ``auto`` where a
    GPU is seen) becomes ``cuda:<LOCAL_RANK>``, one GPU per process.

    Raises:
        DistributedError: a single GPU (``cuda:N``) named for a job of several processes.
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if name not in ("cuda", "auto"):
        raise DistributedError(f"device={name!r} names one GPU for {launch.size} processes: under torchrun use "
                               "device=cuda (each rank takes cuda:<LOCAL_RANK>) or device=cpu")
    return f"cuda:{launch.local_rank}"


@contextlib.contextmanager
def joined(launch: Launch, device: torch.device, timeout: float | None = None) -> Iterator[World]:
    """Join the job's process group for the block: gloo where ``device`` is a CPU, NCCL where it is a GPU;
    ``timeout`` seconds per collective (default :func:`timeout_seconds`). Left (destroyed) on exit.

    Raises:
        DistributedError: the group cannot start (the other ranks never came, or the backend is missing).
    """
    seconds = timeout_seconds() if timeout is None else timeout
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.size,
                                timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {launch.rank} of {launch.size}: the {backend} process group did not start "
                               f"({_first_line(exc)})") from exc
    try:
        yield World(launch, backend, device if backend == "nccl" else torch.device("cpu"), seconds)
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class World:
    """The started process group, as the training loop and the replays use it.

    Attributes:
        launch: this process's rank, the job's size and the local rank.
        backend: "gloo" or "nccl".
        device: where the collectives' tensors live (the CPU for gloo, this rank's GPU for NCCL).
        timeout: seconds a collective waits for the other ranks.
    """

    launch: Launch
    backend: str
    device: torch.device
    timeout: float

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def size(self) -> int:
        return self.launch.size

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that reads and writes the run folder."""
        return self.launch.rank == 0

    def shard(self, count: int) -> tuple[int, int]:
        """``(lo, hi)``: this rank's contiguous share ``lo:hi`` of ``count`` items (the shares of the ranks, in rank
        order, tile ``0:count``; they differ in size by one at most, and a share is empty when ``count`` is below
        the world size)."""
        return count * self.rank // self.size, count * (self.rank + 1) // self.size

    @contextlib.contextmanager
    def guard(self, what: str, only_collectives: bool = False) -> Iterator[None]:
        """Turn a failed collective inside the block into a :class:`DistributedError` naming ``what`` this rank
        was doing. Gloo reports a dead peer or a timeout as a plain ``RuntimeError``: where the block runs other
        code too (a training step, whose backward pass reduces DDP's gradients), ``only_collectives`` converts only
        the errors that come from the process group (:data:`_COLLECTIVE_MARKERS`), and the others (out of memory)
        pass unchanged."""
        try:
            yield
        except RuntimeError as exc:
            if only_collectives and not (isinstance(exc, dist.DistError)
                                         or any(marker in str(exc) for marker in _COLLECTIVE_MARKERS)):
                raise
            raise self._lost(what, exc) from exc

    def _lost(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(f"rank {self.rank} of {self.size}: {what} failed: another rank died or did not "
                                f"answer within {self.timeout:g} s ({_first_line(exc)}); rerun the same command to "
                                "resume from the last checkpoint")

    def all_reduce_sum(self, values: np.ndarray, what: str = "a sum over the ranks") -> np.ndarray:
        """The element-wise sum of every rank's ``values`` (same shape and dtype on every rank), on every rank.

        Arrays that the ranks fill at disjoint positions (zeros elsewhere) are gathered exactly this way."""
        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
        with self.guard(what):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy()

    def all_gather(self, values: np.ndarray, what: str = "a gather over the ranks") -> list[np.ndarray]:
        """Every rank's 1-D ``values`` (the same dtype on every rank, any length), in rank order, on every rank."""
        values = np.ascontiguousarray(values).reshape(-1)
        with self.guard(what):
            length = torch.tensor([len(values)], dtype=torch.int64, device=self.device)
            lengths = [torch.zeros_like(length) for _ in range(self.size)]
            dist.all_gather(lengths, length)
            sizes = [int(n.item()) for n in lengths]
            padded = torch.zeros(max(sizes), dtype=torch.from_numpy(values[:0]).dtype, device=self.device)
            padded[:len(values)] = torch.from_numpy(values).to(self.device)
            parts = [torch.zeros_like(padded) for _ in range(self.size)]
            dist.all_gather(parts, padded)
        return [part[:n].cpu().numpy() for part, n in zip(parts, sizes, strict=True)]

    def broadcast(self, tree: Any, what: str = "a broadcast from rank 0") -> Any:
        """Rank 0's ``tree`` on every rank (the other ranks' argument is ignored): dicts (any keys of plain
        values), lists, tuples, tensors (returned on the CPU), and str, int, float, bool or None leaves, as
        checkpoints hold them. Nothing is unpickled: a JSON skeleton, then each tensor's bytes."""
        tensors: list[torch.Tensor] = []
        header = torch.zeros(0, dtype=torch.uint8)
        if self.is_main:
            skeleton = {"tree": _flatten(tree, tensors),
                        "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors]}
            header = torch.frombuffer(bytearray(json.dumps(skeleton).encode()), dtype=torch.uint8)
        with self.guard(what):
            length = torch.tensor([len(header)], dtype=torch.int64, device=self.device)
            dist.broadcast(length, 0)
            buffer = header.to(self.device) if self.is_main else torch.zeros(int(length.item()), dtype=torch.uint8,
                                                                             device=self.device)
            dist.broadcast(buffer, 0)
            skeleton = json.loads(bytes(buffer.cpu().numpy()).decode())
            received = []
            for index, (dtype, shape) in enumerate(skeleton["tensors"]):
                if self.is_main:
                    tensor = tensors[index].detach().contiguous().to(self.device)
                else:
                    tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                dist.broadcast(tensor, 0)
                received.append(tensor.cpu())
        return _unflatten(skeleton["tree"], received)


def _flatten(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """A JSON form of ``tree``: tensors replaced by their index in ``tensors``, containers tagged by kind."""
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return {"tensor": len(tensors) - 1}
    if isinstance(tree, Mapping):
        return {"dict": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"tuple" if isinstance(tree, tuple) else "list": [_flatten(v, tensors) for v in tree]}
    if isinstance(tree, np.generic):  # a NumPy number in a result
        return {"value": tree.item()}
    if tree is None or isinstance(tree, (str, bool, int, float)):
        return {"value": tree}
    raise TypeError(f"cannot broadcast a {type(tree).__name__}: only tensors and plain values")


def _unflatten(node: dict[str, Any], tensors: list[torch.Tensor]) -> Any:
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, tensors) for v in value]
        return tuple(items) if kind == "tuple" else items
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


__all__ = ["DistributedError", "Launch", "World", "joined", "launch_from_environment", "rank_device",
           "timeout_seconds"]
