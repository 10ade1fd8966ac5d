"""Binary classification metrics with patient-grouped bootstrap CIs (NumPy only).

Shared by `evaluate`, the export parity gate and the benchmarks, so they all report the same numbers.
"""
from __future__ import annotations

import warnings

import numpy as np

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auc", "mcc")


def confusion(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """[[TN, FP], [FN, TP]] (rows: true Uninfected, Parasitized)."""
    w = np.ones(len(y)) if w is None else w
    tp = np.sum(w * ((y == 1) & (pred == 1)))
    tn = np.sum(w * ((y == 0) & (pred == 0)))
    fp = np.sum(w * ((y == 0) & (pred == 1)))
    fn = np.sum(w * ((y == 1) & (pred == 0)))
    return np.array([[tn, fp], [fn, tp]])


def roc_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Area under the ROC curve (ties count half), optionally with sample weights."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    w = np.ones(len(y)) if w is None else np.asarray(w, float)
    uniq, inv = np.unique(p, return_inverse=True)
    neg_w = np.bincount(inv, weights=w * (y == 0), minlength=len(uniq))
    pos_w = np.bincount(inv, weights=w * (y == 1), minlength=len(uniq))
    pos, neg = pos_w.sum(), neg_w.sum()
    if pos == 0 or neg == 0:
        return float("nan")
    below = np.cumsum(neg_w) - neg_w
    return float(np.sum(pos_w * (below + 0.5 * neg_w)) / (pos * neg))


def from_confusion(cm: np.ndarray) -> dict:
    (tn, fp), (fn, tp) = cm
    n = tn + fp + fn + tp

    def div(a, b):
        return float(a / b) if b else float("nan")

    prec, rec = div(tp, tp + fp), div(tp, tp + fn)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": div(tp + tn, n),
        "precision": prec,
        "recall": rec,
        "specificity": div(tn, tn + fp),
        "f1": div(2 * prec * rec, prec + rec) if prec == prec and rec == rec else float("nan"),
        "mcc": div(tp * tn - fp * fn, denom),
    }


def binary_metrics(y, p, threshold: float = 0.5, w=None) -> dict:
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    pred = (p >= threshold).astype(int)
    cm = confusion(y, pred, w)
    out = from_confusion(cm)
    out["auc"] = roc_auc(y, p, w)
    return out


