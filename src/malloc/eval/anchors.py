"""Anchors: what scores that use no sequence model reach on the same rows, under the same protocol.

A model's accuracy means something only next to these floors. Every anchor is fitted on the training rows (CTR)
or training events (retrieval) alone, as the model's weights are; only ``item-mean+user-rate`` reads the labels a
served state holds, and so depends on the CTR protocol (:mod:`malloc.eval.replay`).

CTR (logits aligned with a split's rows):

- ``item-mean``: the row's item's mean training label, smoothed towards the global training mean with
  :data:`PRIOR_ROWS` pseudo-rows (an unseen item scores the global mean);
- ``item-mean+user-rate``: ``logit(item mean) + logit(user rate) - logit(global mean)``, where the user rate is the
  user's smoothed positive rate over the labelled events the served state holds when the row is scored: under the
  ``blind`` protocol the events before the user's window (one rate per user and window), under ``feedback`` every
  event before the row (it follows the window's own labels). Sources whose events carry no labels (LongCTR) give
  the global mean, so this anchor equals ``item-mean`` there;
- ``mf``: logistic matrix factorisation with user and item biases (:func:`fit_ctr_mf`).

Retrieval (1-based ranks of each user's target over the full catalogue, the same history mask and tie rule as the
model):

- ``popular``: items by their number of training events;
- ``mf``: a softmax matrix factorisation over the catalogue (:func:`fit_retrieval_mf`).

Both factorisations pick their epoch on the validation split (logloss, NDCG@10), as the model does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from malloc.data.sequences import SPLIT_TRAIN, UNKNOWN_LABEL, CTRRows, Sequences
from malloc.data.tasks import CTRView, RetrievalView
from malloc.eval.metrics import ctr_metrics, history_exclusion, retrieval_metrics, target_ranks

PRIOR_ROWS = 1.0  # pseudo-rows at the global mean added to every item's (and user's) mean label
CTR_ANCHORS = ("item-mean", "item-mean+user-rate", "mf")
RETRIEVAL_ANCHORS = ("popular", "mf")
PROTOCOLS = ("blind", "feedback")
ANCHORS_VERSION = 1  # part of cached anchors' identity: raise it when an anchor's definition changes
_CLIP = 1e-6


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def _train_rows(view: CTRView) -> CTRRows:
    return view.rows.select(view.rows.split == SPLIT_TRAIN)


def global_mean(view: CTRView) -> float:
    """The mean training label (0.5 without training rows)."""
    train = _train_rows(view)
    return float(train.label.mean()) if len(train) else 0.5


def item_log_odds(view: CTRView, prior: float = PRIOR_ROWS) -> np.ndarray:
    """``(num_items + 1,)`` each item's smoothed mean training label as a logit (entry 0, padding: the global mean)."""
    train = _train_rows(view)
    size = view.sequences.num_items + 1
    positives = np.bincount(train.item, weights=train.label.astype(np.float64), minlength=size)
    seen = np.bincount(train.item, minlength=size).astype(np.float64)
    base = global_mean(view)
    with np.errstate(invalid="ignore", divide="ignore"):  # prior 0 and an unseen item: the global mean
        mean = np.where(seen + prior > 0, (positives + prior * base) / (seen + prior), base)
    return _logit(mean)


def item_mean_logits(view: CTRView, split: str, prior: float = PRIOR_ROWS) -> np.ndarray:
    """``(R,)`` logit of each ``split`` row's smoothed item mean label over the training rows."""
    return item_log_odds(view, prior)[view.split(split).item]


def base_log_odds(view: CTRView) -> float:
    """The global mean training label as a logit."""
    return float(_logit(global_mean(view)))


