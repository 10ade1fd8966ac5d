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

import cv2
import keras
import numpy as np

from edge.card import ModelCard, sha256_file, write_card
from train.data import Prepared
from train.models import CNN_FILTERS, base_layer_names, build_cnn, build_mobilenetv2, gradcam_layer_for, set_base_trainable

FINETUNE_FROM = "block_13_expand"  # the top three inverted-residual blocks + Conv_1


class CellBatches(keras.utils.PyDataset):
    """Batches from the uint8 cache with augmentation that suits cell crops.

    Flips and 90° rotations (a cell has no up), small brightness/contrast jitter and a small
    per-channel gain (stain colour/hue variation between slides).
    """

    def __init__(self, images, labels, idx, batch: int, augment: bool, seed: int = 0, field_crops: float = 0.0,
                 switches: tuple[str, ...] = (), **kw):
        super().__init__(**kw)
        self.images, self.labels, self.idx = images, labels, np.asarray(idx)
        self.batch, self.augment, self.field_crops = batch, augment, field_crops
        self.extra = None
        if augment and switches:
            from train.augment import Augmenter
            self.extra = Augmenter(switches, seed)
        self.rng = np.random.default_rng(seed)
        self.order = self.idx.copy()
        if augment:
            self.rng.shuffle(self.order)

    def __len__(self):
        return int(np.ceil(len(self.order) / self.batch))

    def __getitem__(self, i):
        sel = np.sort(self.order[i * self.batch:(i + 1) * self.batch])  # sorted reads are faster on a memmap
        x = np.asarray(self.images[sel])
        y = self.labels[sel].astype(np.float32)
        if self.augment:
            # A generator per batch: worker threads may call this concurrently.
            rng = np.random.default_rng((self.rng.integers(2**32), i))
            if self.field_crops:
                x = field_crop_batch(x, rng, self.field_crops)
            x = augment_batch(x, rng)
            return (self.extra(x, rng) if self.extra else x), y
        return x.astype(np.float32), y

    def on_epoch_end(self):
        if self.augment:
            self.rng.shuffle(self.order)


def augment_batch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 N×H×W×3 → augmented float32 in 0..255.

    The photometric jitter is a per-image, per-channel affine map of 256 values, so it runs as a
    lookup table fused with the rotation/flip copy: 4× faster than float arithmetic on the batch.
    """
    n = len(x)
    k = rng.integers(0, 4, n)
    flip = rng.random(n) < 0.5
    gain = 1 + rng.uniform(-0.1, 0.1, (n, 1))  # brightness
    contrast = 1 + rng.uniform(-0.1, 0.1, (n, 1))
    hue = 1 + rng.uniform(-0.03, 0.03, (n, 3))  # per-channel gain
    mean = x.reshape(n, -1).mean(axis=1, keepdims=True)
    # ((x - mean) * contrast + mean) * gain * hue, written as x * scale + shift
    scale, shift = contrast * gain * hue, mean * (1 - contrast) * gain * hue
    lut = np.clip(np.arange(256) * scale[..., None] + shift[..., None], 0, 255).astype(np.float32)  # n×3×256
    out = np.empty(x.shape, np.float32)
    for i in range(n):
        v = np.rot90(x[i], k[i])
        if flip[i]:
            v = v[:, ::-1]
        for c in range(3):
            out[i, ..., c] = lut[i, c][v[..., c]]
    return out


def augmentation_of(cfg: "TrainConfig") -> str:
    """What training did to the crops, in words, for the model card."""
    from train.augment import describe, parse
    base = "90° rotations and flips; brightness and contrast ±10%, per-channel gain ±3%"
    extra = parse(cfg.augment)
    base += f"; {describe(extra)}" if extra else ""
    return base + (f"; {cfg.field_crops:.0%} of crops made to look like field mode's (mask ±1-3 px, a platelet on "
                   "the rim, a neighbour's slice)" if cfg.field_crops else "")


def field_crop_batch(x: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Make a share `p` of the crops look like the ones field mode's detector cuts: the mask eroded or grown
    by a few pixels, a stained blob stuck to the rim (a platelet), or a slice of a neighbouring cell in
    the black background. None of these changes the label: they are what field crops of uninfected and
    infected cells alike carry, and what the classifier must not call a parasite."""
    x = x.copy()
    n, h, w, _ = x.shape
    k3 = np.ones((3, 3), np.uint8)
    for i in np.nonzero(rng.random(n) < p)[0]:
        img = x[i]
        mask = img.max(axis=2) > 12
        if mask.sum() < 50:
            continue
        kind = rng.integers(3)
        if kind == 0:  # the mask a few pixels tighter or looser (grown with the cell's own rim colour)
            r = int(rng.integers(1, 4))
            if rng.random() < 0.5:
                img[~cv2.erode(mask.astype(np.uint8), k3, iterations=r).astype(bool)] = 0
            else:
                grown = cv2.dilate(mask.astype(np.uint8), k3, iterations=r).astype(bool) & ~mask
                rim = mask & ~cv2.erode(mask.astype(np.uint8), k3, iterations=2).astype(bool)
                img[grown] = np.median(img[rim], axis=0).astype(np.uint8)
        elif kind == 1:  # 1-3 stained blobs centred on the rim, mostly outside the cell
            ys, xs = np.nonzero(mask & ~cv2.erode(mask.astype(np.uint8), k3, iterations=1).astype(bool))
            colour = np.array([rng.uniform(120, 210), rng.uniform(30, 90), rng.uniform(130, 190)])
            for _ in range(int(rng.integers(1, 4))):
                j = int(rng.integers(len(ys)))
                cv2.circle(img, (int(xs[j]), int(ys[j])), int(rng.integers(3, 9)), tuple(float(c) for c in colour), -1)
        else:  # a slice of another crop of the batch at one side, in the background only
            other = np.rot90(x[int(rng.integers(n))], int(rng.integers(4)))
            cut = int(rng.uniform(0.1, 0.3) * w)
            side = int(rng.integers(4))
            sl = np.rot90(np.zeros_like(img), side)
            sl[:, :cut] = other[:, -cut:]
            sl = np.rot90(sl, -side)
            put = (sl.max(axis=2) > 12) & ~mask
            img[put] = sl[put]
    return x


