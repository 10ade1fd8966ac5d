"""Optional augmentation switches for real-world shift, written with Keras layers and `keras.ops`
so they run on any backend (and on a GPU under JAX or TensorFlow).

Each switch is measured on validation before it is kept (README, *Augmentation study*):
- `stain`: Giemsa colour varies between slides and labs: Keras' colour jitter (hue factor 0.05,
  saturation factor 0.4–0.6 where 0.5 leaves it unchanged: ×0.67–1.5) and gamma 0.7–1.4;
- `blur`: defocus, a Gaussian blur of sigma 0.1–1.5 px on half the crops;
- `noise`: sensor noise, Gaussian with sigma 4 grey levels;
- `scale`: a cell seen with fewer pixels (40–128 px across before the resize to the model's input):
  the batch is shrunk and enlarged back, so the parasite's detail is lost as on a coarser camera.
"""
from __future__ import annotations

import numpy as np

SWITCHES = ("stain", "blur", "noise", "scale")


def parse(text: str | None) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (text or "").split(",") if s.strip())
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(SWITCHES)}")
    return names


class Augmenter:
    """Applies the chosen switches to a float32 N×H×W×3 batch in 0..255 (after flips and rotations)."""

    def __init__(self, names: tuple[str, ...], seed: int = 0):
        import keras
        self.names = names
        self.layers = []
        if "stain" in names:
            self.layers.append(keras.layers.RandomColorJitter(value_range=(0, 255), saturation_factor=(0.4, 0.6),
                                                              hue_factor=0.05, seed=seed))
        if "blur" in names:
            self.layers.append(keras.layers.RandomGaussianBlur(factor=0.5, kernel_size=5, sigma=(0.1, 1.5),
                                                               value_range=(0, 255), seed=seed + 1))
        self.noise_seed = keras.random.SeedGenerator(seed + 2)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from keras import ops
        n, h, w, _ = x.shape
        t = ops.convert_to_tensor(x, "float32")
        if "stain" in self.names:
            g = ops.convert_to_tensor(rng.uniform(np.log(0.7), np.log(1.4), (n, 1, 1, 1)).astype(np.float32))
            t = 255.0 * ops.power(ops.clip(t / 255.0, 0.0, 1.0), ops.exp(g))
        for layer in self.layers:
            t = layer(t, training=True)
        if "noise" in self.names:
            import keras
            t = t + keras.random.normal(ops.shape(t), stddev=4.0, seed=self.noise_seed)
        if "scale" in self.names:
            side = int(rng.integers(40, h + 1))
            if side < h:
                t = ops.image.resize(ops.image.resize(t, (side, side), interpolation="area"), (h, w),
                                     interpolation="bilinear")
        return np.clip(ops.convert_to_numpy(t), 0, 255).astype(np.float32)


def describe(names: tuple[str, ...]) -> str:
    words = {"stain": "stain colour (Keras colour jitter: hue 0.05, saturation ×0.67–1.5; gamma 0.7–1.4)",
             "blur": "defocus blur (sigma 0.1–1.5 px, half the crops)", "noise": "sensor noise (sigma 4)",
             "scale": "cell scale (40–128 px before the resize)"}
    return "; ".join(words[n] for n in names)
