"""Likely label errors in the training split, found from out-of-fold predictions (confident learning).

Every training image gets its P(Parasitized) from a model trained on the other folds (folds by
patient, so that model never saw the patient); cleanlab's `find_label_issues` flags the images whose
given label those probabilities contradict beyond each class's own confidence. Flagged images are
candidates to look at (issues.png) and to leave out of training (`train --exclude issues.csv`, or one
side only: issues_labelled_parasitized.csv / issues_labelled_uninfected.csv).
Validation and test keep their original labels: nothing here ever touches them.
"""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge.card import atomic_write_text
from train.data import DataError, Prepared


def out_of_fold(data: Prepared, cfg, folds: int, workdir: Path, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(train-split indices, their out-of-fold P(Parasitized)). Each fold's model stops early on the
    validation split, never on the fold it predicts."""
    import keras
    from sklearn.model_selection import GroupKFold

    from train.train import train
    tr = data.indices("train")
    groups = np.array(data.groups)[tr]
    probs = np.full(len(tr), np.nan)
    for k, (fit, held) in enumerate(GroupKFold(folds).split(tr, groups=groups)):
        log(f"fold {k + 1}/{folds}: training on {len(fit)} images of {len(set(groups[fit]))} patients, "
            f"predicting {len(held)} of {len(set(groups[held]))}")
        splits = data.splits.copy()
        splits[tr[held]] = "held"
        model, info = train(replace(data, splits=splits), cfg, workdir / f"fold{k + 1}")
        atomic_write_text(workdir / f"fold{k + 1}" / "train_info.json", json.dumps(info, indent=1) + "\n")
        x = data.images[tr[held]]
        probs[held] = np.concatenate([np.asarray(model.predict(np.asarray(x[i:i + 256], np.float32), verbose=0)).ravel()
                                      for i in range(0, len(x), 256)])
        keras.backend.clear_session()
    return tr, probs


def find_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices (into labels) of likely label errors, most confident first."""
    from cleanlab.filter import find_label_issues
    return find_label_issues(labels=np.asarray(labels, int), pred_probs=np.c_[1 - probs, probs],
                             return_indices_ranked_by="self_confidence")


def issue_grid(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: Path, per_class: int = 24) -> None:
    """The most confident issues of each given label, side by side, each captioned with its
    out-of-fold P(Parasitized), so a person can judge them."""
    import cv2
    rows = []
    for y, name in ((0, "labelled Uninfected"), (1, "labelled Parasitized")):
        idx = [i for i in range(len(labels)) if labels[i] == y][:per_class]
        tiles = []
        for i in idx:
            t = cv2.resize(np.asarray(images[i]), (112, 112), interpolation=cv2.INTER_AREA).copy()
            t = cv2.copyMakeBorder(t, 0, 18, 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255))
            cv2.putText(t, f"P={probs[i]:.2f}", (4, 126), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
            tiles.append(t)
        tiles += [np.full((130, 112, 3), 255, np.uint8)] * (-len(tiles) % 8)
        if not tiles:
            continue
        head = np.full((28, 112 * 8, 3), 255, np.uint8)
        cv2.putText(head, f"{name} (out-of-fold P(Parasitized) says otherwise)", (4, 20), cv2.FONT_HERSHEY_SIMPLEX,
                    0.55, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(head)
        rows += [np.hstack(tiles[i:i + 8]) for i in range(0, len(tiles), 8)]
    if rows:
        from edge.report import encode
        path.write_bytes(encode(cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR), ".png"))


def run(data: Prepared, cfg, folds: int, out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tr, probs = out_of_fold(data, cfg, folds, out / "folds", log)
    labels = data.labels[tr]
    ranked = find_issues(labels, probs)
    flagged = set(ranked.tolist())
    rows = [{"relpath": data.relpaths[i], "label": int(labels[j]), "group": data.groups[i],
             "p_parasitized_oof": round(float(probs[j]), 5), "issue": int(j in flagged)} for j, i in enumerate(tr)]
    _write_csv(out / "oof.csv", rows)
    issues = [rows[j] for j in ranked]
    _write_csv(out / "issues.csv", issues)
    for y, name in ((1, "parasitized"), (0, "uninfected")):  # look at each side before leaving it out
        _write_csv(out / f"issues_labelled_{name}.csv", [r for r in issues if r["label"] == y])
    issue_grid(data.images[tr[ranked]], labels[ranked], probs[ranked], out / "issues.png")
    pred = probs >= 0.5
    summary = {"folds": folds, "train_images": int(len(tr)), "issues": int(len(ranked)),
               "issues_labelled_uninfected": int((labels[ranked] == 0).sum()),
               "issues_labelled_parasitized": int((labels[ranked] == 1).sum()),
               "oof_accuracy": float((pred == labels).mean()),
               "recipe": cfg.recipe, "epochs": cfg.epochs, "input_size": int(data.images.shape[1])}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["relpath", "label", "group", "p_parasitized_oof", "issue"])
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_exclusions(path: Path, data: Prepared) -> np.ndarray:
    """Indices of the training images a CSV (a `relpath` column) lists. Listing a validation or test
    image is an error: those keep their labels and their place."""
    with open(path, newline="") as f:
        rel = [r["relpath"] for r in csv.DictReader(f)] if path.stat().st_size else []
    where = {r: i for i, r in enumerate(data.relpaths)}
    unknown = [r for r in rel if r not in where]
    if unknown:
        raise DataError(f"{path}: {len(unknown)} listed images are not in {data.root} (first: {unknown[0]})")
    idx = np.array([where[r] for r in rel], dtype=np.int64)
    outside = [data.relpaths[i] for i in idx if data.splits[i] != "train"]
    if outside:
        raise DataError(f"{path}: {len(outside)} listed images are in the validation or test split "
                         f"(first: {outside[0]}); only training images can be left out")
    return np.unique(idx)
