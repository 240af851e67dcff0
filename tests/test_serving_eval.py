"""The evaluation replay reads every prediction from stored states, and with no compression it equals the full
forward over the same events (docs/DESIGN.md, "Exactness rules")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from malloc.data.batching import CTRWindowRows, ctr_training_batch, history_tokens
from malloc.data.sequences import CTRRows, Dataset, build_sequences
from malloc.data.tasks import CTRView, RetrievalView, Window, ctr_rows, windows
from malloc.eval.metrics import target_ranks
from malloc.eval.replay import replay_ctr, replay_retrieval
from malloc.memory.registry import build_model_for
from malloc.models import ModelConfig
from malloc.serving.engine import Engine

MAX_LEN = 8


def tiny_data(seed: int = 0, users: int = 7, items: int = 30):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 25, size=users)
    user = np.repeat(np.arange(users), lengths)
    n = len(user)
    seqs = build_sequences("tiny", user, rng.integers(1, items + 1, n), rng.integers(0, 10**6, n),
                           rng.integers(0, 2, n).astype(np.int8))
    return seqs


def tiny_model(backbone: str, num_items: int):
    torch.manual_seed(1)
    cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=MAX_LEN)
    return build_model_for(cfg, num_items).eval()


@pytest.mark.parametrize("protocol", ["blind", "feedback"])
@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_ctr_replay_equals_full_forward(backbone, protocol):
    seqs = tiny_data()
    view = CTRView(seqs, ctr_rows(Dataset(seqs), test_fraction=0.3, valid_fraction=0.2))
    test = view.split("test")
    model = tiny_model(backbone, seqs.num_items)
    logits, meters = replay_ctr(Engine(model, prefill_chunk=3, candidate_chunk=2), seqs, test, MAX_LEN,
                                user_batch=3, protocol=protocol)
    # full forward: the window the replay wrote (max_len events before the first test row) plus all later
    # events (blind: without their labels), with every test row as a candidate token
    index = CTRWindowRows(test)
    for user in np.unique(test.user):
        mine = test.history_len[test.user == user]
        start, stop = max(0, mine.min() - MAX_LEN), mine.max()
        window = Window(int(user), int(start), int(stop))
        blind_from = np.array([mine.min() - start]) if protocol == "blind" else None
        batch = ctr_training_batch(seqs, [window], index, blind_from)
        with torch.no_grad():
            expected = model.ctr_logits(model(batch.tokens), batch.tokens.items)[batch.target_mask]
        rows = index.for_window(window)
        order = np.lexsort((index.rows.history_len[rows], index.rows.user[rows]))
        # the replay's logits, in the index's row order
        got = {}
        for r in np.flatnonzero(test.user == user):
            got[(int(test.history_len[r]), int(test.item[r]))] = logits[r]
        got_in_order = [got[(int(index.rows.history_len[i]), int(index.rows.item[i]))] for i in rows[order]]
        np.testing.assert_allclose(got_in_order, expected.double().numpy(), atol=1e-5)
    assert meters.summary()["users"] == len(np.unique(test.user))


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
@pytest.mark.parametrize("append_events", [1, 3])
def test_retrieval_replay_equals_full_forward(backbone, append_events):
    seqs = tiny_data(seed=2)
    view = RetrievalView(seqs)
    model = tiny_model(backbone, seqs.num_items)
    target = view.target_index("test")
    ranks, _ = replay_retrieval(Engine(model, prefill_chunk=4), seqs, target, MAX_LEN,
                                append_events=append_events, user_batch=4, mask_history=False)
    for user in range(seqs.num_users):
        stop = int(target[user])
        start = max(0, stop - MAX_LEN)
        window = Window(user, start, stop)
        tokens = history_tokens(seqs, [window])
        with torch.no_grad():
            hidden = model(tokens)[0, stop - start - 1]
        scores = model.item_logits(hidden[None])
        expected = target_ranks(scores, torch.as_tensor([seqs.items[seqs.offsets[user] + stop]]))
        assert ranks[user] == expected[0]


def test_training_windows_cover_every_train_row():
    seqs = tiny_data(seed=3)
    rows = ctr_rows(Dataset(seqs), 0.2, 0.2)
    train = rows.select(rows.split == 0)
    ends = np.zeros(seqs.num_users, dtype=np.int64)
    np.maximum.at(ends, train.user, train.history_len)
    index = CTRWindowRows(train)
    covered = np.concatenate([index.for_window(w) for w in windows(ends, 5)])
    assert sorted(covered.tolist()) == list(range(len(train)))


def test_explicit_rows_replay_in_history_order():
    """Rows given by a source (several candidates at one history length) are scored at that length."""
    seqs = tiny_data(seed=4, users=2)
    n0 = int(seqs.lengths[0])
    rows = CTRRows(user=np.array([0, 0, 0, 1]), history_len=np.array([n0, 2, 2, 3]),
                   item=np.array([1, 2, 3, 4]), timestamp=np.array([10**7] * 4),
                   label=np.array([1, 0, 1, 0], dtype=np.int8), split=np.full(4, 2, dtype=np.int8))
    model = tiny_model("hstu", seqs.num_items)
    logits, meters = replay_ctr(Engine(model), seqs, rows, max_len=100)
    assert np.all(np.isfinite(logits)) and logits[1] != logits[2]
    assert sorted(meters.state_tokens) == sorted([n0, 3])


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_kept_normaliser_switch(backbone):
    """'N = kept' (docs/DESIGN.md, "Eviction and HSTU's normaliser") scales stored HSTU contributions by
    seen / stored: a no-op without eviction, a change with it, and nothing for softmax attention (which
    renormalises by itself)."""
    from malloc.memory.registry import build_policy
    from malloc.profiling.latency import synthetic_events

    model = tiny_model(backbone, 40)
    events = synthetic_events(3, 30, 40, seed=1)
    items, times = torch.randint(1, 41, (3, 6)), torch.full((3, 6), 2 * 10**9)

    def scores(policy, renormalise):
        engine = Engine(model, policy, renormalise=renormalise)
        states = engine.append(engine.write(events.slice(0, 24)), events.slice(24, 30))
        return engine.score(states, items, times)

    torch.testing.assert_close(scores(None, True), scores(None, False), atol=0, rtol=0)
    evicting = build_policy("recency", 0.5)
    changed = not torch.allclose(scores(evicting, True), scores(evicting, False))
    assert changed == (backbone == "hstu")


@pytest.mark.parametrize("backbone", ["hstu", "sasrec"])
def test_blind_replay_never_reads_the_window_labels(backbone):
    """Flipping the labels of the scored window's events changes no blind logit (each row is scored from the labels
    before the window) and changes feedback logits (they follow the window's labels); labels before the window
    matter to both."""
    import dataclasses

    seqs = tiny_data(seed=5)
    view = CTRView(seqs, ctr_rows(Dataset(seqs), test_fraction=0.3, valid_fraction=0.2))
    test = view.split("test")
    model = tiny_model(backbone, seqs.num_items)
    in_window = np.zeros(seqs.num_events, dtype=bool)
    in_window[seqs.offsets[test.user] + test.history_len] = True
    before = np.zeros(seqs.num_events, dtype=bool)
    before[seqs.offsets[test.user] + test.history_len - 1] = True
    before &= ~in_window

    def logits(protocol: str, flip: np.ndarray | None = None) -> np.ndarray:
        labels = seqs.labels if flip is None else np.where(flip, 1 - seqs.labels, seqs.labels).astype(np.int8)
        return replay_ctr(Engine(model), dataclasses.replace(seqs, labels=labels), test, MAX_LEN, user_batch=4,
                          protocol=protocol)[0]

    np.testing.assert_array_equal(logits("blind", in_window), logits("blind"))
    assert not np.allclose(logits("feedback", in_window), logits("feedback"))
    assert not np.allclose(logits("blind", before), logits("blind"))


@pytest.mark.parametrize("protocol", ["blind", "feedback"])
@pytest.mark.parametrize(("backbone", "scheme"), [("hstu", "native"), ("sasrec", "native"), ("hstu", "longformer"),
                                                  ("sasrec", "beacon"), ("hstu", "rwkv")])
@pytest.mark.parametrize("task", ["ctr", "retrieval"])
def test_forward_metrics_equal_the_serving_replay(task, backbone, scheme, protocol):
    """Training validates with one batched full forward: the same numbers as the serving replay, for Native and
    for trained-in schemes (each serves its own full forward)."""
    import dataclasses

    from malloc.config import RunConfig
    from malloc.eval.evaluate import forward_metrics, replay
    from malloc.models.config import ModelConfig

    if task == "retrieval" and protocol == "feedback":
        pytest.skip("the protocols differ for CTR only")
    seqs = tiny_data(seed=6, users=9)
    view = (CTRView(seqs, ctr_rows(Dataset(seqs), test_fraction=0.3, valid_fraction=0.2)) if task == "ctr"
            else RetrievalView(seqs))
    torch.manual_seed(2)
    model_cfg = ModelConfig(backbone=backbone, dim=16, layers=2, heads=4, head_dim=4, dropout=0.0, max_len=MAX_LEN,
                            scheme=scheme, memory_ratio=0.5 if scheme != "native" else 1.0)
    cfg = RunConfig(task=task, model=model_cfg)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, protocol=protocol, user_batch=4))
    model = build_model_for(model_cfg, seqs.num_items).eval()
    for split in ("valid", "test"):
        fast, served = forward_metrics(cfg, model, view, split), replay(cfg, model, view, split).metrics
        for key, value in fast.items():
            assert value == pytest.approx(served[key], abs=1e-6), (split, key)
