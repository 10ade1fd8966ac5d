"""What test-time augmentation (the 8 flips and rotations) and a two-model ensemble buy, and what they cost.

    python -m benchmarks.tta --data data/prepared

Chosen on the validation split, reported on both; cost is the measured ms per cell at batch 32 on this
machine, each option beside the single model measured in the same run. Writes
benchmarks/results/tta_ensemble.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge import metrics as M
from edge.card import atomic_write_text
from edge.runtime import load_classifier

MODELS = ("models/cnn/cnn_int8.tflite", "models/mobilenetv2/mobilenetv2_int8.tflite")


def dihedral(x: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and flips of an N×H×W×3 batch (a cell has no up or left)."""
    rots = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    return [np.ascontiguousarray(v) for r in rots for v in (r, r[:, :, ::-1])]


def predict(model, images: np.ndarray, tta: bool, batch: int = 32) -> tuple[np.ndarray, float]:
    """P(Parasitized) (the mean over the 8 views with tta) and ms per cell."""
    out, t0 = [], time.perf_counter()
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        out.append(np.mean([model.predict(v) for v in dihedral(x)], axis=0) if tta else model.predict(x))
    return np.concatenate(out), 1000 * (time.perf_counter() - t0) / len(images)


def run(data_dir: Path, out: Path, models=MODELS, log=print) -> dict:
    from benchmarks.hardware import machine
    from train.evaluate import from_prepared
    splits = {s: from_prepared(data_dir, s) for s in ("val", "test")}
    loaded = [load_classifier(m) for m in models]
    probs, ms = {}, {}
    for m in loaded:
        for tta in (False, True):
            key = f"{m.path.name}{' + TTA' if tta else ''}"
            for s, ls in splits.items():
                probs[(key, s)], t = predict(m, np.asarray(ls.images), tta)
                ms[key] = t if s == "test" else ms.get(key, t)
            log(f"  {key}: {ms[key]:.2f} ms/cell")
    names = [m.path.name for m in loaded]
    for tta in ("", " + TTA"):
        key = f"ensemble ({' + '.join(names)}){tta}"
        for s in splits:
            probs[(key, s)] = np.mean([probs[(n + tta, s)] for n in names], axis=0)
        ms[key] = sum(ms[n + tta] for n in names)
    rows = []
    for key in ms:
        row = {"option": key, "ms_per_cell_b32": ms[key]}
        for s, ls in splits.items():
            m = M.binary_metrics(ls.labels, probs[(key, s)], 0.5)
            row[f"{s}_accuracy"], row[f"{s}_auc"] = m["accuracy"], m["auc"]
        rows.append(row)
    res = {"machine": machine(), "threshold": 0.5, "val_n": int(len(splits["val"].labels)),
           "test_n": int(len(splits["test"].labels)), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tta_ensemble.json", json.dumps(res, indent=1, default=float) + "\n")
    atomic_write_text(out / "tta_ensemble.md", markdown(res))
    return res


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Test-time augmentation and a two-model ensemble (int8 TFLite, threshold {r['threshold']})", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores. Validation {r['val_n']} images (where an "
             f"option would be chosen), test {r['test_n']} images (reported once).", "",
             "| option | val accuracy | val AUC | test accuracy | test AUC | ms/cell (batch 32) | × single CNN |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = r["rows"][0]["ms_per_cell_b32"]
    for x in r["rows"]:
        lines.append(f"| {x['option']} | {x['val_accuracy']:.4f} | {x['val_auc']:.4f} | {x['test_accuracy']:.4f} | "
                     f"{x['test_auc']:.4f} | {x['ms_per_cell_b32']:.2f} | {x['ms_per_cell_b32'] / base:.1f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    print(markdown(run(a.data, a.out)))