class Deadline(keras.callbacks.Callback):
    """Stops training before the epoch that would end past `deadline` (time.time() seconds).

    The next epoch is projected from the second half of this one's training and validation steps:
    the first steps of a run carry the one-off compilation (two minutes under JAX on a GPU), which
    projected as a whole epoch stopped 7-minute GPU runs after their first epoch.
    """

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline, self.stopped = deadline, False

    def on_epoch_begin(self, epoch, logs=None):
        self.t, self.train_ends, self.val_ends = time.time(), [], []

    def on_train_batch_end(self, batch, logs=None):
        self.train_ends.append(time.time())

    def on_test_batch_end(self, batch, logs=None):
        self.val_ends.append(time.time())

    def next_epoch_seconds(self) -> float:
        def steady(ends):  # a phase's length, from the pace of its second half
            h = len(ends) // 2
            return (ends[-1] - ends[h - 1]) * len(ends) / (len(ends) - h)
        if len(self.train_ends) < 4 or 0 < len(self.val_ends) < 4:
            return time.time() - self.t
        return steady(self.train_ends) + (steady(self.val_ends) if self.val_ends else 0.0)

    def on_epoch_end(self, epoch, logs=None):
        if time.time() + self.next_epoch_seconds() > self.deadline:
            self.model.stop_training = self.stopped = True


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
    stem_stride: int = 1  # cnn: 2 makes the first convolution stride (4x fewer operations)
    batchnorm: bool = False  # cnn: BatchNorm after every convolution
    width: float = 1.0  # cnn: filter multiplier (16, 32, 64, 128 × width)
    patience: int = 4
    max_minutes: float | None = None  # time budget for all stages; each stops before overrunning its share
    workers: int = 1  # threads preparing batches
    mixed_precision: bool = False
    max_train: int | None = None  # cap on training images (tiny runs, tests)
    max_val: int | None = None  # cap on validation images (its own flag: capping train never caps validation)
    field_crops: float = 0.0  # share of training crops made to look like field mode's crops (field_crop_batch)
    augment: str | None = None  # comma-separated switches of train/augment.py (stain, blur, noise, scale)
    exclude: str | None = None  # CSV (relpath column) of training images to leave out (train/labelnoise.py)
    init: str | None = None  # continue from this .keras (e.g. only the fine-tune stage, with epochs=0)
    verbose: int = 1


