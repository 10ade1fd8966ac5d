"""The TensorFlow functions that every exporter converts: the classifier and its Grad-CAM explainer."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def serving_function(model, size: int):
    """Raw-pixel float32 batch → {'prob': N×1}, batch dimension left dynamic."""
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
    def serve(image):
        return {"prob": model(image, training=False)}
    return serve


def _cam(acts, weights):
    """The signed Grad-CAM sum for Parasitized. The Uninfected logit is its negative, so its map is the
    negative too: one output explains either class (edge.runtime.class_map takes the ReLU and scales)."""
    return tf.reduce_sum(acts * weights, axis=-1)


def head_layers(model, layer: str) -> list:
    names = [l.name for l in model.layers]
    return model.layers[names.index(layer) + 1: names.index("logit") + 1]


def gradcam(model, layer: str):
    """image → (prob, cam): standard Grad-CAM in plain ops, for whichever class the caller displays.

    The channel weights are the spatial mean of d(logit)/d(activations) — the logit, never
    the probability (whose gradient does not convert). The head between the
    conv layer and the logit (pooling, Flatten, Dropout, Dense) is differentiated by the explicit
    chain rule, because TFLite has no kernels for TensorFlow's gradient ops (ReluGrad,
    MaxPoolGrad, BroadcastGradientArgs). A non-overlapping max-pool routes each window's gradient
    to one input cell, so its spatial sum (all the mean needs) is preserved exactly.
    `gradcam_reference` checks this against tf.GradientTape.
    """
    feat = keras.Model(model.inputs, model.get_layer(layer).output)
    head = head_layers(model, layer)

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
        g = tf.ones_like(logit)  # d(logit)/d(logit)
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
        return {"prob": tf.reshape(tf.sigmoid(logit), [-1]), "cam": _cam(acts, weights)}

    return explain


def explainer_function(model, layer: str, size: int):
    return tf.function(gradcam(model, layer),
                       input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])


def gradcam_reference(model, layer: str, images_u8: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The textbook tf.GradientTape Grad-CAM of each image's given class (1 Parasitized, 0 Uninfected):
    (prob, heat map scaled to [0,1]), the reference the exported plain-op explainer is checked against."""
    feat = keras.Model(model.inputs, [model.get_layer(layer).output, model.get_layer("logit").output])
    sign = tf.constant(np.where(np.asarray(classes) == 1, 1.0, -1.0).reshape(-1, 1), tf.float32)
    with tf.GradientTape() as tape:
        acts, logit = feat(tf.constant(images_u8.astype(np.float32)), training=False)
        tape.watch(acts)
        target = tf.reduce_sum(logit * sign)  # the class logit: −logit is Uninfected's
    weights = tf.reduce_mean(tape.gradient(target, acts), axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(acts * weights, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=[1, 2], keepdims=True) + 1e-8)
    return tf.reshape(tf.sigmoid(logit), [-1]).numpy(), cam.numpy()
