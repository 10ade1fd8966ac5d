"""The TensorFlow functions that every exporter converts: the classifier and its Grad-CAM explainer."""
from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf


def serving_function(model, size: int):
    """Raw-pixel float32 batch → {'prob': N×1}, batch dimension left dynamic."""
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
    def serve(image):
        return {"prob": model(image, training=False)}
    return serve


def _logit_of(threshold: float) -> float:
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    return math.log(t / (1 - t))


def _cam(acts, weights):
    """Grad-CAM map: ReLU of the channel-weighted sum, scaled to [0,1] per image."""
    cam = tf.nn.relu(tf.reduce_sum(acts * weights, axis=-1))
    return cam / (tf.reduce_max(cam, axis=[1, 2], keepdims=True) + 1e-8)


def head_layers(model, layer: str) -> list:
    names = [l.name for l in model.layers]
    return model.layers[names.index(layer) + 1: names.index("logit") + 1]


def gradcam(model, layer: str, threshold: float = 0.5):
    """image → (prob, heatmap): standard Grad-CAM for the predicted class, in plain ops.

    The channel weights are the spatial mean of d(class logit)/d(activations) — the logit, never
    the probability (whose gradient does not convert), negated for Uninfected. The head between the
    conv layer and the logit (pooling, Flatten, Dropout, Dense) is differentiated by the explicit
    chain rule, because TFLite has no kernels for TensorFlow's gradient ops (ReluGrad,
    MaxPoolGrad, BroadcastGradientArgs). A non-overlapping max-pool routes each window's gradient
    to one input cell, so its spatial sum (all the mean needs) is preserved exactly.
    `gradcam_reference` checks this against tf.GradientTape.
    """
    feat = keras.Model(model.inputs, model.get_layer(layer).output)
    head = head_layers(model, layer)
    logit_thr = _logit_of(threshold)

    def explain(image):
        acts = feat(image, training=False)
        h, w = acts.shape[1], acts.shape[2]
        x, trace = acts, []
        for l in head:  # forward, keeping what the backward pass needs
            if isinstance(l, keras.layers.Dense):
                z = tf.matmul(x, l.kernel) + l.bias
                act = l.activation.__name__
                if act not in ("relu", "linear"):
                    raise NotImplementedError(f"Grad-CAM head: Dense activation {act}")
                trace.append(("dense", l, z if act == "relu" else None))
                x = tf.nn.relu(z) if act == "relu" else z
            elif isinstance(l, keras.layers.Flatten):
                trace.append(("flatten", x.shape[1:], None))
                x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])
            elif isinstance(l, keras.layers.GlobalAveragePooling2D):
                trace.append(("gap", None, None))
                x = tf.reduce_mean(x, axis=[1, 2])
            elif isinstance(l, keras.layers.MaxPooling2D):
                if tuple(l.pool_size) != tuple(l.strides) or l.padding != "valid" or x.shape[1] % l.pool_size[0] \
                        or x.shape[2] % l.pool_size[1]:
                    raise NotImplementedError("Grad-CAM head: only non-overlapping max-pooling")
                trace.append(("pool", None, None))
                x = l(x)
            elif isinstance(l, keras.layers.Dropout):
                continue  # identity at inference
            else:
                raise NotImplementedError(f"Grad-CAM head: layer {type(l).__name__}")
        logit = x
        g = tf.where(logit >= logit_thr, 1.0, -1.0)  # d(class logit)/d(logit)
        for i, (kind, l, z) in reversed(list(enumerate(trace))):  # backward
            if kind == "dense":
                g = tf.matmul(g if z is None else g * tf.cast(z > 0, tf.float32), l.kernel, transpose_b=True)
            elif kind == "flatten":
                g = tf.reshape(g, [-1, *l])
            elif i != 0:
                raise NotImplementedError("Grad-CAM head: pooling must directly follow the Grad-CAM layer")
            elif kind == "pool":
                g = tf.reduce_sum(g, axis=[1, 2]) / (h * w)  # spatial mean of the routed gradient
            else:  # gap: every cell gets g / (h·w), so that is also the mean
                g = g / (h * w)
        weights = tf.reshape(g, [-1, 1, 1, acts.shape[-1]]) if g.shape.rank == 2 else \
            tf.reduce_mean(g, axis=[1, 2], keepdims=True)
        return {"prob": tf.reshape(tf.sigmoid(logit), [-1]), "heatmap": _cam(acts, weights)}

    return explain


def gradcam_tape(model, layer: str, threshold: float = 0.5):
    """The textbook GradientTape Grad-CAM: the reference for the exported plain-op version."""
    feat = keras.Model(model.inputs, [model.get_layer(layer).output, model.get_layer("logit").output])
    logit_thr = _logit_of(threshold)

    def explain(image):
        with tf.GradientTape() as tape:
            acts, logit = feat(image, training=False)
            tape.watch(acts)
            target = tf.reduce_sum(logit * tf.stop_gradient(tf.where(logit >= logit_thr, 1.0, -1.0)))
        grads = tape.gradient(target, acts)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        return {"prob": tf.reshape(tf.sigmoid(logit), [-1]), "heatmap": _cam(acts, weights)}

    return explain


def explainer_function(model, layer: str, size: int, threshold: float = 0.5):
    return tf.function(gradcam(model, layer, threshold),
                       input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])


def gradcam_reference(model, layer: str, images_u8: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Eager GradientTape Grad-CAM on uint8 images: (prob, heatmap)."""
    out = gradcam_tape(model, layer, threshold)(tf.constant(images_u8.astype(np.float32)))
    return out["prob"].numpy(), out["heatmap"].numpy()
