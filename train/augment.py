"""Optional augmentation switches for real-world shift, in NumPy and OpenCV.

They run in the batch workers' threads, on the CPU, whatever the Keras backend: written with Keras
layers (colour jitter, Gaussian blur) they ran as eager ops under JAX and made a GPU epoch 3-7x slower
(11 s → 34-83 s, `benchmarks/results/candidates/gpu_sweep/`).

Each switch is measured on validation before it is kept (README, *Augmentation study*):
- `stain`: Giemsa colour varies between slides and labs: per crop a hue turn of up to ±18°, saturation
  ×0.6–1.5 (the chroma turned and scaled about the grey axis in YIQ) and gamma 0.7–1.4;
- `stain-wide`: the same, wider (hue ±25°, saturation ×0.45–1.7, gamma 0.6–1.6), so that a paler
  stain than the reference slides is inside the range rather than at its edge;
- `blur`: defocus, a Gaussian blur of sigma 0.1–1.5 px on half the crops;
- `noise`: sensor noise, Gaussian with sigma 4 grey levels;
- `scale`: a cell seen with fewer pixels (40–128 px across before the resize to the model's input):
  the batch is shrunk and enlarged back, so the parasite's detail is lost as on a coarser camera.
"""
from __future__ import annotations

import cv2
import numpy as np

SWITCHES = ("stain", "stain-wide", "blur", "noise", "scale")
# hue (±degrees), saturation (low, high), gamma (low, high)
STAIN_RANGES = {"stain": (18.0, (0.6, 1.5), (0.7, 1.4)), "stain-wide": (25.0, (0.45, 1.7), (0.6, 1.6))}
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_RGB = np.linalg.inv(_YIQ).astype(np.float32)


def parse(text: str | None) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (text or "").split(",") if s.strip())
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(SWITCHES)}")
    return names


def stain_matrices(hue_deg: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    """N×3×3 RGB maps that turn each crop's chroma by hue_deg and scale it by saturation; grey stays
    grey (so the masked-out black background stays black)."""
    t = np.deg2rad(hue_deg)
    c, s = np.cos(t) * saturation, np.sin(t) * saturation
    m = np.zeros((len(t), 3, 3), np.float32)
    m[:, 0, 0] = 1
    m[:, 1, 1], m[:, 1, 2], m[:, 2, 1], m[:, 2, 2] = c, -s, s, c
    return _RGB @ m @ _YIQ


class Augmenter:
    """Applies the chosen switches to a float32 N×H×W×3 batch in 0..255 (after flips and rotations)."""

    def __init__(self, names: tuple[str, ...], seed: int = 0):
        self.names = names

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, h, w, _ = x.shape
        t = np.asarray(x, np.float32)
        if "stain" in self.names or "stain-wide" in self.names:
            hue, sat, gam = STAIN_RANGES["stain-wide" if "stain-wide" in self.names else "stain"]  # the wider, if both
            gamma = np.exp(rng.uniform(*np.log(gam), (n, 1, 1, 1))).astype(np.float32)
            t = 255.0 * np.power(np.clip(t / 255.0, 0.0, 1.0), gamma)
            m = stain_matrices(rng.uniform(-hue, hue, n), np.exp(rng.uniform(*np.log(sat), n)))
            t = np.einsum("nhwc,ndc->nhwd", t, m, optimize=True)
        if "blur" in self.names:
            t = t.copy()
            for i in np.flatnonzero(rng.random(n) < 0.5):
                t[i] = cv2.GaussianBlur(t[i], (5, 5), float(rng.uniform(0.1, 1.5)))
        if "noise" in self.names:
            t = t + rng.normal(0.0, 4.0, t.shape).astype(np.float32)
        if "scale" in self.names:
            side = int(rng.integers(40, h + 1))
            if side < h:
                t = np.stack([cv2.resize(cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA), (w, h),
                                         interpolation=cv2.INTER_LINEAR) for im in t])
        return np.clip(t, 0, 255).astype(np.float32)


def _stain_words(name: str) -> str:
    hue, (s0, s1), (g0, g1) = STAIN_RANGES[name]
    return f"hue ±{hue:g}°, saturation ×{s0:g}–{s1:g}, gamma {g0:g}–{g1:g}"


def describe(names: tuple[str, ...]) -> str:
    words = {"stain": f"stain colour ({_stain_words('stain')})",
             "stain-wide": f"stain colour, wide ({_stain_words('stain-wide')})",
             "blur": "defocus blur (sigma 0.1–1.5 px, half the crops)", "noise": "sensor noise (sigma 4)",
             "scale": "cell scale (40–128 px before the resize)"}
    return "; ".join(words[n] for n in names)
