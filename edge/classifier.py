"""The Python API for people who embed the runtime; `edge-infer` and the app use it too.

    from edge import Classifier
    clf = Classifier.load()                       # the shipped default int8 model, its card's threshold
    clf.predict("cell.png")                       # [Prediction(label='Parasitized', ...)]
    probs, heat, cls = clf.explain(rgb_array)     # Grad-CAM of the class each label shows
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from edge.card import calibrated, label_of
from edge.gradcam import classes_to_explain
from edge.images import load_image
from edge.operating import OperatingPoint, Screen, field_point, operating_point as point_of, predict
from edge.preprocess import resize_rgb
from edge.runtime import Loaded, ModelError, default_model, load_classifier, load_explainer_for

Image = Union[str, Path, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    label: str
    prob_parasitized: float  # the model's output: thresholds and operating points apply to it
    confidence: float  # that the label shown is right: temperature-calibrated (the card's temperature)
    threshold: float


@dataclass
class Classifier:
    """A classifier artifact, its card's decision rule and (optionally) its Grad-CAM explainer."""
    model: Loaded
    threshold: float
    explainer: Loaded | None = None
    point: OperatingPoint | None = None  # the named operating point loaded, when one was asked for

    @property
    def operating_point(self) -> str | None:
        return self.point and self.point.name

    @property
    def counts(self) -> dict | None:
        """The operating point's validation confusion counts (field mode corrects with them)."""
        return self.point and self.point.counts

    @property
    def screen(self) -> Screen | None:
        """A screened operating point's fast first model."""
        return self.point and self.point.screen

    @classmethod
    def load(cls, path: str | Path | None = None, *, mode: str = "cell", threshold: float | None = None,
             operating_point: str | None = None, gradcam: bool = False, threads: int | None = None,
             allow_failed_gate: bool = False) -> "Classifier":
        """path: a .tflite/.onnx with its card (default: the shipped model for `mode`, cell or field).
        The threshold is `threshold`, else the named operating point's (field mode: the card's screened
        counting point, else counting), else the card's."""
        model = load_classifier(path or default_model(mode), threads, allow_failed_gate)
        if operating_point is None and mode == "field":
            operating_point = field_point(model)
        point = point_of(model, operating_point, threads) if operating_point else None
        if point and threshold is None:
            threshold = point.threshold
        thr = model.card.threshold if threshold is None else float(threshold)
        if not 0 < thr < 1:
            raise ModelError(f"threshold {thr} must be between 0 and 1")
        explainer = load_explainer_for(model, threads) if gradcam else None
        return cls(model, thr, explainer, point)

    @property
    def size(self) -> int:
        return self.model.size

    def batch(self, images: Image | Sequence[Image]) -> np.ndarray:
        """Paths or RGB arrays (any size) → N×size×size×3 uint8, as the model takes them."""
        items = [images] if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3) \
            else list(images)
        return np.stack([resize_rgb(load_image(i) if isinstance(i, (str, Path)) else i, self.size) for i in items])

    def probabilities(self, images: Image | Sequence[Image]) -> np.ndarray:
        x = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.batch(images)
        return predict(self.model, x, self.screen)

    def predict(self, images: Image | Sequence[Image]) -> list[Prediction]:
        return [self.prediction(float(p)) for p in self.probabilities(images)]

    def prediction(self, prob: float) -> Prediction:
        label = label_of(prob, self.threshold, self.model.card.class_names)
        return Prediction(label, prob, self.confidence(prob, label), self.threshold)

    def calibrated(self, prob):
        """P(Parasitized) as the displayed confidence means it (temperature scaling from the card)."""
        return calibrated(prob, self.model.card.temperature)

    def confidence(self, prob: float, label: str) -> float:
        pc = self.calibrated(prob)
        return pc if label == self.model.card.class_names[1] else 1 - pc

    def run(self, images: Image | Sequence[Image], evidence: str = "label"
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """P(Parasitized), with the Grad-CAM maps and their classes when an explainer is loaded (else None, None)."""
        if self.explainer is None:
            return self.probabilities(images), None, None
        return self.explain(images, evidence)

    def explain(self, images: Image | Sequence[Image], evidence: str = "label") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P(Parasitized), heat maps in [0,1], the class index each map explains): the label's class, or
        Parasitized for every image with evidence="Parasitized"."""
        if self.explainer is None:
            self.explainer = load_explainer_for(self.model)
        x = images if isinstance(images, np.ndarray) and images.ndim == 4 else self.batch(images)
        probs = predict(self.model, x, self.screen)
        cls = classes_to_explain(probs, self.threshold, evidence)
        return probs, self.explainer.explain(x, cls)[1], cls
