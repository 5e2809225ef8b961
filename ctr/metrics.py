"""Exact evaluation metrics: AUC (ties counted as half), group AUC and log loss.

All functions take whole-split numpy arrays: the trainer gathers every eval prediction to the host, so the
figures are exact, not streaming approximations (no histogram buckets).
"""
from __future__ import annotations

import numpy as np


def _average_ranks(sorted_scores: np.ndarray, starts_new_run: np.ndarray) -> np.ndarray:
    """1-based ranks of already-sorted scores, tied runs sharing their average rank."""
    n = sorted_scores.shape[0]
    run_id = np.cumsum(starts_new_run) - 1
    run_start = np.flatnonzero(starts_new_run)
    run_len = np.diff(np.append(run_start, n))
    return run_start[run_id] + (run_len[run_id] + 1) / 2.0


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties as 1/2.

    Computed from average ranks (Mann-Whitney U) in O(n log n). Returns NaN when one class is absent.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    pos = int(labels.sum())
    neg = labels.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    new_run = np.empty(s.size, bool)
    new_run[0] = True
    new_run[1:] = s[1:] != s[:-1]
    ranks = _average_ranks(s, new_run)
    u = ranks[labels[order]].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """gAUC: per-group AUC averaged with weights = the group's number of examples.

    Groups where every label is equal have no AUC and are left out (the usual gAUC definition, as in the
    TaobaoAds / BARS protocol). Returns NaN when no group has both classes.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    groups = np.asarray(groups).ravel()
    order = np.lexsort((scores, groups))  # by group, then score
    g, s, y = groups[order], scores[order], labels[order]
    new_group = np.empty(g.size, bool)
    new_group[0] = True
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    ranks_global = _average_ranks(s, new_run)
    ranks = ranks_global - group_start[group_id]  # rank within the group
    size = np.bincount(group_id).astype(np.float64)
    pos = np.bincount(group_id, weights=y.astype(np.float64))
    neg = size - pos
    rank_sum = np.bincount(group_id, weights=np.where(y, ranks, 0.0))
    scored = (pos > 0) & (neg > 0)
    if not scored.any():
        return float("nan")
    per_group = (rank_sum[scored] - pos[scored] * (pos[scored] + 1) / 2.0) / (pos[scored] * neg[scored])
    return float(np.average(per_group, weights=size[scored]))


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 labels, computed stably from logits."""
    y = np.asarray(labels, np.float64).ravel()
    z = np.asarray(logits, np.float64).ravel()
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def evaluate(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray | None = None) -> dict[str, float]:
    """All eval metrics of one split: ``auc``, ``logloss``, ``gauc`` (when groups are given), ``num_examples``,
    ``mean_prediction`` and ``positive_rate``."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    out = {
        "auc": auc(labels, logits),
        "logloss": logloss(labels, logits),
        "num_examples": int(np.size(labels)),
        "mean_prediction": float(probs.mean()),
        "positive_rate": float(np.mean(labels)),
    }
    if groups is not None:
        out["gauc"] = group_auc(labels, logits, groups)
    return out
