"""Keras → TFLite: fp32, fp16, dynamic-range int8 and full-integer int8 (int8 in and out)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

VARIANTS = ("fp32", "fp16", "dynamic", "int8")


def convert(fn, variant: str, calibration: np.ndarray | None = None) -> bytes:
    """Convert a tf.function (see export.graph) to TFLite bytes.

    Built from the concrete function alone: passing the Keras model as the second argument of
    from_concrete_functions silently produced a NaN model in a probe.
    """
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    if variant == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        if calibration is None or len(calibration) == 0:
            raise ValueError("full-integer int8 needs calibration images")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([calibration[i:i + 1].astype(np.float32)] for i in range(len(calibration)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8  # raw pixels map exactly: int8 = pixel − 128
        conv.inference_output_type = tf.int8
    elif variant != "fp32":
        raise ValueError(f"unknown TFLite variant {variant!r} (one of {', '.join(VARIANTS)})")
    return conv.convert()

