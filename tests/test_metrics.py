"""Metrics on fixed predictions give the values worked out by hand."""
import numpy as np
import pytest

from edge import metrics as M

# 10 cells: 4 TP, 1 FN, 3 TN, 2 FP at threshold 0.5
Y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.55, 0.65, 0.3, 0.2, 0.1])


def test_confusion_and_point_metrics():
    m = M.report(Y, P)
    assert m["confusion_matrix"] == [[3, 2], [1, 4]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(0.8)
    assert m["specificity"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 * (4 / 6) * 0.8 / (4 / 6 + 0.8))
    assert m["mcc"] == pytest.approx((4 * 3 - 2 * 1) / np.sqrt(6 * 5 * 5 * 4))


def test_auc_counts_pairs_and_ties():
    # 25 positive-negative pairs; negatives 0.55 and 0.65 outrank positive 0.4, 0.65 outranks 0.6
    assert M.roc_auc(Y, P) == pytest.approx(22 / 25)
    assert M.roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_threshold_for_sensitivity_reaches_the_target():
    t = M.threshold_for_sensitivity(Y, P, 1.0)
    assert t == pytest.approx(0.4)
    assert M.binary_metrics(Y, P, t)["recall"] == 1.0
    assert M.threshold_for_sensitivity(Y, P, 0.6) == pytest.approx(0.7)


def test_grouped_bootstrap_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = y * 0.3 + rng.random(400) * 0.7
    groups = [f"P{i % 20}" for i in range(400)]
    r = M.report(y, p, groups, reps=200)
    for k in ("accuracy", "auc", "f1"):
        lo, hi = r["ci95"][k]
        assert lo <= r[k] <= hi and hi - lo > 0
    assert r["n_groups"] == 20


def test_parity_against_reference():
    d = M.parity(Y, P, 1 - P)  # every label flips
    assert d["agreement_pct"] == 0.0
    assert d["delta_accuracy_pp"] == pytest.approx(100 * (0.3 - 0.7))
    same = M.parity(Y, P, P)
    assert same["agreement_pct"] == 100.0 and same["max_abs_dprob"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn(seed):
    from sklearn import metrics as S
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.35 * y + rng.random(500) * 0.65, 0, 1).round(2)  # rounding makes ties
    w = rng.random(500) + 0.5
    m = M.binary_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(S.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(S.precision_score(y, pred))
    assert m["recall"] == pytest.approx(S.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(S.recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(S.f1_score(y, pred))
    assert m["mcc"] == pytest.approx(S.matthews_corrcoef(y, pred))
    assert m["auc"] == pytest.approx(S.roc_auc_score(y, p))
    assert M.roc_auc(y, p, w) == pytest.approx(S.roc_auc_score(y, p, sample_weight=w))
    assert np.allclose(M.confusion(y, pred), S.confusion_matrix(y, pred))


def test_fit_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 20000)  # the model's logits
    y = (rng.random(20000) < 1 / (1 + np.exp(-z / 2.0))).astype(int)  # the truth is half as sure
    p = 1 / (1 + np.exp(-z))
    assert M.fit_temperature(y, p) == pytest.approx(2.0, rel=0.05)
    from edge.card import calibrated
    assert M.ece(y, calibrated(p, M.fit_temperature(y, p))) < M.ece(y, p) / 3


def test_ece_by_hand():
    # two bins of the predicted class's confidence: 0.6 (2 right of 2) and 0.9 (1 right of 2)
    y = np.array([1, 0, 1, 1])
    p = np.array([0.6, 0.4, 0.9, 0.9])
    want = 0.5 * abs(1.0 - 0.6) + 0.5 * abs(1.0 - 0.9)
    assert M.ece(y, p, bins=5) == pytest.approx(want)
    y2 = np.array([1, 0, 1, 0])
    assert M.ece(y2, p, bins=5) == pytest.approx(0.5 * abs(1.0 - 0.6) + 0.5 * abs(0.5 - 0.9))


def test_calibration_keeps_labels_and_thresholds():
    from edge.card import calibrated
    p = np.linspace(0.001, 0.999, 999)
    for t in (0.7, 1.0, 1.5):
        q = calibrated(p, t)
        assert np.all(np.diff(q) > 0) and np.array_equal(q >= 0.5, p >= 0.5)
    assert calibrated(0.9, 1.0) == pytest.approx(0.9)
