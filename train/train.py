"""Training from the decoded cache: augmentation for cell crops, early stopping, checkpoints, history."""
from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from edge.card import ModelCard, sha256_file, write_card
from train.data import Prepared
from train.models import base_layer_names, build_cnn, build_mobilenetv2, gradcam_layer_for, set_base_trainable

FINETUNE_FROM = "block_13_expand"  # the top three inverted-residual blocks + Conv_1


class CellBatches(keras.utils.PyDataset):
    """Batches from the uint8 cache with augmentation that suits cell crops.

    Flips and 90° rotations (a cell has no up), small brightness/contrast jitter and a small
    per-channel gain (stain colour/hue variation between slides).
    """

    def __init__(self, images, labels, idx, batch: int, augment: bool, seed: int = 0, **kw):
        super().__init__(**kw)
        self.images, self.labels, self.idx = images, labels, np.asarray(idx)
        self.batch, self.augment = batch, augment
        self.rng = np.random.default_rng(seed)
        self.order = self.idx.copy()
        if augment:
            self.rng.shuffle(self.order)

    def __len__(self):
        return int(np.ceil(len(self.order) / self.batch))

    def __getitem__(self, i):
        sel = np.sort(self.order[i * self.batch:(i + 1) * self.batch])  # sorted reads are faster on a memmap
        x = np.asarray(self.images[sel], dtype=np.float32)
        y = self.labels[sel].astype(np.float32)
        if self.augment:
            x = augment_batch(x, self.rng)
        return x, y

    def on_epoch_end(self):
        if self.augment:
            self.rng.shuffle(self.order)


def augment_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(x)
    k = rng.integers(0, 4, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        xi = np.rot90(x[i], k[i])
        out[i] = xi[:, ::-1] if flip[i] else xi
    gain = 1 + rng.uniform(-0.1, 0.1, (n, 1, 1, 1))  # brightness
    contrast = 1 + rng.uniform(-0.1, 0.1, (n, 1, 1, 1))
    hue = 1 + rng.uniform(-0.03, 0.03, (n, 1, 1, 3))  # per-channel gain
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    out = ((out - mean) * contrast + mean) * gain * hue
    return np.clip(out, 0, 255, out=out).astype(np.float32)


@dataclass
class TrainConfig:
    recipe: str = "cnn"
    epochs: int = 12
    finetune_epochs: int = 4
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    weights: str = "none"
    alpha: float = 1.0
    patience: int = 4
    mixed_precision: bool = False
    max_train: int | None = None  # cap on training images (tiny runs, tests)
    init: str | None = None  # continue from this .keras (e.g. only the fine-tune stage, with epochs=0)
    verbose: int = 1


def build(cfg: TrainConfig, size: int) -> keras.Model:
    if cfg.recipe == "cnn":
        return build_cnn(size)
    return build_mobilenetv2(size, weights=cfg.weights, alpha=cfg.alpha)


def _compile(model, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])


