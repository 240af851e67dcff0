"""HSTU's attention tiles on this CPU: prefill time against the tile size, and ``torch.compile`` against eager.

- ``--tiles``: one history of ``--length`` random events is prefilled (Native, no gradients, the PyTorch path:
  the C kernel, which has no tiles, turned off) with every layer's ``tile_pairs`` set to each of
  ``--tile-pairs`` in turn, the list run twice; seconds per prefill.
- ``--gathers``: the relative bias of a tile read four ways from random bucket indices (``--shapes``): two
  ``torch.take``, two plain indexings, two ``index_select`` of flat indices, and one ``index_select`` from the joint
  table of every ``position + time`` sum at index ``p * time_buckets + t`` (what ``RelativeBias`` does; the index
  is computed once per forward); microseconds per call, the values checked equal.
- ``--compile``: the relative bias and the fused pointwise attention (``RelativeBias`` then
  ``hstu_attention_fused``, the library's own functions) as one function, eager and compiled by inductor with
  dynamic shapes, on each ``(B, T, S)`` of ``--shapes``: milliseconds per call without gradients (a serving tile),
  and per forward and backward for the ``--train-shape`` (a training step's attention). The compile time is
  printed first.

    python benchmarks/attention_tiles.py --tiles
    python benchmarks/attention_tiles.py --gathers
    python benchmarks/attention_tiles.py --compile
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from _common import int_list
from malloc.heap import retain_freed_memory
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.models.hstu import HSTULayer, RelativeBias, hstu_attention_fused, use_kernels
from malloc.profiling.latency import synthetic_events
from malloc.serving.engine import Engine

HEADS, HEAD_DIM, BUCKETS = 4, 16, 64


def shape_list(text: str) -> list[tuple[int, int, int]]:
    """``"1x256x4096,32x200x200"`` -> ``[(1, 256, 4096), (32, 200, 200)]``."""
    return [tuple(int(x) for x in part.split("x")) for part in text.split(",")]  # type: ignore[misc]


def tiles(args: argparse.Namespace) -> None:
    model = build_model_for(ModelConfig(backbone="hstu"), 10_000).eval()
    use_kernels(model, False)  # tiles are the PyTorch path's
    events = synthetic_events(1, args.length, 10_000, 0)
    engine = Engine(model)
    with torch.no_grad():
        engine.prefill(events.slice(0, min(args.length, 1024)))  # warm-up
        for pairs in args.tile_pairs * 2:
            for layer in model.layers:
                assert isinstance(layer, HSTULayer)
                layer.tile_pairs = pairs
            start = time.perf_counter()
            engine.prefill(events)
            print(f"tile_pairs {pairs:>9,}  prefill of {args.length:,} events  {time.perf_counter() - start:.3f} s",
                  flush=True)


def gather_ways(position: torch.Tensor, time_: torch.Tensor, pos: torch.Tensor, tim: torch.Tensor
                ) -> dict[str, Callable[[], torch.Tensor]]:
    """Four ways to read ``position[pos] + time_[tim]`` (``pos``, ``tim``: ``(B, 1, T, S)`` bucket indices)."""
    shape = pos.shape
    joint = (position[:, None] + time_[None, :]).reshape(-1)
    index = pos * time_.shape[0] + tim  # RelativeBias computes it once per forward
    return {
        "take": lambda: torch.take(position, pos) + torch.take(time_, tim),
        "indexing": lambda: position[pos] + time_[tim],
        "index_select": lambda: (position.index_select(0, pos.view(-1))
                                 + time_.index_select(0, tim.view(-1))).view(shape),
        "joint": lambda: joint.index_select(0, index.view(-1)).view(shape),
    }


def gathers(args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(0)
    position, time_ = torch.randn(BUCKETS, generator=generator), torch.randn(BUCKETS, generator=generator)
    for batch, length, keys in [*args.shapes, args.train_shape]:
        pos, tim = (torch.randint(0, BUCKETS, (batch, 1, length, keys), generator=generator) for _ in range(2))
        ways = gather_ways(position, time_, pos, tim)
        expected = ways["take"]()
        repeats = max(3, int(3e6 // pos.numel()))
        cells = []
        for name, way in ways.items():
            assert torch.equal(way(), expected), name
            cells.append(f"{name} {1e3 * per_call(way, repeats):9.1f} us")
        print(f"B {batch:>3} T {length:>5} S {keys:>6}  " + "  ".join(cells), flush=True)


def attention(bias: RelativeBias, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
              q_time: torch.Tensor, k_pos: torch.Tensor, k_time: torch.Tensor, visible: torch.Tensor
              ) -> torch.Tensor:
    """The bias of ``(B, T)`` queries against ``(B, 1, S)`` keys, then the fused attention: ``(B, H, T, d)``."""
    return hstu_attention_fused(q, k, v, bias(q_pos, q_time, k_pos, k_time), visible, HEAD_DIM ** -0.5, 200.0)


def inputs(batch: int, length: int, keys: int, grad: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, generator=generator, requires_grad=grad)
               for n in (length, keys, keys))
    k_pos = torch.arange(keys).expand(batch, 1, keys)
    q_pos = keys - length + torch.arange(length).expand(batch, length)
    k_time = torch.cumsum(torch.randint(0, 10_000, (batch, 1, keys), generator=generator), dim=2)
    q_time = k_time[:, 0, keys - length:]
    visible = k_pos[:, :, None, :] < q_pos[:, None, :, None]
    return q, k, v, q_pos, q_time, k_pos, k_time, visible


def per_call(call: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return 1e3 * (time.perf_counter() - start) / repeats


def compiled(args: argparse.Namespace) -> None:
    bias = RelativeBias(BUCKETS, BUCKETS)
    eager = lambda *xs: attention(bias, *xs)  # noqa: E731
    fused = torch.compile(eager, dynamic=True)
    start = time.perf_counter()
    with torch.no_grad():
        fused(*inputs(*args.shapes[0], grad=False))
    print(f"compile (first call) {time.perf_counter() - start:.1f} s", flush=True)
    with torch.no_grad():
        for batch, length, keys in args.shapes:
            xs = inputs(batch, length, keys, grad=False)
            repeats = max(3, int(2e7 // (batch * HEADS * length * keys)))
            times = {name: per_call(lambda f=f, xs=xs: f(*xs), repeats)
                     for name, f in (("eager", eager), ("compiled", fused))}
            print(f"no grad  B {batch:>3} T {length:>5} S {keys:>6}  eager {times['eager']:8.3f} ms  "
                  f"compiled {times['compiled']:8.3f} ms", flush=True)
    batch, length, keys = args.train_shape
    xs = inputs(batch, length, keys, grad=True)
    grad = torch.randn(batch, HEADS, length, HEAD_DIM)
    times = {name: per_call(lambda f=f: f(*xs).backward(grad), 5)
             for name, f in (("eager", eager), ("compiled", fused))}
    print(f"fwd+bwd  B {batch:>3} T {length:>5} S {keys:>6}  eager {times['eager']:8.3f} ms  "
          f"compiled {times['compiled']:8.3f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", action="store_true", help="prefill time against tile_pairs")
    parser.add_argument("--gathers", action="store_true", help="four ways to read the bias of a tile")
    parser.add_argument("--compile", action="store_true", help="torch.compile against eager")
    parser.add_argument("--length", type=int, default=4096, help="events prefilled (--tiles)")
    parser.add_argument("--tile-pairs", type=int_list, default=[1 << 14, 1 << 16, 1 << 18, 1 << 20])
    parser.add_argument("--shapes", type=shape_list, default=shape_list("1x256x4096,1x64x1024,1x101x257,1x2x200"),
                        help="BxTxS tiles without gradients (--gathers, --compile)")
    parser.add_argument("--train-shape", type=lambda t: shape_list(t)[0], default=(32, 200, 200),
                        help="BxTxS of the forward and backward (--compile)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not (args.tiles or args.gathers or args.compile):
        parser.error("choose --tiles, --gathers and/or --compile")
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the malloc command runs
    if args.tiles:
        tiles(args)
    if args.gathers:
        gathers(args)
    if args.compile:
        compiled(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
