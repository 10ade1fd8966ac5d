"""Evaluate a model (.keras, or any exported artifact through the edge runtime) on a labelled set."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.card import CLASS_NAMES, atomic_write_text, label_of
from edge.images import ImageError
from edge import metrics as M
from train import plots


@dataclass
class LabelledSet:
    images: np.ndarray  # N×S×S×3 uint8
    labels: np.ndarray
    groups: list[str]
    relpaths: list[str]
    name: str  # e.g. "test split (patient-grouped, hash …)"


def from_prepared(data_dir: Path, split: str) -> LabelledSet:
    from train.data import DataError, load_prepared
    d = load_prepared(data_dir)
    idx = d.indices(split)
    if len(idx) == 0:
        raise DataError(f"{data_dir}: split {split!r} is empty")
    kind = d.split_info.get("kind", "patient")
    return LabelledSet(np.asarray(d.images[idx]), d.labels[idx], [d.groups[i] for i in idx],
                       [d.relpaths[i] for i in idx], f"{split} split ({kind}-grouped, hash {d.split_info['hash']})"
                       if kind == "patient" else f"{split} split (RANDOM image-level split, hash {d.split_info['hash']})")


def from_folder(folder: Path, size: int) -> LabelledSet:
    """Any labelled folder (Parasitized/ and Uninfected/ subfolders, Kaggle layout included)."""
    from train.data import scan_source
    from train.split import patient_group
    from edge.images import load_image
    from edge.preprocess import resize_rgb
    items, _ = scan_source(Path(folder))
    imgs, labels, groups, rel = [], [], [], []
    for it in items:
        try:
            imgs.append(resize_rgb(load_image(it.member), size))
        except ImageError as e:
            print(f"skipped {e}")
            continue
        labels.append(CLASS_NAMES.index(it.label))
        groups.append(patient_group(Path(it.key).name))
        rel.append(it.key)
    return LabelledSet(np.stack(imgs), np.array(labels), groups, rel, f"folder {folder}")


def keras_predict(model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = [np.asarray(model(images[i:i + batch].astype(np.float32), training=False)).reshape(-1)
           for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float64)


def predict_file(model_path: Path, images: np.ndarray) -> np.ndarray:
    """P(Parasitized) for uint8 images from a .keras file or an exported artifact."""
    if model_path.suffix == ".keras":
        import keras
        return keras_predict(keras.models.load_model(model_path, compile=False), images)
    from edge.runtime import load_classifier
    return load_classifier(model_path).predict(images).astype(np.float64)


def evaluate(y, p, groups, threshold: float, out: Path | None, title: str, reps: int = 1000) -> dict:
    rep = M.report(y, p, groups, threshold, reps=reps)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        plots.confusion_matrix(rep["confusion_matrix"], out / "confusion_matrix.png", title)
        plots.roc(y, p, out / "roc.png", title, rep["auc"])
    return rep


def write_predictions(path: Path, ls: LabelledSet, p: np.ndarray, threshold: float) -> None:
    rows = ["path,true_label,prob_parasitized,predicted_label"]
    for r, y, pi in zip(ls.relpaths, ls.labels, p):
        rows.append(f"{r},{CLASS_NAMES[int(y)]},{pi:.6f},{label_of(pi, threshold)}")
    atomic_write_text(path, "\n".join(rows) + "\n")


def classification_report(rep: dict) -> str:
    """A sklearn-style text report from our own metrics."""
    (tn, fp), (fn, tp) = rep["confusion_matrix"]
    ci = rep.get("ci95", {})

    def c(k):
        return f" [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" if k in ci else ""

    lines = [f"n={rep['n']}  groups={rep.get('n_groups', '?')}  threshold={rep['threshold']:.3f}",
             f"accuracy     {rep['accuracy']:.4f}{c('accuracy')}",
             f"precision    {rep['precision']:.4f}{c('precision')}",
             f"recall/sens  {rep['recall']:.4f}{c('recall')}",
             f"specificity  {rep['specificity']:.4f}{c('specificity')}",
             f"f1           {rep['f1']:.4f}{c('f1')}",
             f"roc auc      {rep['auc']:.4f}{c('auc')}",
             f"mcc          {rep['mcc']:.4f}{c('mcc')}",
             f"confusion    TN={tn} FP={fp} FN={fn} TP={tp}"]
    if warning := small_sample_warning(rep):
        lines.append(warning)
    return "\n".join(lines)


SMALL_N, SMALL_GROUPS, SMALL_CLASS = 200, 10, 30


def small_sample_warning(rep: dict) -> str:
    """The intervals resample patient groups: with few images, groups or cells of a class they are too
    narrow to mean anything ([1.0000, 1.0000] on 8 images)."""
    (tn, fp), (fn, tp) = rep["confusion_matrix"]
    groups = rep.get("n_groups") or 0
    if rep["n"] >= SMALL_N and groups >= SMALL_GROUPS and min(tn + fp, fn + tp) >= SMALL_CLASS:
        return ""
    return (f"warning: small sample ({rep['n']} images, {groups} patient groups, {min(tn + fp, fn + tp)} in the "
            f"smaller class): the 95% intervals are not reliable below {SMALL_N} images, {SMALL_GROUPS} groups and "
            f"{SMALL_CLASS} per class")


def save_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")



def val_test_probs(model_path: Path, data_dir: Path) -> dict[str, tuple[LabelledSet, np.ndarray]]:
    """The validation split and, where the data has it, the test split, each with this artifact's own
    P(Parasitized): predicted once for everything chosen on validation and reported on test."""
    from train.data import DataError
    sets = {}
    for split in ("val", "test"):
        try:
            ls = from_prepared(data_dir, split)
        except DataError:  # a packed bundle carries no test split
            if split == "val":
                raise
            continue
        sets[split] = (ls, predict_file(model_path, ls.images))
    return sets


def set_operating_points(sets: dict[str, tuple[LabelledSet, np.ndarray]]) -> dict:
    """Operating points chosen on the validation split with this very artifact (an int8 model's own
    probabilities), plus the test split's sensitivity and specificity at each, with patient-bootstrap CIs."""
    val, p_val = sets["val"]
    ops = M.operating_points(val.labels, p_val, groups=val.groups)
    if "test" in sets:
        for op in ops.values():
            op["test"] = split_rates(*sets["test"], op["threshold"])
    return ops


