"""HSTU's C attention kernel (``malloc.kernels.hstu``) equals the PyTorch reference (``hstu_attention``, the
oracle) to 1e-5 in float32: alone over the shapes, heads, masks and scales the model hands it, and inside every
HSTU scheme served through the engine. Plus its build (cache, fallback without a compiler) and its bad input."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from malloc.core.tokens import KVBlock, KVRows
from malloc.kernels import build
from malloc.kernels import hstu as kernel
from malloc.memory.registry import WRAPPERS, build_model_for, build_policy, scheme_names
from malloc.memory.schemes import POLICIES
from malloc.models import ModelConfig
from malloc.models.hstu import RelativeBias, bucket_thresholds, hstu_attention, log_bucket, use_kernels
from malloc.models.macs import count_flops
from malloc.profiling.latency import synthetic_events, synthetic_training_batch
from malloc.serving.engine import Engine

pytestmark = pytest.mark.skipif(not kernel.available(), reason="no C compiler here: the kernel is not built")


@pytest.mark.parametrize(("scale", "buckets"), [(4, 64), (2, 64), (2, 16), (4, 300)])
def test_bucket_thresholds_give_log_bucket_exactly(scale, buckets):
    thresholds = bucket_thresholds(scale, buckets)
    g = torch.Generator().manual_seed(buckets)
    near = thresholds[thresholds < (1 << 62)]
    distances = torch.cat([torch.arange(100_000), torch.randint(0, 1 << 40, (200_000,), generator=g),
                           (near[:, None] + torch.arange(-3, 4)).flatten().clamp(min=0)])
    from_thresholds = torch.searchsorted(thresholds, distances, right=True) - 1
    assert torch.equal(from_thresholds, log_bucket(distances, scale, buckets))


def reference(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached, key_scale, bias, alpha, normaliser,
              window=-1, num_globals=0):
    """The model's reference for the same call: the mask rule of ``malloc.core.tokens.visibility``, and with
    ``window >= 0`` Longformer's (``malloc.memory.schemes.token_merge.longformer.window_mask``)."""
    batch, heads, length, _ = q.shape
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    meta = heads // k_pos.shape[1]
    k_pos, k_time, k_valid = (x.repeat_interleave(meta, dim=1) for x in (k_pos, k_time, k_valid))
    visible = k_valid[:, :, None, :] & (k_pos[:, :, None, :] < q_pos[:, None, :, None])
    if window >= 0:
        visible &= (k_pos[:, :, None, :] >= q_pos[:, None, :, None] - window) | (k_pos[:, :, None, :] < num_globals)
    visible[:, :, torch.arange(length), cached + torch.arange(length)] = True
    scale = None
    if key_scale is not None:
        scale = torch.ones(batch, 1, 1, k.shape[2])
        scale[:, :, :, :cached] = key_scale[:, None, None, None]
    out, _ = hstu_attention(q, k, v, bias(q_pos, q_time, k_pos, k_time), visible, alpha, normaliser, scale)
    return out.transpose(1, 2)


def case(seed, *, batch=3, heads=4, key_heads=4, meta_heads=1, length=9, cached=30, key_dim=16, value_dim=16,
         sorted_keys=True, candidates=0, huge_times=False):
    """Random inputs of one kernel call: histories in time order (or shuffled), padding, candidates sharing a
    position and a time at the end of the new tokens."""
    g = torch.Generator().manual_seed(seed)
    width = cached + length
    q = torch.randn(batch, heads, length, key_dim, generator=g)
    k = torch.randn(batch, key_heads, width, key_dim, generator=g)
    v = torch.randn(batch, key_heads, width, value_dim, generator=g)
    step = 1 << 33 if huge_times else 5000
    positions = torch.arange(width).repeat(batch, meta_heads, 1)
    times = torch.randint(0, step, (batch, meta_heads, width), generator=g).cumsum(-1)
    if not sorted_keys:
        order = torch.randperm(cached, generator=g)
        positions[..., :cached], times[..., :cached] = positions[..., order], times[..., order]
    valid = torch.rand(batch, meta_heads, width, generator=g) > 0.2
    q_pos, q_time = positions[:, 0, cached:].clone(), times[:, 0, cached:].clone()
    if candidates:  # the last new tokens: candidates at one position and time, never history
        q_pos[:, -candidates:] = q_pos[:, -candidates - 1:-candidates] + 1
        q_time[:, -candidates:] = q_time[:, -candidates - 1:-candidates] + 7
        valid[..., -candidates:] = False
    # the new keys are the queries' tokens: their metadata, and one validity (is history) for every head
    positions[..., cached:], times[..., cached:] = q_pos[:, None], q_time[:, None]
    valid[..., cached:] = valid[:, :1, cached:]
    return q, k, v, q_pos, q_time, positions, times, valid


