"""After training: choose the threshold on validation, score the test split, write card and plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.card import CardError, ModelCard, read_card, write_card
from edge.metrics import threshold_for_sensitivity
from train import plots
from train.data import Prepared
from train.evaluate import evaluate, keras_predict, save_json
from train.train import TrainConfig, make_card, read_history


def finalize(model, out: Path, data: Prepared, cfg: TrainConfig, info: dict,
             target_sensitivity: float | None = None) -> ModelCard:
    model_path = out / "model.keras"
    kept = _unchanged_init_card(model, cfg) if target_sensitivity is None else None
    model.save(model_path)  # re-saved uncompiled: no optimizer state in the shipped file
    va, te = data.indices("val"), data.indices("test")
    p_val = keras_predict(model, np.asarray(data.images[va]))
    threshold = (kept.threshold if kept else 0.5) if target_sensitivity is None else \
        threshold_for_sensitivity(data.labels[va], p_val, target_sensitivity)
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
    card = make_card(model_path, cfg, data, info, threshold, metrics)
    if kept and kept.operating_points:
        card.operating_points = kept.operating_points
        write_card(model_path, card)
    return card


def _unchanged_init_card(model, cfg: TrainConfig) -> ModelCard | None:
    """The --init model's card when this run left its weights exactly as they were (`--epochs 0`, a
    re-score): its threshold and operating points, set by `evaluate --update-card`, still hold."""
    if not cfg.init:
        return None
    import keras
    try:
        card = read_card(cfg.init)
    except CardError:
        return None
    before = keras.models.load_model(cfg.init, compile=False).get_weights()
    after = model.get_weights()
    same = len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))
    return card if same else None


def comparison(model_paths: list[Path], figure: Path | None = None) -> str:
    """The seed's model comparison table (plus AUC and the split) from model cards, and one
    confusion-matrix figure for all of them."""
    from edge.card import read_card
    lines = ["| Model | Recipe | Strategy | Accuracy [95% CI] | Precision | Recall | Specificity | F1 | AUC [95% CI] | Test split |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    named = []
    for p in model_paths:
        c = read_card(p)
        t = c.metrics["test"]
        ci = t.get("ci95", {})
        strategy = {"cnn": "from scratch", "mobilenetv2-frozen": "base frozen"}.get(
            c.recipe, "from scratch, then top blocks at lr/10" if "scratch" in c.weights_origin else "fine-tuned")
        if (c.training or {}).get("init"):
            strategy += f"; continued from {c.training['init']}"
        lines.append(
            f"| {c.name} | {c.recipe} | {strategy} (weights: {c.weights_origin}) | {t['accuracy']:.4f} "
            f"[{ci['accuracy'][0]:.4f}, {ci['accuracy'][1]:.4f}] | {t['precision']:.4f} | {t['recall']:.4f} | "
            f"{t['specificity']:.4f} | {t['f1']:.4f} | {t['auc']:.4f} [{ci['auc'][0]:.4f}, {ci['auc'][1]:.4f}] | "
            f"{c.metrics.get('split_kind', 'patient')}-grouped, {t['n']} images / {t.get('n_groups', '?')} groups, "
            f"hash {c.split_hash} |")
        named.append((f"{c.name} (acc {t['accuracy']:.3f})", t["confusion_matrix"]))
    if figure is not None:
        plots.confusion_grid(named, figure)
    return "\n".join(lines) + "\n"
