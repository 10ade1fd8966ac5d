"""After training: choose the threshold on validation, score the test split, write card and plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.card import ModelCard
from edge.metrics import threshold_for_sensitivity
from train import plots
from train.data import Prepared
from train.evaluate import evaluate, keras_predict, save_json
from train.train import TrainConfig, make_card, read_history


def finalize(model, out: Path, data: Prepared, cfg: TrainConfig, info: dict,
             target_sensitivity: float | None = None) -> ModelCard:
    model_path = out / "model.keras"
    model.save(model_path)  # re-saved uncompiled: no optimizer state in the shipped file
    va, te = data.indices("val"), data.indices("test")
    p_val = keras_predict(model, np.asarray(data.images[va]))
    threshold = 0.5 if target_sensitivity is None else threshold_for_sensitivity(data.labels[va], p_val, target_sensitivity)
    kind = data.split_info.get("kind", "patient")
    metrics = {"split_kind": kind, "split_hash": data.split_info["hash"],
               "val": evaluate(data.labels[va], p_val, [data.groups[i] for i in va], threshold, None, "", reps=200)}
    if len(te):
        p_test = keras_predict(model, np.asarray(data.images[te]))
        metrics["test"] = evaluate(data.labels[te], p_test, [data.groups[i] for i in te], threshold, out,
                                   f"{cfg.recipe} — test split ({kind}-grouped, n={len(te)})")
        save_json(out / "test_metrics.json", metrics["test"])
    if (out / "history.csv").exists():
        plots.training_curves(read_history(out / "history.csv"), out / "training_curves.png", cfg.recipe)
    return make_card(model_path, cfg, data, info, threshold, metrics)
