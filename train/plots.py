"""Pictures people would rather look at than read: curves, confusion matrices, ROC."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edge.card import CLASS_NAMES  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def training_curves(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    return _save(curves_figure(history, title), path)


def curves_figure(history: dict[str, list[float]], title: str = ""):
    """Loss, accuracy and AUC per epoch, numbered as in history.csv (from 0); a marker on every epoch, so a
    one-epoch run still shows its point."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ("loss", "accuracy", "auc")):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            if prefix + key in history:
                y = history[prefix + key]
                x = history.get("epoch", list(range(len(y))))
                ax.plot(x, y, style, markersize=4, label=("validation" if prefix else "train"))
        ax.set_title(key)
        ax.set_xlabel("epoch (as in history.csv)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def _draw_cm(ax, cm, title):
    cm = np.asarray(cm)
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{cm[i, j]}\n{cm[i, j] / max(cm[i].sum(), 1):.1%}", ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks([0, 1], [f"pred {c}" for c in CLASS_NAMES])
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_title(title, fontsize=10)


def confusion_matrix(cm, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    _draw_cm(ax, cm, title)
    return _save(fig, path)


def confusion_grid(named: list[tuple[str, list]], path: Path) -> Path:
    """One figure with a confusion matrix per model, for the README comparison."""
    fig, axes = plt.subplots(1, len(named), figsize=(4.6 * len(named), 4), squeeze=False)
    for ax, (name, cm) in zip(axes[0], named):
        _draw_cm(ax, cm, name)
    return _save(fig, path)


def roc(y, p, path: Path, title: str = "", auc: float | None = None) -> Path:
    y, p = np.asarray(y), np.asarray(p)
    thr = np.unique(p)[::-1]
    tpr = [np.mean(p[y == 1] >= t) for t in thr]
    fpr = [np.mean(p[y == 0] >= t) for t in thr]
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0] + fpr + [1], [0] + tpr + [1], label=f"AUC {auc:.4f}" if auc is not None else None)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability(sets: dict, path: Path, title: str = "", bins: int = 15) -> Path:
    """Reliability diagram per split: accuracy of the predicted class against its confidence, before and
    after temperature scaling. sets: name → (labels, raw P, calibrated P)."""
    from edge.metrics import ece, reliability_bins
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.4), squeeze=False)
    for ax, (name, (y, raw, cal)) in zip(axes[0], sets.items()):
        ax.plot([0.5, 1], [0.5, 1], ":", color="grey", label="perfect")
        for p, style, lab in ((raw, "-o", "raw"), (cal, "-s", "temperature-scaled")):
            conf, acc, _ = reliability_bins(y, p, bins)
            ax.plot(conf, acc, style, markersize=4, label=f"{lab} (ECE {ece(y, p, bins):.4f})")
        ax.set_xlabel("confidence of the predicted class")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} ({len(y)} images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
