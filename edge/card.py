"""The model card: every artifact carries its own metadata, so nothing downstream hard-codes it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CLASS_NAMES = ("Uninfected", "Parasitized")  # index 1 is the positive class, prob = P(Parasitized)
CARD_SUFFIX = ".card.json"


def label_of(prob: float, threshold: float, class_names=CLASS_NAMES) -> str:
    """The one decision rule: Parasitized when P(Parasitized) ≥ threshold."""
    return class_names[int(prob >= threshold)]


def calibrated(prob, temperature: float = 1.0):
    """P(Parasitized) after the card's temperature scaling: what a displayed confidence means. Monotone
    with 0.5 fixed, so labels and thresholds (set on the raw P) are untouched."""
    import numpy as np
    p = np.clip(np.asarray(prob, np.float64), 1e-6, 1 - 1e-6)
    out = 1 / (1 + np.exp(-np.log(p / (1 - p)) / temperature))
    return float(out) if np.ndim(prob) == 0 else out


@dataclass
class ModelCard:
    name: str
    format: str  # keras | tflite | onnx
    variant: str = "fp32"  # fp32 | fp16 | dynamic | int8
    role: str = "classifier"  # classifier | explainer
    recipe: str = ""
    input_size: int = 128
    input_dtype: str = "float32"
    input_quant: tuple[float, int] | None = None  # (scale, zero_point) for integer inputs
    output_quant: tuple[float, int] | None = None
    normalization: str = "raw RGB pixels 0..255; the model rescales inside the graph"
    class_names: tuple[str, ...] = CLASS_NAMES
    threshold: float = 0.5
    # name → {threshold, rule, sensitivity, specificity, counts: {tp, fn, tn, fp} on validation, test: {...}}
    operating_points: dict = field(default_factory=dict)
    temperature: float = 1.0  # confidence shown = calibrated(P, temperature), fitted on validation
    calibration: dict = field(default_factory=dict)  # ECE before/after on validation and test
    gradcam_layer: str = ""
    weights_origin: str = ""
    split_hash: str = ""
    source_sha256: str = ""
    artifact_sha256: str = ""
    explainer: str = ""  # file name of the matching Grad-CAM explainer, beside this artifact
    # explainers: "signed" = the output is the raw Grad-CAM sum for Parasitized; Uninfected's map is its negative
    heatmap: str = ""
    metrics: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    # how field mode cuts cells for this model, as it was trained: {"complete_overlap": × diameter} (see
    # edge.detect.DetectParams); empty: the crops stop short of touching neighbours
    field_crops: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("input_quant", "output_quant", "class_names"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


class CardError(ValueError):
    """A missing or unreadable model card."""


def card_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + CARD_SUFFIX)


def read_card(artifact: str | Path) -> ModelCard:
    path = card_path(artifact)
    if not path.exists():
        raise CardError(f"{artifact}: no model card beside it (expected {path.name})")
    try:
        return ModelCard.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CardError(f"{path}: unreadable model card ({e})") from None


def write_card(artifact: str | Path, card: ModelCard) -> Path:
    path = card_path(artifact)
    atomic_write_text(path, card.to_json())
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
