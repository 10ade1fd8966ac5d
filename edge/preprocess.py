"""The one preprocessing shared by training, export calibration and the edge runtime.

Models take raw RGB pixel values (0..255, float32 or the int8 equivalent) at a square size and
rescale inside the graph, so the only step outside is this resize. Keeping it here, in one
function, is what makes training and field inference see the same tensors.
"""
from __future__ import annotations

import cv2
import numpy as np


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """H×W×3 uint8 → size×size×3 uint8 (area interpolation down, linear up)."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(rgb)
    interp = cv2.INTER_AREA if h >= size and w >= size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def to_model_input(batch_u8: np.ndarray, dtype: str, scale: float = 1.0, zero_point: int = 0) -> np.ndarray:
    """uint8 N×S×S×3 → the model's input tensor: float32 pixels, or quantized ints."""
    if dtype == "float32":
        return batch_u8.astype(np.float32)
    if dtype == "int8" and scale == 1.0 and zero_point == -128:  # the shipped int8 models: pixel − 128, in one pass
        return (np.ascontiguousarray(batch_u8) ^ np.uint8(0x80)).view(np.int8)
    q = np.round(batch_u8.astype(np.float32) / scale + zero_point)
    info = np.iinfo(np.dtype(dtype))
    return q.clip(info.min, info.max).astype(dtype)