def split_rates(ls: LabelledSet, p: np.ndarray, threshold: float) -> dict:
    r = M.report(ls.labels, p, ls.groups, threshold, reps=500)
    return {"n": r["n"], "n_groups": r["n_groups"], "sensitivity": r["recall"], "specificity": r["specificity"],
            "ci95": {"sensitivity": [round(v, 4) for v in r["ci95"]["recall"]],
                     "specificity": [round(v, 4) for v in r["ci95"]["specificity"]]}}


SCREEN_KEEP = 0.995  # share of the deciding model's counting positives (validation) the screen must forward


def screened_point(sets: dict, screen_sets: dict, counting: dict, screen_ref: str, screen_sha: str,
                   keep: float = SCREEN_KEEP) -> dict:
    """The counting rule run behind a fast screen: the screen's forward_at is the highest cut that still
    forwards `keep` of the cells the deciding model calls positive at counting on validation; the rule's own
    confusion counts (what the correction reads) on validation and its rates on test, at the same threshold
    (the rule only takes positives away, so validation specificity still meets the counting target).
    sets / screen_sets: each model's own P on the same validation (and test) images."""
    (val, p_val), (_, s_val) = sets["val"], screen_sets["val"]
    thr = counting["threshold"]
    called = np.sort(s_val[p_val >= thr])
    if len(called) == 0:
        from train.data import DataError
        raise DataError("the deciding model calls no validation cell positive at counting: nothing to screen for")
    # never above the threshold: a cleared cell's P is the screen's and must stay an Uninfected call
    forward_at = min(float(called[int(np.floor((1 - keep) * len(called)))]), thr)

    def rule(p, s):
        return np.where(s >= forward_at, p, s)

    op = M.operating_point(val.labels, rule(p_val, s_val), thr,
                           f"{counting['rule']}, cells the screen gives P < {forward_at:.4f} Uninfected", val.groups)
    fwd = s_val >= forward_at
    op["screen"] = {"model": screen_ref, "sha256": screen_sha, "forward_at": forward_at, "keep": keep,
                    "forwarded_val": {"uninfected": float(fwd[val.labels == 0].mean()),
                                      "parasitized": float(fwd[val.labels == 1].mean())}}
    if "test" in sets:
        (test, p_test), (_, s_test) = sets["test"], screen_sets["test"]
        screened = rule(p_test, s_test)
        op["test"] = split_rates(test, screened, thr)
        op["test"]["agreement_with_counting"] = float(np.mean((screened >= thr) == (p_test >= thr)))
    return op


def fit_calibration(sets: dict[str, tuple[LabelledSet, np.ndarray]], name: str,
                    plots_dir: Path | None = None) -> tuple[float, dict]:
    """Temperature scaling fitted on the validation split with this artifact's own probabilities; the ECE
    before and after on validation and, where it is there, on the test split (scored, never fitted on)."""
    from edge.card import calibrated
    val, p_val = sets["val"]
    t = M.fit_temperature(val.labels, p_val)
    out = {"fitted_on": val.name, "val_ece_before": M.ece(val.labels, p_val),
           "val_ece_after": M.ece(val.labels, calibrated(p_val, t))}
    if "test" in sets:
        test, p_test = sets["test"]
        out.update(test_ece_before=M.ece(test.labels, p_test), test_ece_after=M.ece(test.labels, calibrated(p_test, t)),
                   test_n=int(len(test.labels)))
    out = {k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}
    if plots_dir is not None:
        plots.reliability({("validation" if k == "val" else k): (ls.labels, p, calibrated(p, t))
                           for k, (ls, p) in sets.items()},
                          plots_dir / f"{name}.reliability.png", f"{name}, T = {t:.3f}")
    return t, out