def bootstrap_ci(y, p, groups, threshold: float = 0.5, reps: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """95% CIs by resampling whole patient groups with replacement (cells of one patient are not independent)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    uniq, gidx = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in METRICS}
    for _ in range(reps):
        draw = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq)).astype(float)
        m = binary_metrics(y, p, threshold, w=draw[gidx])
        for k in METRICS:
            samples[k].append(m[k])
    with warnings.catch_warnings():  # a resample with one class has no AUC: it is left out (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: [float(np.nanpercentile(v, 100 * alpha / 2)), float(np.nanpercentile(v, 100 * (1 - alpha / 2)))]
                for k, v in samples.items()}


def report(y, p, groups=None, threshold: float = 0.5, reps: int = 1000) -> dict:
    """Point metrics, confusion matrix and (with groups) grouped-bootstrap CIs, JSON-ready."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    out = {"n": int(len(y)), "threshold": float(threshold), **binary_metrics(y, p, threshold)}
    out["confusion_matrix"] = confusion(y, (p >= threshold).astype(int)).astype(int).tolist()
    if groups is not None:
        out["n_groups"] = int(len(set(groups)))
        out["ci95"] = bootstrap_ci(y, p, groups, threshold, reps)
    return out


def threshold_for_sensitivity(y, p, target: float) -> float:
    """The highest threshold whose sensitivity (recall) reaches target: screening favours sensitivity."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive samples to set a sensitivity operating point")
    k = int(np.ceil(target * len(pos))) - 1
    return float(pos[min(max(k, 0), len(pos) - 1)])


def threshold_for_specificity(y, p, target: float) -> float:
    """The lowest threshold whose specificity reaches target: counting favours specificity, since every
    false positive inflates the parasitemia."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    neg = np.sort(p[y == 0])
    if len(neg) == 0:
        raise ValueError("no negative samples to set a specificity operating point")
    k = int(np.ceil(target * len(neg)))  # at least k negatives must fall below the threshold
    if k >= len(neg):
        return float(np.nextafter(neg[-1], np.inf))
    return float(neg[k]) if k == 0 or neg[k] > neg[k - 1] else float(np.nextafter(neg[k], np.inf))


# name → (rule, target): screening misses few infected cells, counting calls few healthy cells positive
OPERATING_RULES = {"screening": ("sensitivity", 0.97), "counting": ("specificity", 0.995)}


def operating_point(y, p, threshold: float, rule: str = "", groups=None) -> dict:
    """A threshold with the confusion counts it gives on (y, p): what a parasitemia correction needs; with
    the patient of each sample (`groups`), each patient's counts too, since a smear is one patient and the
    rates vary from one to the next."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    call = (p >= threshold).astype(int)
    c = _counts(y, call)
    op = {"threshold": float(threshold), "rule": rule, "sensitivity": c["tp"] / max(1, c["tp"] + c["fn"]),
          "specificity": c["tn"] / max(1, c["tn"] + c["fp"]), "counts": c}
    if groups is not None:
        g = np.asarray(groups)
        op["counts_by_patient"] = [_counts(y[m], call[m]) for m in (g == k for k in np.unique(g))]
    return op


def _counts(y: np.ndarray, call: np.ndarray) -> dict:
    (tn, fp), (fn, tp) = confusion(y, call).astype(int).tolist()
    return {"tp": tp, "fn": fn, "tn": tn, "fp": fp}


def operating_points(y, p, rules: dict = OPERATING_RULES, groups=None) -> dict:
    """Each named operating point, chosen on (y, p) — the validation split — with its counts there."""
    out = {}
    for name, (kind, target) in rules.items():
        t = threshold_for_sensitivity(y, p, target) if kind == "sensitivity" else threshold_for_specificity(y, p, target)
        out[name] = operating_point(y, p, t, f"{kind} >= {target} on validation", groups)
    return out


def parity(y, p_ref, p_new, threshold: float = 0.5) -> dict:
    """How an artifact's predictions compare with the float reference on the same images."""
    y, p_ref, p_new = (np.asarray(a, float) for a in (y, p_ref, p_new))
    ref, new = binary_metrics(y, p_ref, threshold), binary_metrics(y, p_new, threshold)
    d = np.abs(p_new - p_ref)
    return {
        "accuracy": new["accuracy"], "f1": new["f1"], "auc": new["auc"],
        "ref_accuracy": ref["accuracy"],
        "delta_accuracy_pp": 100 * (new["accuracy"] - ref["accuracy"]),
        "agreement_pct": 100 * float(np.mean((p_new >= threshold) == (p_ref >= threshold))),
        "mean_abs_dprob": float(d.mean()), "max_abs_dprob": float(d.max()),
    }


def reliability_bins(y, p, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin of the predicted class's confidence (0.5..1): its mean confidence,
    its accuracy and its share of the samples."""
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    pred = (p >= 0.5).astype(int)
    conf = np.where(pred == 1, p, 1 - p)
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    used = [b for b in range(bins) if (idx == b).any()]
    return (np.array([conf[idx == b].mean() for b in used]), np.array([np.mean(pred[idx == b] == y[idx == b]) for b in used]),
            np.array([np.mean(idx == b) for b in used]))


def ece(y, p, bins: int = 15) -> float:
    """Expected calibration error of the predicted class's confidence, equal-width bins."""
    conf, acc, share = reliability_bins(y, p, bins)
    return float(np.sum(share * np.abs(acc - conf)))


def fit_temperature(y, p) -> float:
    """The temperature minimising the negative log-likelihood of sigmoid(logit(p) / T) (golden section on
    log T in [e^-3, e^3]): one parameter, so it cannot overfit a validation split of thousands."""
    y = np.asarray(y).astype(float)
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))

    def nll(log_t):
        q = np.clip(1 / (1 + np.exp(-z / np.exp(log_t))), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))

    a, b, g = -3.0, 3.0, (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(80):
        if nll(c) < nll(d):
            b, d = d, c
            c = b - g * (b - a)
        else:
            a, c = c, d
            d = a + g * (b - a)
    return float(np.exp((a + b) / 2))
