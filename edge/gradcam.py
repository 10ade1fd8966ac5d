"""Grad-CAM overlay pictures: the heat map blended on the image, the verdict written on it, a colour bar."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.card import atomic_write_bytes

MIN_SIDE = 256  # cell crops are ~130 px: upscale so the text and the map are readable


def upsample(heat: np.ndarray, w: int, h: int) -> np.ndarray:
    """Heat map at conv resolution → image size (the model saw the whole image resized, no crop)."""
    return np.clip(cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def overlay(rgb: np.ndarray, heat: np.ndarray | None, label: str, prob: float, alpha: float = 0.45,
            panel: bool = False, heat_class: str | None = None) -> np.ndarray:
    """RGB image + heat map in [0,1] → annotated BGR picture (for cv2.imencode); no map: label only.
    `prob` is the P(Parasitized) the confidence is shown from (pass the calibrated one). The legend names
    the class the map explains (`heat_class`, default: the label's)."""
    h, w = rgb.shape[:2]
    scale = max(1.0, MIN_SIDE / min(h, w))
    if scale > 1:
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
        h, w = rgb.shape[:2]
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if heat is None:
        body = bgr
    else:
        colour = cv2.applyColorMap((upsample(heat, w, h) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        blend = cv2.addWeighted(bgr, 1 - alpha, colour, alpha, 0)
        body = np.hstack([bgr, np.full((h, 6, 3), 255, np.uint8), blend]) if panel else blend
        body = np.hstack([body, colour_bar(h)])
    conf = prob if label == "Parasitized" else 1 - prob
    band = np.full((34, body.shape[1], 3), 255, np.uint8)
    colour_txt = (0, 0, 200) if label == "Parasitized" else (0, 140, 0)
    cv2.putText(band, f"{label} {conf:.1%}", (6, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.65, colour_txt, 2, cv2.LINE_AA)
    if heat is None:
        return np.vstack([band, body])
    legend = np.full((22, body.shape[1], 3), 255, np.uint8)
    cv2.putText(legend, f"Grad-CAM: evidence for {heat_class or label}", (6, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (60, 60, 60), 1, cv2.LINE_AA)
    return np.vstack([band, body, legend])


def classes_to_explain(probs: np.ndarray, threshold: float, evidence: str = "label") -> np.ndarray:
    """Per image, the class its map shows: the displayed label's (1 Parasitized, 0 Uninfected), or
    Parasitized for every cell (`evidence="Parasitized"`: the most suspicious spot of a negative call)."""
    if evidence == "Parasitized":
        return np.ones(len(probs), int)
    if evidence != "label":
        raise ValueError(f"evidence must be 'label' or 'Parasitized', not {evidence!r}")
    return (np.asarray(probs) >= threshold).astype(int)


def colour_bar(h: int, w: int = 46) -> np.ndarray:
    """A vertical JET bar, 1 at the top, 0 at the bottom, with its two end labels."""
    ramp = np.linspace(255, 0, h).astype(np.uint8)[:, None].repeat(14, axis=1)
    bar = np.full((h, w, 3), 255, np.uint8)
    bar[:, 4:18] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    cv2.putText(bar, "1", (22, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(bar, "0", (22, h - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def save_png(path: Path, bgr: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write_bytes(path, buf.tobytes())
    return path
