"""Detection metrics against scikit-learn and hand counts; bootstrap intervals; policy scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guardrails.offline.evaluate import bootstrap_intervals, metrics, rates_at, tpr_at_fpr

SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.65, 0.3, 0.55, 0.05, 0.6])
LABELS = np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0, 1])


def test_metrics_equal_sklearn() -> None:
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    m = metrics(SCORES, LABELS, threshold=0.5)
    assert m["auroc"] == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert m["auprc"] == pytest.approx(average_precision_score(LABELS, SCORES))
    pred = (SCORES >= 0.5).astype(int)
    assert m["f1"] == pytest.approx(f1_score(LABELS, pred))
    assert m["fpr"] == pytest.approx(((pred == 1) & (LABELS == 0)).sum() / (LABELS == 0).sum())
    assert m["tpr"] == pytest.approx(((pred == 1) & (LABELS == 1)).sum() / (LABELS == 1).sum())


def test_tpr_at_fpr_matches_roc_curve() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = rng.normal(0, 1, 400) + 1.2 * y
    fpr, tpr, _ = roc_curve(y, s)
    for target in (0.01, 0.05, 0.2):
        want = tpr[fpr <= target + 1e-12].max()
        assert tpr_at_fpr(s, y, target) == pytest.approx(want)


def test_nan_scores_never_fire_and_rank_lowest() -> None:
    s = np.array([np.nan, 0.2, 0.9, np.nan])
    y = np.array([1, 0, 1, 0])
    r = rates_at(s, y, 0.0)
    assert r["tpr"] == 0.5 and r["fpr"] == 0.5
    assert metrics(s, y)["auroc"] == pytest.approx(0.625)  # NaN ties at the bottom


def test_single_class_reports_rates_only() -> None:
    m = metrics(np.array([0.1, 0.7, 0.3]), np.array([0, 0, 0]), threshold=0.5)
    assert math.isnan(m["auroc"]) and m["fpr"] == pytest.approx(1 / 3)


def test_bootstrap_interval_contains_point_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.normal(0, 1, 300) + y
    ci = bootstrap_intervals(s, y, 0.5, n=200)
    point = metrics(s, y, 0.5)
    for k in ("auroc", "fpr", "tpr"):
        lo, hi = ci[k]
        assert lo <= point[k] <= hi
        assert hi - lo < 0.3