def split(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached):
    """A :func:`case` as the kernel takes it: the stored keys (or None) apart from the new tokens'."""
    stored = None if cached == 0 else KVBlock(*(x[:, :, :cached] for x in (k, v, k_pos, k_time, k_valid)))
    return (q, k[:, :, cached:], v[:, :, cached:], q_pos, q_time, k_valid[:, 0, cached:]), stored


def run_kernel(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached, key_scale, tables, alpha, normaliser,
               window=-1, num_globals=0):
    """The kernel on a :func:`case`'s joined arguments (the reference's)."""
    args, stored = split(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached)
    return kernel.pointwise_attention(*args, tables, alpha, normaliser, cached=stored, key_scale=key_scale,
                                      window=window, num_globals=num_globals)


def relative_bias(seed, pos_buckets=64, time_buckets=64):
    bias = RelativeBias(pos_buckets, time_buckets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias.position_bias.copy_(torch.randn(pos_buckets, generator=g))
        bias.time_bias.copy_(torch.randn(time_buckets, generator=g))
    return bias


CASES = {
    "plain": {},
    "no-cache": {"cached": 0, "length": 17},
    "gqa": {"key_heads": 2},
    "mqa": {"key_heads": 1},
    "per-head-metadata": {"meta_heads": 4},
    "per-group-metadata": {"key_heads": 2, "meta_heads": 2},
    "shuffled-history": {"sorted_keys": False},
    "candidates": {"candidates": 5, "length": 8},
    "huge-times": {"huge_times": True},
    "odd-widths": {"key_dim": 5, "value_dim": 3},
    "wide-values": {"key_dim": 8, "value_dim": 24},
    "long": {"cached": 700, "length": 40, "batch": 2},
}


def few_queries(name: str, length: int = 3) -> dict:
    """A case with ``length`` (at most 8) new tokens: the kernel reads such keys in place instead of a transposed
    copy, up to 4 queries at a time (7: a tile of 4 and one of 3)."""
    spec = {**CASES[name], "length": length}
    if "candidates" in spec:
        spec["candidates"] = 2
    return spec


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("few", [0, 3, 7], ids=["many-queries", "3-queries", "7-queries"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_reference(name, few, scaled):
    q, k, v, q_pos, q_time, k_pos, k_time, k_valid = case(len(name), **(few_queries(name, few) if few else CASES[name]))
    cached = k.shape[2] - q.shape[2]
    key_scale = torch.rand(q.shape[0]) * 3 if scaled and cached else None
    bias = relative_bias(len(name), 64, 32)
    with torch.no_grad():
        expected = reference(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached, key_scale, bias, 0.3, 50.0)
        got = run_kernel(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached, key_scale, bias.tables(), 0.3,
                         50.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# Longformer's sliding window (window, globals) on some cases: "long" has whole blocks of 256 keys outside it
WINDOWED = {"plain": (12, 3), "per-head-metadata": (5, 0), "candidates": (4, 2), "shuffled-history": (9, 1),
            "long": (100, 2)}


@pytest.mark.parametrize("few", [0, 3, 7], ids=["many-queries", "3-queries", "7-queries"])
@pytest.mark.parametrize("name", list(WINDOWED))
def test_kernel_applies_a_sliding_window_as_the_reference(name, few):
    q, k, v, q_pos, q_time, k_pos, k_time, k_valid = case(len(name), **(few_queries(name, few) if few else CASES[name]))
    cached = k.shape[2] - q.shape[2]
    bias = relative_bias(len(name), 64, 32)
    args = (q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached, None)
    with torch.no_grad():
        expected = reference(*args, bias, 0.3, 50.0, *WINDOWED[name])
        got = run_kernel(*args, bias.tables(), 0.3, 50.0, *WINDOWED[name])
        unwindowed = run_kernel(*args, bias.tables(), 0.3, 50.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, unwindowed, atol=1e-3)  # the window hides keys these queries would see


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_gradients_equal_the_reference(name):
    """q, keys, values and both bias tables, for a random output gradient. The reference runs in float64: a bias
    gradient sums one term per (query, key, head), and on the "long" case the float32 reference's own rounding is
    larger than the tolerance, while the kernel sums them in float64."""
    check_gradients(name, -1, 0)


@pytest.mark.parametrize("name", list(WINDOWED))
def test_kernel_gradients_within_a_sliding_window_equal_the_reference(name):
    check_gradients(name, *WINDOWED[name])


def check_gradients(name, window, num_globals):
    q, k, v, q_pos, q_time, k_pos, k_time, k_valid = case(len(name) + 1, **CASES[name])
    cached = k.shape[2] - q.shape[2]
    key_scale = torch.rand(q.shape[0]) * 3 if cached else None
    grads = []
    for dtype in (torch.float64, torch.float32):
        bias = relative_bias(len(name), 64, 32).to(dtype)
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        scale = None if key_scale is None else key_scale.to(dtype)
        args = (*leaves, q_pos, q_time, k_pos, k_time, k_valid, cached, scale)
        out = (reference(*args, bias, 0.3, 50.0, window, num_globals) if dtype == torch.float64
               else run_kernel(*args, bias.tables(), 0.3, 50.0, window, num_globals))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype))
        grads.append([x.grad.float() for x in leaves] + [bias.position_bias.grad.float(), bias.time_bias.grad.float()])
    for expected, got, what in zip(*grads, ["q", "keys", "values", "position bias", "time bias"], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("scheme", ["native", "mqa", "mla", "longformer"])
def test_a_training_step_through_the_kernel_equals_pytorch_alone(scheme):
    """Loss and every parameter's gradient of a click loss over a batch of windows (the last rows padded),
    kernel on against PyTorch alone; dropout off so that both see the same network. MLA runs the kernel on its
    latents (one shared head read as keys and as values); Longformer with its sliding window (14 events and 2
    globals at this size, within windows of 50)."""
    cfg = ModelConfig(backbone="hstu", dim=16, layers=2, heads=4, head_dim=8, max_len=64, dropout=0.0,
                      scheme=scheme, memory_ratio=1.0 if scheme == "native" else 0.25)
    torch.manual_seed(0)
    model = build_model_for(cfg, 40).train()
    batch = synthetic_training_batch(4, 50, 40, seed=3)
    batch.tokens.valid[2:, 41:] = False  # padding at the end of two windows
    batch.tokens.is_history &= batch.tokens.valid
    results = []
    for enabled in (True, False):
        use_kernels(model, enabled)
        model.zero_grad()
        with profile() as profiler:
            hidden = model(batch.tokens)
        ran = any(event.name == "malloc::hstu_pointwise_attention" for event in profiler.events())
        assert ran == enabled
        valid = batch.tokens.valid
        loss = F.binary_cross_entropy_with_logits(model.ctr_logits(hidden, batch.tokens.items)[valid],
                                                  batch.labels[valid])
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                         if p.grad is not None}))
    (fast_loss, fast), (slow_loss, slow) = results
    torch.testing.assert_close(fast_loss, slow_loss, atol=1e-6, rtol=1e-6)
    assert fast.keys() == slow.keys() and any("time_bias" in name for name in fast)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("cached", "length", "batch"), [(2048, 256, 2), (4096, 7, 5)],
                         ids=["transposed-keys", "keys-in-place"])