def train(data: Prepared, cfg: TrainConfig, out: Path) -> tuple[keras.Model, dict]:
    """Train one recipe; the best-on-validation model is saved as out/model.keras."""
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    size = data.images.shape[1]
    tr, va = data.indices("train"), data.indices("val")
    if cfg.max_train and len(tr) > cfg.max_train:
        rng = np.random.default_rng(cfg.seed)
        tr = np.sort(rng.choice(tr, cfg.max_train, replace=False))
        va = np.sort(rng.choice(va, min(len(va), max(cfg.max_train // 4, 8)), replace=False))
    train_ds = CellBatches(data.images, data.labels, tr, cfg.batch, augment=True, seed=cfg.seed)
    val_ds = CellBatches(data.images, data.labels, va, 128, augment=False)
    model = keras.models.load_model(cfg.init, compile=False) if cfg.init else build(cfg, size)
    base_names = base_layer_names(model)
    ckpt = out / "model.keras"
    history_csv = out / "history.csv"
    epoch0 = 0
    if cfg.init and history_csv.exists():  # continuing a run: keep its history and epoch count
        epoch0 = len(read_history(history_csv).get("epoch", []))
    else:
        history_csv.unlink(missing_ok=True)

    def callbacks():
        # The checkpoint keeps the best epoch across stages (and across a continued run).
        best = min(read_history(history_csv).get("val_loss", [np.inf])) if history_csv.exists() else None
        return [
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor="val_loss", save_best_only=True,
                                            initial_value_threshold=best if best is not None and np.isfinite(best) else None),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True),
            keras.callbacks.CSVLogger(str(history_csv), append=True),
        ]

    stages = []
    pretrained = cfg.weights != "none"
    if cfg.recipe == "mobilenetv2-frozen" and not pretrained and not cfg.init:
        print("warning: a frozen base with random weights learns only the head; use --weights imagenet or PATH")
    if cfg.recipe == "cnn":
        stages.append(("train", cfg.epochs, cfg.lr, None))
    elif cfg.recipe == "mobilenetv2-frozen":
        stages.append(("head (base frozen)", cfg.epochs, cfg.lr, "frozen"))
    else:  # mobilenetv2-finetune
        # From ImageNet weights the base is frozen first; from scratch there is nothing to protect.
        stages.append(("head (base frozen)" if pretrained else "all layers (from scratch)", cfg.epochs, cfg.lr,
                       "frozen" if pretrained else "all"))
        stages.append((f"fine-tune from {FINETUNE_FROM}", cfg.finetune_epochs, cfg.lr / 10, FINETUNE_FROM))
    t0, per_stage = time.time(), []
    for name, epochs, lr, trainable in stages:
        if epochs <= 0:
            continue
        if trainable == "frozen":
            set_base_trainable(model, base_names, None)
        elif trainable == "all" and base_names:
            set_base_trainable(model, base_names, base_names[0])  # a continued model may carry frozen layers
        elif trainable is not None:
            set_base_trainable(model, base_names, trainable)
        _compile(model, lr)
        print(f"stage: {name}, lr {lr:g}, {epochs} epochs, {len(tr)} train / {len(va)} val images", flush=True)
        ts = time.time()
        h = model.fit(train_ds, validation_data=val_ds, epochs=epoch0 + epochs, initial_epoch=epoch0,
                      callbacks=callbacks(), verbose=cfg.verbose)
        ran = len(h.history.get("loss", []))
        per_stage.append({"stage": name, "lr": lr, "epochs": ran, "seconds": round(time.time() - ts, 1)})
        epoch0 += ran
    seconds = time.time() - t0
    prior = out / "train_info.json"
    if cfg.init and prior.exists():  # a continued run reports every stage, with the earlier ones' time
        before = json.loads(prior.read_text())
        per_stage = before.get("stages", []) + per_stage
        seconds += before.get("seconds", 0)
    model = keras.models.load_model(ckpt, compile=False)
    info = {
        "recipe": cfg.recipe, "epochs": epoch0, "stages": per_stage, "batch": cfg.batch, "lr": cfg.lr,
        "seed": cfg.seed, "alpha": cfg.alpha if cfg.recipe != "cnn" else None, "init": cfg.init,
        "train_images": int(len(tr)), "val_images": int(len(va)),
        "seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / max(epoch0, 1), 1),
        "machine": machine_info(), "keras": keras.__version__, "backend": keras.backend.backend(),
    }
    return model, info


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": sys.version.split()[0]}


def read_history(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in (rows[0].keys() if rows else [])}


def make_card(model_path: Path, cfg: TrainConfig, data: Prepared, info: dict, threshold: float, metrics: dict) -> ModelCard:
    weights = {"none": "random init (trained from scratch)", "imagenet": "ImageNet (keras.applications)"}.get(
        cfg.weights, f"local weights file {Path(cfg.weights).name}")
    card = ModelCard(
        name=model_path.parent.name, format="keras", recipe=cfg.recipe, input_size=int(data.images.shape[1]),
        threshold=float(threshold), gradcam_layer=gradcam_layer_for(cfg.recipe),
        weights_origin=weights if cfg.recipe != "cnn" else "random init (custom CNN)",
        split_hash=data.split_info["hash"], artifact_sha256=sha256_file(model_path),
        metrics=metrics, training=info, tools={"keras": keras.__version__},
    )
    write_card(model_path, card)
    (model_path.parent / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return card
