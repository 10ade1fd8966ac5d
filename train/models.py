"""The three Keras recipes, each one flat functional graph with a named Grad-CAM layer.

Every model takes raw RGB pixels (0..255) and rescales inside, ends in a `logit` Dense layer and
a `prob` sigmoid: the exporter differentiates the logit for Grad-CAM, never the probability.
"""
from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

GRADCAM_LAYER = {"cnn": "last_conv", "mobilenetv2": "out_relu"}


class WeightsError(RuntimeError):
    """ImageNet weights unreachable or a weights file that does not fit."""


CNN_FILTERS = (16, 32, 64, 128)  # the custom CNN's blocks at width 1


def build_cnn(size: int = 128, filters=CNN_FILTERS, dropout: float = 0.5, stem_stride: int = 1,
              batchnorm: bool = False) -> keras.Model:
    """Custom CNN: Conv → MaxPool → Dropout blocks → Dense → sigmoid.

    stem_stride 2: the first convolution strides, so every later layer runs on a quarter of the pixels
    (4× fewer operations) while the first one still sees the full-resolution crop — a learned
    downsampling, where a smaller input would blur a ring-stage parasite away before any filter sees it.
    batchnorm: Conv → BatchNorm (momentum 0.9, so its statistics keep up in short runs) → ReLU; the
    converter folds BatchNorm into the convolution, so it costs nothing at inference."""
    inp = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="rescale")(inp)
    for i, f in enumerate(filters):
        last = i == len(filters) - 1
        name = "last_conv" if last else f"conv{i + 1}"
        stride = stem_stride if i == 0 else 1
        if batchnorm:
            x = layers.Conv2D(f, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
            x = layers.ReLU(name=name)(x)
        else:
            x = layers.Conv2D(f, 3, strides=stride, padding="same", activation="relu", name=name)(x)
        x = layers.MaxPooling2D(name=f"pool{i + 1}")(x)
        x = layers.Dropout(0.1 * (i + 1) / 2, name=f"drop{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="fc")(x)
    x = layers.Dropout(dropout, name="drop_fc")(x)
    return _head_out(inp, x, "cnn")


def build_mobilenetv2(size: int = 128, weights: str = "none", alpha: float = 1.0, bn_momentum: float = 0.9) -> keras.Model:
    """MobileNetV2 base (flattened into the model's own graph) + GAP → Dense → Dropout → Dense.

    weights: 'imagenet' (needs the network), 'none' (from scratch) or a path to a Keras
    `.weights.h5` file of the base. From scratch, BatchNorm momentum drops to 0.9 so the moving
    statistics catch up within a few hundred steps (at Keras' 0.999 they lag far behind and the
    model looks like chance on validation).
    """
    inp = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    kw = dict(input_tensor=x, include_top=False, alpha=alpha)
    if weights == "imagenet":
        try:
            base = keras.applications.MobileNetV2(weights="imagenet", **kw)
        except Exception as e:
            raise WeightsError(
                f"could not fetch ImageNet weights ({type(e).__name__}); offline, pass a local file with --weights PATH "
                "or train from scratch with --weights none") from None
    else:
        base = keras.applications.MobileNetV2(weights=None, **kw)
        if weights not in ("none", "", None):
            path = Path(weights)
            if not path.exists():
                raise WeightsError(f"{path}: weights file not found")
            try:
                base.load_weights(str(path))
            except Exception as e:
                raise WeightsError(f"{path}: does not fit MobileNetV2 alpha={alpha} ({str(e).splitlines()[0][:200]})") from None
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = bn_momentum
    x = layers.GlobalAveragePooling2D(name="gap")(base.output)
    x = layers.Dense(128, activation="relu", name="fc")(x)
    x = layers.Dropout(0.3, name="drop_fc")(x)
    return _head_out(inp, x, "mobilenetv2")


def _head_out(inp, x, name) -> keras.Model:
    logit = layers.Dense(1, name="logit", dtype="float32")(x)
    prob = layers.Activation("sigmoid", name="prob", dtype="float32")(logit)
    return keras.Model(inp, prob, name=name)


def base_layer_names(model: keras.Model) -> list[str]:
    """The MobileNetV2 base inside a flat model: every layer between the rescaling and the head."""
    names = [l.name for l in model.layers]
    if "gap" not in names:
        return []
    return names[names.index("rescale") + 1: names.index("gap")]


def set_base_trainable(model: keras.Model, base_names: list[str], trainable_from: str | None) -> None:
    """Freeze the whole base (trainable_from=None) or unfreeze from the named layer to the top.

    BatchNorm layers in frozen parts stay in inference mode (Keras does this when trainable=False).
    """
    names = set(base_names)
    on = False
    for layer in model.layers:
        if layer.name not in names or isinstance(layer, keras.layers.InputLayer):
            continue
        if trainable_from is not None and layer.name == trainable_from:
            on = True
        layer.trainable = on


def gradcam_layer_for(recipe: str) -> str:
    return GRADCAM_LAYER["cnn" if recipe == "cnn" else "mobilenetv2"]