def test_kernel_splits_rows_over_threads_with_the_same_outputs(cached, length, batch):
    q, k, v, q_pos, q_time, k_pos, k_time, k_valid = case(3, cached=cached, length=length, batch=batch)
    assert batch * length * (cached + length) * 4 >= 2 * kernel.PARALLEL_MIN_WORK  # large enough to split
    bias = relative_bias(3)
    args = (q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached, None, bias.tables(), 0.25, 64.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run_kernel(*args)
        torch.set_num_threads(3)
        threaded = run_kernel(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(threaded, alone)


def test_kernel_counts_as_the_reference_products_in_the_flop_counter():
    q, k, v, q_pos, q_time, k_pos, k_time, k_valid = case(4)
    bias = relative_bias(4)
    flops = count_flops(lambda: run_kernel(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, 30, None, bias.tables(),
                                           0.25, 64.0))
    batch, heads, length, key_dim = q.shape
    assert flops == 2 * batch * heads * length * k.shape[2] * (key_dim + v.shape[3])


def test_kernel_refuses_a_scale_per_key_instead_of_per_user():
    (q, *new), stored = split(*case(7, cached=29), 29)
    with pytest.raises(ValueError, match=r"key_scale: expected a CPU floating tensor of shape \(3,\)"):
        kernel.pointwise_attention(q, *new, relative_bias(7).tables(), 0.25, 64.0, cached=stored,
                                   key_scale=torch.ones(3, 29))


@pytest.mark.parametrize(("argument", "change", "message"), [
    ("q", lambda a: a.double(), "q: expected a CPU torch.float32 tensor"),
    ("query_pos", lambda a: a.int(), "query_pos: expected a CPU torch.int64 tensor"),
    ("is_history", lambda a: a.long(), "is_history: expected a CPU torch.bool tensor"),
    ("new_keys", lambda a: a[:, :, 1:], "new_keys: expected a CPU torch.float32 tensor of shape"),
    ("cached.keys", lambda a: a[:, :, 1:], r"cached.keys: expected .* shape \(3, 4, 29, 16\), got .* \(3, 4, 28"),
    ("cached.timestamps", lambda a: a[..., 1:], "cached.timestamps: expected a CPU torch.int64 tensor of shape"),
    ("cached.valid", lambda a: a.long(), "cached.valid: expected a CPU torch.bool tensor"),
])
def test_kernel_refuses_what_it_cannot_read(argument, change, message):
    (q, new_keys, new_values, q_pos, q_time, is_history), stored = split(*case(5, cached=29), 29)
    args = {"q": q, "new_keys": new_keys, "new_values": new_values, "query_pos": q_pos, "query_time": q_time,
            "is_history": is_history}
    if argument.startswith("cached."):
        field = argument.split(".")[1]
        stored = replace(stored, **{field: change(getattr(stored, field))})
    else:
        args[argument] = change(args[argument])
    with pytest.raises(ValueError, match=message):
        kernel.pointwise_attention(**args, tables=relative_bias(5).tables(), alpha=0.25, normaliser=64.0,
                                   cached=stored)


# (scheme, knobs, renormalise): every scheme, PyramidKV and Compose over a per-head eviction, and the "N = kept"
# scale of an eviction (the kernel's per-key scale)
SERVED = ([(name, {}, False) for name in scheme_names()]
          + [("pyramid", {"inner": "snapkv"}, False), ("compose", {"evict": "snapkv", "quant": "kivi"}, False),
             ("recency", {}, True), ("h2o", {}, True)])


@pytest.mark.parametrize(("scheme", "knobs", "renormalise"), SERVED,
                         ids=[f"{s[0]}{s[1] or ''}{'-renormalised' if s[2] else ''}" for s in SERVED])
def test_every_hstu_scheme_serves_the_same_scores_with_and_without_the_kernel(scheme, knobs, renormalise):
    """Write, two appends and a read of three users through the engine, kernel on against PyTorch alone."""
    trained_in = scheme not in POLICIES and scheme not in WRAPPERS
    cfg = ModelConfig(backbone="hstu", dim=16, layers=2, heads=4, head_dim=8, max_len=256,
                      scheme=scheme if trained_in else "native",
                      memory_ratio=0.25 if trained_in and scheme != "native" else 1.0)
    torch.manual_seed(0)
    model = build_model_for(cfg, 40).eval()
    ratio = {"native": 1.0, "int8": 0.5}.get(scheme, 0.25)  # native is the reference; int8 reaches 0.34 at best
    policy = None if trained_in else build_policy(scheme, ratio, **knobs)
    events = synthetic_events(3, 90, 40, seed=1)
    items = torch.randint(1, 41, (3, 6), generator=torch.Generator().manual_seed(2))
    times = events.timestamps[:, -1:].expand(-1, 6) + 60

    def serve() -> torch.Tensor:
        engine = Engine(model, policy, prefill_chunk=32, renormalise=renormalise)
        states = engine.write(events.slice(0, 70))
        states = engine.append(states, events.slice(70, 80))
        states = engine.append(states, events.slice(80, 90))
        return engine.score(states, items, times)

    with torch.no_grad():
        use_kernels(model, True)
        fast = serve()
        use_kernels(model, False)
        slow = serve()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_build_caches_the_library_under_the_kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_KERNEL_CACHE", str(tmp_path))
    library = build.load.__wrapped__(kernel.SOURCE)  # uncached: a fresh build here
    assert library is not None
    built = list(tmp_path.glob("hstu_attention-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("build-*"))  # the temporary folder is gone


def test_build_without_a_compiler_falls_back_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MALLOC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="malloc.kernels.build"):
        assert build.load.__wrapped__(kernel.SOURCE) is None
    assert "could not build or load the C kernel hstu_attention.c" in caplog.text
    assert "the PyTorch path runs instead" in caplog.text


def test_build_with_a_failing_compiler_names_its_error(tmp_path, monkeypatch, caplog):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'cc: fatal error: no space left' >&2\nexit 3\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("MALLOC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    with caplog.at_level(logging.WARNING, logger="malloc.kernels.build"):
        assert build.load.__wrapped__(kernel.SOURCE) is None
    assert "exited with 3: cc: fatal error: no space left" in caplog.text
    assert not list((tmp_path / "cache").glob("*.so"))


def test_build_without_openmp_gives_a_one_thread_library(tmp_path, monkeypatch):
    """A compiler that refuses -fopenmp: the build is retried without it, and that library loads."""
    real = shutil.which("cc") or shutil.which("gcc")
    log = tmp_path / "calls"
    compiler = tmp_path / "cc"
    compiler.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                        f'for a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("MALLOC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    library = build.load.__wrapped__(kernel.SOURCE)
    builds = [line for line in log.read_text().splitlines() if "-shared" in line]
    assert library is not None and len(list((tmp_path / "cache").glob("*.so"))) == 1
    assert len(builds) == 2 and "-fopenmp" in builds[0] and "-fopenmp" not in builds[1]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
def test_an_8_lane_build_passes_the_reference_tests(tmp_path):
    """Where the CPU has AVX-512 the kernel works on 16-float vectors, elsewhere on 8: the 8-lane build (the same
    source compiled with -mno-avx512f) passes the reference and thread tests too, in a fresh process that loads it."""
    real = shutil.which("cc") or shutil.which("gcc")
    compiler = tmp_path / "cc"
    compiler.write_text(f'#!/bin/sh\nexec {real} "$@" -mno-avx512f\n')
    compiler.chmod(0o755)
    env = {**os.environ, "CC": str(compiler), "MALLOC_KERNEL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "kernel_equals_the_reference or kernel_gradients_equal or kernel_splits_rows"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and len(list((tmp_path / "cache").glob("*.so"))) == 1


@pytest.mark.parametrize("few", [False, True], ids=["many-queries", "few-queries"])
def test_kernel_reads_stored_keys_with_spare_rows_in_place(few):
    """Stored keys and values whose heads lie further apart than their rows (a layer with spare rows, read in
    place): the same outputs, bit for bit, as the same keys packed."""
    q, k, v, q_pos, q_time, k_pos, k_time, k_valid = case(9, **(few_queries("plain") if few else CASES["plain"]))
    cached = k.shape[2] - q.shape[2]
    args, stored = split(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached)
    packed = replace(stored, keys=stored.keys.contiguous(), values=stored.values.contiguous())
    roomy_keys = torch.zeros(*packed.keys.shape[:2], cached + 5, packed.keys.shape[3])
    roomy_values = torch.zeros(*packed.values.shape[:2], cached + 5, packed.values.shape[3])
    roomy_keys[:, :, :cached], roomy_values[:, :, :cached] = packed.keys, packed.values
    spread = replace(packed, keys=roomy_keys[:, :, :cached], values=roomy_values[:, :, :cached])
    assert not spread.keys.is_contiguous()
    tables = relative_bias(9).tables()
    with torch.no_grad():
        expected = kernel.pointwise_attention(*args, tables, 0.3, 50.0, cached=packed)
        got = kernel.pointwise_attention(*args, tables, 0.3, 50.0, cached=spread)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("few", [0, 3, 12], ids=["one-query", "3-queries", "12-queries"])
def test_kernel_reads_each_users_rows_where_they_are(few):
    """Stored rows of three users of different lengths, each a slice of a larger tensor whose tail is NaN (so a read
    past a user's own keys would show): the outputs of the same keys padded into one block, and the reference's; a
    row of the wrong shape is refused, naming it."""
    spec = {**CASES["plain"], "cached": 40, "length": few or 1}
    q, k, v, q_pos, q_time, k_pos, k_time, k_valid = case(11, **spec)
    cached, lengths = 40, [40, 23, 0]
    for b, n_b in enumerate(lengths):  # padding past each user's keys: unseen, zeros in the padded block
        k_valid[b, :, n_b:cached] = False
        k[b, :, n_b:cached] = 0.0
        v[b, :, n_b:cached] = 0.0
    args, stored = split(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached)

    def roomy(x: torch.Tensor, n_b: int) -> torch.Tensor:  # x (H, n_b, d) inside a NaN-filled (H, n_b + 6, d)
        out = torch.full((x.shape[0], n_b + 6, x.shape[2]), float("nan"))
        out[:, :n_b] = x[:, :n_b]
        return out[:, :n_b]

    rows = KVRows(tuple(roomy(stored.keys[b], n_b) for b, n_b in enumerate(lengths)),
                  tuple(roomy(stored.values[b], n_b) for b, n_b in enumerate(lengths)),
                  stored.positions, stored.timestamps, stored.valid)
    tables, bias = relative_bias(11).tables(), relative_bias(11)
    with torch.no_grad():
        padded = kernel.pointwise_attention(*args, tables, 0.3, 50.0, cached=stored)
        got = kernel.pointwise_attention(*args, tables, 0.3, 50.0, cached=rows)
        expected = reference(q, k, v, q_pos, q_time, k_pos, k_time, k_valid, cached, None, bias, 0.3, 50.0)
    assert not got.isnan().any()
    torch.testing.assert_close(got, padded, atol=1e-6, rtol=0)  # blocks end at a user's own keys: other roundings
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(rows.block().keys, stored.keys)
    with pytest.raises(ValueError, match=r"row_keys\[1\]"):
        kernel.pointwise_attention(*args, tables, 0.3, 50.0, cached=replace(rows, row_keys=(
            rows.row_keys[0], rows.row_keys[1][:, :, :5], rows.row_keys[2])))


@pytest.mark.parametrize("scheme", ["native", "longformer", "recency"])
def test_a_batch_of_users_is_served_from_their_own_rows(scheme):
    """Users of different history lengths served together: the engine hands the kernel each user's stored rows
    (no padded copy of the keys) and scores as PyTorch alone does on the padded block."""
    trained_in = scheme != "recency"
    cfg = ModelConfig(backbone="hstu", dim=16, layers=2, heads=4, head_dim=8, max_len=64,
                      scheme=scheme if trained_in else "native", memory_ratio=0.25 if scheme == "longformer" else 1.0)
    torch.manual_seed(0)
    model = build_model_for(cfg, 40).eval()
    policy = None if trained_in else build_policy(scheme, 0.5)
    events = synthetic_events(3, 60, 40, seed=4)
    events.lengths = torch.tensor([60, 37, 9])
    history, new = events.slice(0, 50), events.slice(50, 60)
    items = torch.randint(1, 41, (3, 5), generator=torch.Generator().manual_seed(5))
    times = events.timestamps[:, -1:].expand(-1, 5) + 60

    def serve() -> tuple[torch.Tensor, torch.Tensor, list]:
        engine = Engine(model, policy)
        states = engine.write(history)
        states, logits = engine.request(states, new.slice(0, 1), items, times)
        return logits, engine.score(engine.append(states, new.slice(1, 10)), items, times), engine.caches(states)

    with torch.no_grad():
        use_kernels(model, True)
        fast_request, fast_score, caches = serve()
        use_kernels(model, False)
        slow_request, slow_score, _ = serve()
    assert all(isinstance(cache, KVRows) for cache in caches)
    torch.testing.assert_close(fast_request, slow_request, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_score, slow_score, atol=1e-5, rtol=0)
