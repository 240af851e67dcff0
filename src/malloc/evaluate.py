"""Evaluation through the serving path: task metrics plus the meters of the replay."""

from __future__ import annotations

from malloc.config import RunConfig
from malloc.data.tasks import CTRView, RetrievalView
from malloc.eval.metrics import ctr_metrics, retrieval_metrics
from malloc.models import SequentialRecommender
from malloc.serving.replay import replay_ctr, replay_retrieval
from malloc.serving.server import Server


def evaluate(cfg: RunConfig, model: SequentialRecommender, view: CTRView | RetrievalView, split: str) -> dict:
    """Replay split ``split`` ("valid" or "test") through a :class:`Server` and score it.

    Returns:
        ``{"metrics": {...}, "meters": {...}}``; CTR metrics are auc, gauc, logloss; retrieval metrics are
        hr@K, ndcg@K, mrr.
    """
    was_training = model.training
    server = Server(model, prefill_chunk=cfg.eval.prefill_chunk, candidate_chunk=cfg.eval.candidate_chunk)
    if isinstance(view, CTRView):
        rows = view.split(split)
        logits, meters = replay_ctr(server, view.sequences, rows, cfg.model.max_len, cfg.eval.user_batch)
        metrics = ctr_metrics(rows.user, rows.label, logits)
        metrics["rows"] = len(rows)
    else:
        ranks, meters = replay_retrieval(server, view.sequences, view.target_index(split), cfg.model.max_len,
                                         cfg.eval.append_events, cfg.eval.user_batch, cfg.eval.mask_history)
        metrics = retrieval_metrics(ranks, cfg.eval.ks)
        metrics["users"] = len(ranks)
    model.train(was_training)
    return {"metrics": metrics, "meters": meters.summary()}