def visible_labels(rows: CTRRows, protocol: str) -> np.ndarray:
    """``(R,)`` how many of its user's first events the state holds *with* their labels when each row is scored.

    ``feedback``: every event before the row (``history_len``); ``blind``: the events before the user's first
    row of ``rows`` (the window's start), since the window's own events are appended without labels.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "feedback" or len(rows) == 0:
        return rows.history_len.astype(np.int64)
    start = np.full(int(rows.user.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(start, rows.user, rows.history_len)
    return start[rows.user]


def user_rate_logits(seqs: Sequences, rows: CTRRows, protocol: str, base: float, prior: float = PRIOR_ROWS
                     ) -> np.ndarray:
    """``(R,)`` logit of each row's user's smoothed positive rate over the labelled events its state holds."""
    known = seqs.labels != UNKNOWN_LABEL
    # cumulative positives and labelled events before each flat index (length E + 1)
    positives = np.concatenate([[0.0], np.cumsum(np.where(known, seqs.labels, 0).astype(np.float64))])
    labelled = np.concatenate([[0.0], np.cumsum(known.astype(np.float64))])
    first = seqs.offsets[rows.user]
    stop = first + visible_labels(rows, protocol)
    pos = positives[stop] - positives[first]
    seen = labelled[stop] - labelled[first]
    return _logit((pos + prior * base) / (seen + prior))


def fit_ctr_mf(view: CTRView, seed: int = 0, dim: int = 16, weight_decay: float = 0.03, lr: float = 0.01,
               epochs: int = 60, patience: int = 5, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logistic MF ``b + b_u + b_i + p_u . q_i`` fitted on the training rows with Adam and an L2 penalty on the rows'
    parameters; the epoch of lowest validation logloss is kept.

    Returns:
        ``(U, dim + 1)`` user factors with the user bias last, ``(num_items + 1, dim + 1)`` item factors with the item
        bias last, and the global bias ``()``, all float64, so ``logit = [p_u, b_u] . [q_i, 1] + [.., b_i]`` is
        :func:`mf_ctr_logits`.
    """
    generator = torch.Generator().manual_seed(seed)
    users, items = view.sequences.num_users, view.sequences.num_items + 1
    user_factors = torch.nn.Parameter(torch.randn(users, dim, generator=generator, dtype=torch.float64) * 0.01)
    item_factors = torch.nn.Parameter(torch.randn(items, dim, generator=generator, dtype=torch.float64) * 0.01)
    user_bias = torch.nn.Parameter(torch.zeros(users, dtype=torch.float64))
    item_bias = torch.nn.Parameter(torch.zeros(items, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(float(_logit(global_mean(view))), dtype=torch.float64))
    params = [user_factors, item_factors, user_bias, item_bias, bias]
    optimiser = torch.optim.Adam(params, lr=lr)
    train, valid = _train_rows(view), view.split("valid")

    def logits(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (user_factors[u] * item_factors[i]).sum(-1) + user_bias[u] + item_bias[i] + bias

    u_train, i_train = torch.as_tensor(train.user), torch.as_tensor(train.item)
    y_train = torch.as_tensor(train.label, dtype=torch.float64)
    u_valid, i_valid = torch.as_tensor(valid.user), torch.as_tensor(valid.item)
    y_valid = torch.as_tensor(valid.label, dtype=torch.float64)
    best, best_params, stale = float("inf"), [p.detach().clone() for p in params], 0
    for _ in range(epochs):
        order = torch.randperm(len(u_train), generator=generator)
        for start in range(0, len(order), batch):
            k = order[start:start + batch]
            u, i = u_train[k], i_train[k]
            penalty = ((user_factors[u] ** 2).sum(-1) + (item_factors[i] ** 2).sum(-1) + user_bias[u] ** 2
                       + item_bias[i] ** 2).mean()
            loss = F.binary_cross_entropy_with_logits(logits(u, i), y_train[k]) + weight_decay * penalty
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            valid_loss = float(F.binary_cross_entropy_with_logits(logits(u_valid, i_valid), y_valid))
        if valid_loss < best:
            best, best_params, stale = valid_loss, [p.detach().clone() for p in params], 0
        else:
            stale += 1
            if stale >= patience:
                break
    p, q, bu, bi, b = best_params
    return (torch.cat([p, bu[:, None]], 1).numpy(), torch.cat([q, bi[:, None]], 1).numpy(), b.numpy())


def mf_ctr_logits(factors: tuple[np.ndarray, np.ndarray, np.ndarray], rows: CTRRows) -> np.ndarray:
    """``(R,)`` logits of :func:`fit_ctr_mf`'s model for ``rows``."""
    user, item, bias = factors
    u, i = user[rows.user], item[rows.item]
    return (u[:, :-1] * i[:, :-1]).sum(-1) + u[:, -1] + i[:, -1] + float(bias)


def ctr_anchor_logits(view: CTRView, split: str, protocol: str, seed: int = 0,
                      mf: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``{anchor: (R,) logits}`` for the rows of ``split`` (in split order), names as in :data:`CTR_ANCHORS`.

    ``mf`` reuses a fitted factorisation (:func:`fit_ctr_mf`); None fits one.
    """
    rows = view.split(split)
    base = global_mean(view)
    item = item_mean_logits(view, split)
    user = user_rate_logits(view.sequences, rows, protocol, base)
    factors = fit_ctr_mf(view, seed) if mf is None else mf
    return {"item-mean": item, "item-mean+user-rate": item + user - _logit(base),
            "mf": mf_ctr_logits(factors, rows)}


def ctr_anchor_metrics(view: CTRView, split: str, protocol: str, seed: int = 0,
                       mf: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """``{anchor: {"auc", "gauc", "logloss"}}`` of :func:`ctr_anchor_logits`."""
    rows = view.split(split)
    return {name: ctr_metrics(rows.user, rows.label, logits)
            for name, logits in ctr_anchor_logits(view, split, protocol, seed, mf).items()}


# -- retrieval -------------------------------------------------------------------------------------------------------
def _training_events(view: RetrievalView) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` users and items of the training events (every event before a user's validation target)."""
    seqs = view.sequences
    index_in_user = np.arange(seqs.num_events) - np.repeat(seqs.offsets[:-1], seqs.lengths)
    train = index_in_user < np.repeat(view.train_ends(), seqs.lengths)
    return np.repeat(np.arange(seqs.num_users), seqs.lengths)[train], seqs.items[train]


def rank_targets(view: RetrievalView, split: str, scores_of: Callable[[np.ndarray], np.ndarray],
                 mask_history: bool = True,
                 user_batch: int = 256) -> np.ndarray:
    """``(U,)`` 1-based rank of each user's ``split`` target under ``scores_of(users) -> (b, num_items + 1)``,
    padding never ranked, items before the target masked when ``mask_history``."""
    seqs = view.sequences
    targets = view.target_index(split)
    ranks = np.zeros(seqs.num_users, dtype=np.int64)
    for first in range(0, seqs.num_users, user_batch):
        users = np.arange(first, min(first + user_batch, seqs.num_users))
        scores = torch.tensor(np.array(scores_of(users)), dtype=torch.float64)  # a copy: padding is set below
        scores[:, 0] = -torch.inf
        exclude = history_exclusion(seqs, users, targets[users], scores.shape[1]) if mask_history else None
        ranks[users] = target_ranks(scores, seqs.items[seqs.offsets[users] + targets[users]], exclude)
    return ranks


def popularity_ranks(view: RetrievalView, split: str, mask_history: bool = True, user_batch: int = 256
                     ) -> np.ndarray:
    """``(U,)`` ranks of each user's target under training-event popularity (ties: pessimistic, as the model)."""
    _, items = _training_events(view)
    counts = np.bincount(items, minlength=view.sequences.num_items + 1).astype(np.float64)
    return rank_targets(view, split, lambda users: np.broadcast_to(counts, (len(users), len(counts))),
                        mask_history, user_batch)


def fit_retrieval_mf(view: RetrievalView, seed: int = 0, dim: int = 32, weight_decay: float = 1e-4,
                     lr: float = 0.01, epochs: int = 60, patience: int = 5, batch: int = 4096,
                     mask_history: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Softmax MF: ``p(i | u) ~ exp(p_u . q_i + b_i)`` over the full catalogue, fitted on the training events with
    AdamW; the epoch of highest validation NDCG@10 is kept.

    Returns:
        ``(U, dim + 1)`` user factors with a trailing 1 and ``(num_items + 1, dim + 1)`` item factors with the item
        bias last, float64, so the scores are ``user @ item.T``.
    """
    generator = torch.Generator().manual_seed(seed)
    users, items = view.sequences.num_users, view.sequences.num_items + 1
    user_factors = torch.nn.Parameter(torch.randn(users, dim, generator=generator) * 0.1)
    item_factors = torch.nn.Parameter(torch.randn(items, dim, generator=generator) * 0.1)
    item_bias = torch.nn.Parameter(torch.zeros(items))
    params = [user_factors, item_factors, item_bias]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    event_users, event_items = (torch.as_tensor(a) for a in _training_events(view))

    def exported() -> tuple[np.ndarray, np.ndarray]:
        ones = torch.ones(users, 1)
        return (torch.cat([user_factors, ones], 1).detach().double().numpy(),
                torch.cat([item_factors, item_bias[:, None]], 1).detach().double().numpy())

    best, best_factors, stale = -1.0, exported(), 0
    for _ in range(epochs):
        order = torch.randperm(len(event_users), generator=generator)
        for start in range(0, len(order), batch):
            k = order[start:start + batch]
            logits = user_factors[event_users[k]] @ item_factors.T + item_bias
            logits[:, 0] = -torch.inf
            loss = F.cross_entropy(logits, event_items[k])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        user, item = exported()
        ndcg = retrieval_metrics(rank_targets(view, "valid", lambda u, a=user, b=item: a[u] @ b.T, mask_history),
                                 (10,))["ndcg@10"]
        if ndcg > best:
            best, best_factors, stale = ndcg, (user, item), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_factors


def retrieval_anchor_ranks(view: RetrievalView, split: str, mask_history: bool = True, seed: int = 0,
                           mf: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``{anchor: (U,) ranks}`` for ``split``, names as in :data:`RETRIEVAL_ANCHORS`."""
    user, item = fit_retrieval_mf(view, seed, mask_history=mask_history) if mf is None else mf
    return {"popular": popularity_ranks(view, split, mask_history),
            "mf": rank_targets(view, split, lambda users: user[users] @ item.T, mask_history)}


def retrieval_anchor_metrics(view: RetrievalView, split: str, ks: tuple[int, ...], mask_history: bool = True,
                             seed: int = 0, mf: tuple[np.ndarray, np.ndarray] | None = None
                             ) -> dict[str, dict[str, float]]:
    """``{anchor: {"hr@K", "ndcg@K", "mrr"}}`` of :func:`retrieval_anchor_ranks`."""
    return {name: retrieval_metrics(ranks, ks)
            for name, ranks in retrieval_anchor_ranks(view, split, mask_history, seed, mf).items()}


def anchor_metrics(view: CTRView | RetrievalView, splits: tuple[str, ...], *, protocol: str = "blind",
                   ks: tuple[int, ...] = (10, 50, 200), mask_history: bool = True, seed: int = 0
                   ) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {anchor: metrics}}`` for a task view, each factorisation fitted once for all the splits."""
    if isinstance(view, CTRView):
        factors = fit_ctr_mf(view, seed)
        return {split: ctr_anchor_metrics(view, split, protocol, seed, factors) for split in splits}
    retrieval = fit_retrieval_mf(view, seed, mask_history=mask_history)
    return {split: retrieval_anchor_metrics(view, split, ks, mask_history, seed, retrieval) for split in splits}
