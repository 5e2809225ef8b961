"""Exact metrics against brute-force definitions."""
import itertools

import numpy as np
import pytest

from ctr import metrics


def brute_auc(labels, scores):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    scores = rng.integers(0, 7, n).astype(np.float32)  # few distinct values: many ties
    assert metrics.auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


def test_auc_continuous_scores_and_edge_cases():
    rng = np.random.default_rng(7)
    labels = rng.random(500) < 0.5
    scores = rng.normal(size=500) + labels
    assert metrics.auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
    assert metrics.auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert metrics.auc([1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8]) == 0.0
    assert metrics.auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_group_auc_matches_per_group_brute_force():
    rng = np.random.default_rng(3)
    n = 400
    groups = rng.integers(0, 25, n)
    labels = rng.random(n) < 0.4
    scores = rng.integers(0, 5, n) + 0.3 * labels
    total, weight = 0.0, 0
    for g in np.unique(groups):
        m = groups == g
        if labels[m].all() or not labels[m].any():
            continue
        total += m.sum() * brute_auc(labels[m], scores[m])
        weight += m.sum()
    assert metrics.group_auc(labels, scores, groups) == pytest.approx(total / weight, abs=1e-12)


def test_logloss_matches_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=1000)
    labels = rng.random(1000) < 0.5
    p = 1 / (1 + np.exp(-logits))
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert metrics.logloss(labels, logits) == pytest.approx(expected, rel=1e-10)
    assert np.isfinite(metrics.logloss([1, 0], [1e4, -1e4]))


def test_evaluate_reports_gauc_only_with_groups():
    out = metrics.evaluate(np.array([1, 0, 1, 0]), np.array([2.0, -1.0, 0.5, 1.0]))
    assert set(out) == {"auc", "logloss", "num_examples", "mean_prediction", "positive_rate"}
    out = metrics.evaluate(np.array([1, 0, 1, 0]), np.array([2.0, -1.0, 0.5, 1.0]), np.array([1, 1, 2, 2]))
    assert out["gauc"] == pytest.approx(1.0 * 0.5 + 0.0 * 0.5)