def build(cfg: TrainConfig, size: int) -> keras.Model:
    if cfg.recipe == "cnn":
        return build_cnn(size, filters=tuple(max(4, round(f * cfg.width)) for f in CNN_FILTERS),
                         stem_stride=cfg.stem_stride, batchnorm=cfg.batchnorm)
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
    excluded = 0
    if cfg.exclude:
        from train.labelnoise import read_exclusions
        drop = read_exclusions(Path(cfg.exclude), data)
        tr, excluded = np.setdiff1d(tr, drop), len(drop)
        print(f"train: {excluded} images left out ({cfg.exclude})", flush=True)
    rng = np.random.default_rng(cfg.seed)
    for name, cap in (("train", cfg.max_train), ("validation", cfg.max_val)):
        idx = tr if name == "train" else va
        if cap and len(idx) > cap:
            print(f"{name}: a random {cap} of {len(idx)} images (--max-{'train' if name == 'train' else 'val'})",
                  flush=True)
            idx = np.sort(rng.choice(idx, cap, replace=False))
            tr, va = (idx, va) if name == "train" else (tr, idx)
    par = dict(workers=cfg.workers, use_multiprocessing=False) if cfg.workers > 1 else {}
    from train.augment import parse
    train_ds = CellBatches(data.images, data.labels, tr, cfg.batch, augment=True, seed=cfg.seed,
                           field_crops=cfg.field_crops, switches=parse(cfg.augment), **par)
    val_ds = CellBatches(data.images, data.labels, va, 128, augment=False, **par)
    model = keras.models.load_model(cfg.init, compile=False) if cfg.init else build(cfg, size)
    base_names = base_layer_names(model)
    ckpt = out / "model.keras"
    history_csv = out / "history.csv"
    epoch0 = 0
    if cfg.init and history_csv.exists():  # continuing a run: keep its history and epoch count
        epoch0 = len(read_history(history_csv).get("epoch", []))
    else:
        history_csv.unlink(missing_ok=True)

    def callbacks(lr, deadline):
        # The checkpoint keeps the best epoch across stages (and across a continued run).
        best = min(read_history(history_csv).get("val_loss", [np.inf])) if history_csv.exists() else None
        cbs = [
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor="val_loss", save_best_only=True,
                                            initial_value_threshold=best if best is not None and np.isfinite(best) else None),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, cfg.patience // 2),
                                              min_lr=lr / 32, verbose=1 if cfg.verbose else 0),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True),
            keras.callbacks.CSVLogger(str(history_csv), append=True),
        ]
        return cbs + ([Deadline(deadline)] if deadline else [])

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
        stages.append(("head (base frozen)" if pretrained else "all layers" + ("" if cfg.init else " (from scratch)"),
                       cfg.epochs, cfg.lr,
                       "frozen" if pretrained else "all"))
        stages.append((f"fine-tune from {FINETUNE_FROM}", cfg.finetune_epochs, cfg.lr / 10, FINETUNE_FROM))
    t0, per_stage = time.time(), []
    total_epochs, done_epochs = sum(max(e, 0) for _, e, _, _ in stages), 0
    where = {"backend": keras.backend.backend(), "device": accelerator() or "cpu"}
    for name, epochs, lr, trainable in stages:
        if epochs <= 0:
            continue
        done_epochs += epochs  # each stage may run until its share of the time budget
        deadline = t0 + 60 * cfg.max_minutes * done_epochs / total_epochs if cfg.max_minutes else None
        if trainable == "frozen":
            set_base_trainable(model, base_names, None)
        elif trainable == "all" and base_names:
            set_base_trainable(model, base_names, base_names[0])  # a continued model may carry frozen layers
        elif trainable is not None:
            set_base_trainable(model, base_names, trainable)
        _compile(model, lr)
        print(f"stage: {name}, lr {lr:g}, {epochs} epochs, {len(tr)} train / {len(va)} val images", flush=True)
        ts = time.time()
        cbs = callbacks(lr, deadline)
        h = model.fit(train_ds, validation_data=val_ds, epochs=epoch0 + epochs, initial_epoch=epoch0,
                      callbacks=cbs, verbose=cfg.verbose)
        ran = len(h.history.get("loss", []))
        stopped = None if ran == epochs else "time budget" if deadline and cbs[-1].stopped else "early stopping"
        per_stage.append({"stage": name, "lr": lr, "epochs": ran, "seconds": round(time.time() - ts, 1),
                          "batch": cfg.batch, **where, **({"stopped_by": stopped} if stopped else {})})
        epoch0 += ran
    seconds = time.time() - t0
    prior = out / "train_info.json"
    before = json.loads(prior.read_text()) if cfg.init and prior.exists() else None
    model = keras.models.load_model(ckpt, compile=False)
    if before and not per_stage:  # nothing trained here (only re-scored): the earlier record stands
        return model, before
    if before:  # a continued run reports every stage, with the earlier ones' time
        per_stage = before.get("stages", []) + per_stage
        seconds += before.get("seconds", 0)
    info = {
        "recipe": cfg.recipe, "epochs": epoch0, "stages": per_stage, "augmentation": augmentation_of(cfg), "batch": cfg.batch, "lr": cfg.lr,
        "seed": cfg.seed, "alpha": cfg.alpha if cfg.recipe != "cnn" else None,
        "stem_stride": cfg.stem_stride if cfg.recipe == "cnn" else None,
        "batchnorm": cfg.batchnorm if cfg.recipe == "cnn" else None,
        "width": cfg.width if cfg.recipe == "cnn" else None, "init": cfg.init,
        "max_minutes": cfg.max_minutes, "train_images": int(len(tr)),
        "excluded": {"file": cfg.exclude, "images": excluded} if cfg.exclude else None, "val_images": int(len(va)),
        "seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / max(epoch0, 1), 1),
        "machine": {**machine_info(), "accelerator": where["device"]}, "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    return model, info


def accelerator() -> str | None:
    """The GPU the Keras backend trains on, if any (for the record in the model card)."""
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax
            d = jax.devices()[0]
            return d.device_kind if d.platform != "cpu" else None
        if backend == "torch":
            import torch
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if backend == "tensorflow":
            import tensorflow as tf
            gpus = tf.config.list_physical_devices("GPU")
            return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else None
    except Exception:  # the record is informative; never fail a training run over it
        return None
    return None


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
