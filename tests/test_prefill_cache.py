"""The shared prefill cache: keys, the byte budget (least recently used out), and the model it belongs to.

That a cached write serves every training-free scheme bit for bit as a fresh write does is checked for every
scheme in tests/test_scheme_matrix.py; that a suite's items share writes, in tests/test_suite.py.
"""

from __future__ import annotations

import pytest
import torch

from malloc.core.tokens import Events
from malloc.memory.registry import build_model_for, build_policy
from malloc.models import ModelConfig
from malloc.serving.engine import Engine
from malloc.serving.prefill_cache import PrefillCache, events_digest, prefill_nbytes


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="hstu", dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=64)
    return build_model_for(cfg, 30).eval()


def users(lengths: list[int], seed: int) -> Events:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    items = torch.randint(1, 31, (len(lengths), n), generator=g)
    lengths_t = torch.tensor(lengths)
    valid = torch.arange(n)[None, :] < lengths_t[:, None]
    return Events(items * valid, torch.randint(0, 3, (len(lengths), n), generator=g) * valid,
                  torch.cumsum(torch.randint(1, 100, (len(lengths), n), generator=g), dim=1) * valid, lengths_t)


def test_digest_sees_every_field():
    base = users([10, 7], seed=0)
    assert events_digest(base) == events_digest(users([10, 7], seed=0))
    changed = [Events(base.items.clone(), base.actions, base.timestamps, base.lengths) for _ in range(4)]
    changed[0].items[0, 0] += 1
    changed[1] = Events(base.items, (base.actions + 1) % 3, base.timestamps, base.lengths)
    changed[2] = Events(base.items, base.actions, base.timestamps + 1, base.lengths)
    changed[3] = Events(base.items, base.actions, base.timestamps, torch.tensor([10, 6]))
    assert len({events_digest(e) for e in [base, *changed]}) == 5


def test_keys_are_events_chunk_and_observation():
    model = tiny_model()
    cache = PrefillCache(model)
    history = users([40, 25], seed=1)
    servers = [Engine(model, build_policy(name, 0.5), prefill_chunk=16, prefill_cache=cache)
               for name in ("recency", "random", "h2o", "tova")]
    for engine in servers:
        engine.write(history)
    # recency and random observe nothing, H2O and TOVA the attention with window 0: two prefills
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)
    Engine(model, build_policy("snapkv", 0.5, window=4), prefill_chunk=16, prefill_cache=cache).write(history)
    Engine(model, build_policy("recency", 0.5), prefill_chunk=8, prefill_cache=cache).write(history)
    Engine(model, build_policy("recency", 0.5), prefill_chunk=16, prefill_cache=cache).write(users([40, 24], 1))
    assert (cache.misses, cache.hits) == (5, 2)


def test_byte_budget_drops_the_least_recently_used():
    model = tiny_model()
    probe = PrefillCache(model)
    a, b, c = users([30], seed=2), users([30], seed=3), users([30], seed=4)
    engine = Engine(model, prefill_chunk=16, prefill_cache=probe)
    engine.write(a)
    size = probe.nbytes
    assert size == prefill_nbytes(probe.get(a, 16, None, lambda: pytest.fail("a is cached"))) > 0
    cache = PrefillCache(model, max_bytes=2 * size)
    engine = Engine(model, prefill_chunk=16, prefill_cache=cache)
    for events in (a, b, a, c):  # a is used again before c arrives: b is the one dropped
        engine.write(events)
    assert (cache.misses, cache.hits, len(cache), cache.nbytes) == (3, 1, 2, 2 * size)
    engine.write(a)
    engine.write(b)
    assert (cache.misses, cache.hits) == (4, 2)
    tiny = PrefillCache(model, max_bytes=size - 1)  # an entry larger than the budget is served but not kept
    states = Engine(model, prefill_chunk=16, prefill_cache=tiny).write(a)
    assert len(states) == 1 and len(tiny) == 0 and tiny.nbytes == 0


def test_cache_belongs_to_one_model():
    cache = PrefillCache(tiny_model(0))
    with pytest.raises(ValueError, match="another model"):
        Engine(tiny_model(1), prefill_cache=cache)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefillCache(tiny_model(0), max_bytes=-1)
