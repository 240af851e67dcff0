"""Every fast path equals its reference: the fused HSTU kernel against ``hstu_attention`` (the oracle), and the
chunked candidate forward of CTR training against the one full forward, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from malloc.config import load_config
from malloc.data.batching import CTRWindowRows, ctr_training_batch
from malloc.memory.registry import build_model_for
from malloc.models.hstu import RelativeBias, hstu_attention, hstu_attention_fused, log_bucket, repeated_queries
from malloc.runner import build_view
from malloc.train import batch_loss, training_windows

SMOKE = "configs/smoke.yaml"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias_heads", [1, 4])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_hstu_attention_equals_the_reference(dtype, bias_heads, scaled):
    g = torch.Generator().manual_seed(bias_heads + 2 * scaled)
    batch, heads, queries, keys, width = 3, 4, 7, 11, 5
    q, k, v = (torch.randn(batch, heads, n, width, generator=g, dtype=dtype) for n in (queries, keys, keys))
    bias = torch.randn(batch, bias_heads, queries, keys, generator=g, dtype=dtype)
    visible = torch.rand(batch, bias_heads, queries, keys, generator=g) > 0.4
    visible[0, :, 2] = False  # a query that sees nothing
    scale = torch.rand(batch, 1, 1, keys, generator=g, dtype=dtype) * 3 if scaled else None
    expected, _ = hstu_attention(q, k, v, bias, visible, 0.3, 17.0, scale)
    got = hstu_attention_fused(q, k, v, bias, visible, 0.3, 17.0, scale)
    torch.testing.assert_close(got, expected, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
    assert torch.all(got[0, :, 2] == 0)


def test_relative_bias_reuses_buckets_only_for_equal_inputs():
    bias = RelativeBias(8, 8)
    with torch.no_grad():
        bias.position_bias.normal_()
        bias.time_bias.normal_()
    q_pos, q_time = torch.arange(5)[None], torch.arange(5)[None] * 100
    memo: dict = {}
    first = bias(q_pos, q_time, q_pos[:, None], q_time[:, None], memo=memo)
    again = bias(q_pos, q_time, q_pos[:, None].clone(), q_time[:, None].clone(), memo=memo)
    other = bias(q_pos, q_time, q_pos[:, None] + 1, q_time[:, None], memo=memo)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(other, bias(q_pos, q_time, q_pos[:, None] + 1, q_time[:, None]), atol=0, rtol=0)


def test_repeated_queries_finds_runs_equal_in_every_row():
    q_pos = torch.tensor([[3, 4, 4, 4, 5, 5], [7, 8, 8, 8, 9, 9]])
    q_time = torch.tensor([[1, 2, 2, 2, 3, 3], [1, 2, 2, 2, 3, 4]])  # row 1's last time differs: a run ends
    firsts, run = repeated_queries(q_pos, q_time)
    assert firsts.tolist() == [0, 1, 4, 5] and run.tolist() == [0, 1, 1, 1, 2, 3]
    assert torch.equal(q_pos[:, firsts[run]], q_pos) and torch.equal(q_time[:, firsts[run]], q_time)
    assert repeated_queries(torch.arange(4)[None], torch.zeros(1, 4, dtype=torch.int64)) is None  # all distinct
    assert repeated_queries(q_pos[:, :1], q_time[:, :1]) is None


@pytest.mark.parametrize("joint", [True, False])
def test_relative_bias_of_repeated_queries_equals_every_row_computed(joint):
    """A request's candidates share one (position, time): their bias row is computed once and copied, with the
    same values as computing every row; the memo hands the runs to the next layer."""
    bias = RelativeBias(8, 8)
    bias.joint = joint
    with torch.no_grad():
        bias.position_bias.normal_()
        bias.time_bias.normal_()
    g = torch.Generator().manual_seed(0)
    k_pos = torch.arange(40).repeat(3, 1)[:, None]
    k_time = torch.randint(0, 10**6, (3, 1, 40), generator=g).sort(dim=-1).values
    q_pos = torch.cat([torch.tensor([[38, 39]]).repeat(3, 1), torch.full((3, 5), 40)], dim=1)
    q_time = torch.cat([k_time[:, 0, -2:], torch.full((3, 5), 10**6)], dim=1)
    expected = torch.cat([bias(q_pos[:, i:i + 1], q_time[:, i:i + 1], k_pos, k_time) for i in range(7)], dim=2)
    memo: dict = {}
    got = bias(q_pos, q_time, k_pos, k_time, memo=memo)
    assert memo["buckets"][3][0].tolist() == [0, 1, 2]  # the 5 candidates are one run
    assert torch.equal(got, expected) and got.shape == (3, 1, 7, 40)
    assert torch.equal(bias(q_pos, q_time, k_pos, k_time, memo=memo), expected)


@pytest.mark.parametrize("candidate", ["item", "query"])
@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_chunked_candidates_equal_the_full_forward(backbone, candidate):
    cfg = load_config(SMOKE, [f"model.backbone={backbone}", f"model.candidate={candidate}", "model.item_prior=true",
                              "model.ctr_readout=dot", "model.dropout=0"])
    view = build_view(cfg)
    torch.manual_seed(0)
    model = build_model_for(cfg.model, view.sequences.num_items)
    batch = ctr_training_batch(view.sequences, training_windows(view, cfg)[:9], CTRWindowRows(view.split("train")))
    start, mask = batch.candidates_from, batch.target_mask[:, batch.candidates_from:]
    full = model(batch.tokens)[:, start:][mask]
    for chunk in (1, 4, 1000):
        torch.testing.assert_close(model.candidate_outputs(batch.tokens, start, chunk)[mask], full, atol=1e-5, rtol=0)
    # the training loss and its gradients: the chunked forward against the one full forward
    generator = torch.Generator()
    loss = batch_loss(model, batch, "ctr", 0, generator)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    logits = model.ctr_logits(full, batch.tokens.items[:, start:][mask])
    reference = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.targets[:, start:][mask])
    expected = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=0)
    for got, want in zip(grads, expected, strict=True):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["native", "longformer"])
def test_tiled_attention_equals_untiled_chunks(scheme):
    """A prefill chunk of T queries against S keys with T S above ``TILE_PAIRS`` is attended in query tiles; it
    equals the same history written in chunks small enough to need no tile (chunked == full is tested elsewhere)."""
    from malloc.memory.registry import build_policy
    from malloc.models import ModelConfig
    from malloc.models.hstu import TILE_PAIRS
    from malloc.profiling.latency import synthetic_events
    from malloc.serving.engine import Engine

    length, chunk, small = 2 * int(TILE_PAIRS ** 0.5) + 300, 1175, 400
    assert chunk * chunk > TILE_PAIRS >= small * length  # big chunks are tiled (3 tiles each), small ones not
    cfg = ModelConfig(dim=16, heads=4, head_dim=4, layers=2, dropout=0.0, scheme=scheme,
                      memory_ratio=0.5 if scheme != "native" else 1.0)
    torch.manual_seed(0)
    model = build_model_for(cfg, 50).eval()
    events = synthetic_events(1, length, 50, 0)
    with torch.no_grad():
        tiled = Engine(model, build_policy("native", 1.0), prefill_chunk=chunk).write(events)
        small = Engine(model, build_policy("native", 1.0), prefill_chunk=small).write(events)
    for a, b in zip(tiled, small, strict=True):
        torch.testing.assert_close(a.last_hidden, b.last_hidden, atol=1e-5, rtol=0)
        for la, lb in zip(a.layers, b.layers, strict=True):
            torch.testing.assert_close(la.read().values, lb.read().values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("candidate", ["item", "query"])
@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_one_pass_request_equals_append_then_score(backbone, candidate):
    """``Engine.request`` runs the new events and the candidates in one pass for a keep-everything policy; it
    equals ``append`` then ``score`` (users with 2, 0 and 1 new events; padded candidates), states included."""
    from malloc.core.tokens import Events
    from malloc.memory.registry import build_policy
    from malloc.models import ModelConfig
    from malloc.profiling.latency import synthetic_events
    from malloc.serving.engine import Engine

    cfg = ModelConfig(backbone=backbone, dim=16, heads=4, head_dim=4, layers=2, dropout=0.0, max_len=32,
                      candidate=candidate, ctr_readout="dot", item_prior=True)
    torch.manual_seed(0)
    model = build_model_for(cfg, 40).eval()
    history = synthetic_events(3, 12, 40, 1)
    history = Events(history.items, history.actions, history.timestamps, torch.tensor([12, 7, 0]))
    new = synthetic_events(3, 2, 40, 2)
    new = Events(new.items, new.actions, new.timestamps + 10**7, torch.tensor([2, 0, 1]))
    items = torch.randint(1, 41, (3, 5), generator=torch.Generator().manual_seed(3))
    items[1, 3:] = 0
    times = torch.full((3, 5), 2_000_000_000)
    engine = Engine(model)
    assert engine._one_pass(new, items)
    assert not Engine(model, build_policy("recency", 0.5))._one_pass(new, items)  # evicts on append: two passes
    stored = engine.write(history)
    fused_states, fused = engine.request(stored, new, items, times)
    appended = engine.append(stored, new)
    expected = engine.score(appended, items, times)
    torch.testing.assert_close(fused[items > 0], expected[items > 0], atol=1e-5, rtol=0)
    for got, want in zip(fused_states, appended, strict=True):
        assert (got.next_position, got.last_timestamp) == (want.next_position, want.last_timestamp)
        torch.testing.assert_close(got.last_hidden, want.last_hidden, atol=1e-5, rtol=0)
        for a, b in zip(got.layers, want.layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
            assert torch.equal(a.positions, b.positions) and torch.equal(a.timestamps, b.timestamps)


@pytest.mark.parametrize("scheme", ["h2o", "snapkv", "tova"])
@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_observed_write_in_short_chunks_equals_one_chunk(backbone, scheme):
    """A query-aware policy's write folds each chunk's weights into running sums; chunks shortened so that one
    user's ``(H, chunk, S)`` weights stay within ``max_scores`` keep the same events with the same keys and values
    as one chunk of the whole history (float64: no rounding hides a difference)."""
    from malloc.memory.registry import build_policy
    from malloc.models import ModelConfig
    from malloc.profiling.latency import synthetic_events
    from malloc.serving.engine import Engine

    cfg = ModelConfig(backbone=backbone, dim=16, heads=4, head_dim=4, layers=2, dropout=0.0)
    torch.manual_seed(0)
    model = build_model_for(cfg, 50).double().eval()
    events = synthetic_events(3, 90, 50, 1)
    policy = build_policy(scheme, 0.25)
    with torch.no_grad():
        whole = Engine(model, policy, prefill_chunk=1024).write(events)
        short = Engine(model, policy, prefill_chunk=1024, max_scores=4 * 7 * 90).write(events)  # 7-event chunks
    for a, b in zip(whole, short, strict=True):
        for la, lb in zip(a.layers, b.layers, strict=True):
            ra, rb = la.read(), lb.read()
            assert torch.equal(ra.positions, rb.positions)
            torch.testing.assert_close(ra.values, rb.values, atol=1e-12, rtol=0)
            torch.testing.assert_close(ra.keys, rb.keys, atol=1e-12, rtol=0)


@pytest.mark.parametrize("buckets", [1, 2, 32, 64, 80, 100])
def test_position_bucket_table_equals_the_logarithm(buckets: int) -> None:
    """Position buckets read from the table (or computed, past its size) equal log_bucket of the distance, for
    negative, small, saturated and huge distances."""
    bias = RelativeBias(buckets, 8)
    distances = torch.cat([torch.arange(-3000, 3000), torch.randint(-10**9, 10**9, (20_000,),
                                                                    generator=torch.Generator().manual_seed(0))])
    assert torch.equal(bias.position_buckets(distances.clone()), log_bucket(distances, 4.0, buckets))
    assert (bias.position_table is None) == (buckets == 100)  # 2^(99/4) distances: too many for a table
