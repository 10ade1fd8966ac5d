"""Classifiers under stain and camera shifts: the validation crops recoloured, darkened, blurred or
coarsened as another lab's slides and cameras might (`benchmarks.fields.SHIFTS`), each model scored at
its own counting threshold (specificity ≥ 0.995 on the unshifted validation crops). How a candidate
trained for robustness is judged against the shipped model before it can replace it.

    python -m benchmarks.shifts models/mobilenetv2/mobilenetv2.keras runs/x/model.keras --out DIR
      → DIR/shifts.{md,json}
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.fields import SHIFTS, rates, shifted
from edge.card import atomic_write_text
from edge.metrics import OPERATING_RULES, roc_auc, threshold_for_specificity


def score(models: dict[str, object], x0: np.ndarray, y: np.ndarray, log=print) -> dict:
    """name → predict(uint8 crops) → P(parasitized); per model its counting threshold and, per shift,
    AUC, accuracy at 0.5, and sensitivity and specificity at that threshold."""
    shifted_x = {name: shifted(x0, **kw) if kw else x0 for name, kw in SHIFTS.items()}
    out = {}
    for m, predict in models.items():
        probs = {name: predict(x) for name, x in shifted_x.items()}
        thr = threshold_for_specificity(y, probs["none"], OPERATING_RULES["counting"][1])
        rows = [{"shift": name, "auc": roc_auc(y, p), "accuracy": float(((p >= 0.5) == y).mean()), **rates(y, p, thr)}
                for name, p in probs.items()]
        out[m] = {"threshold": thr, "rows": rows,
                  "mean_sensitivity_shifted": float(np.mean([r["sensitivity"] for r in rows[1:]]))}
        log(f"{m}: threshold {thr:.4f}, sensitivity {rows[0]['sensitivity']:.3f} unshifted, "
            f"{out[m]['mean_sensitivity_shifted']:.3f} over the shifts")
    return out


def markdown(res: dict, n: int) -> str:
    names = list(res)
    head = " / ".join(names)
    lines = [f"# Under stain and camera shifts ({n} validation crops; each model at its own counting threshold)", "",
             "Thresholds: " + ", ".join(f"{m} {r['threshold']:.4f}" for m, r in res.items()), "",
             f"| shift | AUC {head} | accuracy at 0.5 | sensitivity at counting | specificity at counting |",
             "|---|---|---|---|---|"]
    for i, row in enumerate(res[names[0]]["rows"]):
        cells = [" / ".join(f"{res[m]['rows'][i][k]:.{d}f}" for m in names)
                 for k, d in (("auc", 4), ("accuracy", 4), ("sensitivity", 3), ("specificity", 4))]
        lines.append(f"| {row['shift']} | " + " | ".join(cells) + " |")
    lines.append("| mean over the shifts | | | " + " / ".join(f"{res[m]['mean_sensitivity_shifted']:.3f}" for m in names)
                 + " | |")
    return "\n".join(lines) + "\n"


def keras_predictor(path: Path):
    import keras

    from train.evaluate import keras_predict
    model = keras.models.load_model(path, compile=False)
    return lambda x: keras_predict(model, x)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help=".keras models (the first is the reference)")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from train.data import load_prepared
    d = load_prepared(a.data)
    idx = d.indices("val")
    x0, y = np.asarray(d.images[idx]), d.labels[idx].astype(int)
    names = [p.parent.name if p.name == "model.keras" else p.stem for p in a.models]
    res = score({n: keras_predictor(p) for n, p in zip(names, a.models)}, x0, y)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "shifts.json", json.dumps({"n": int(len(y)), "models": res}, indent=1))
    atomic_write_text(a.out / "shifts.md", md := markdown(res, len(y)))
    print(md)
