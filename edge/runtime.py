"""Load a .tflite (LiteRT) or .onnx (onnxruntime) artifact and run it on uint8 cell images.

Input dtype and quantization are read from the model itself; class names, input size and the
threshold come from its model card. One small dataclass per loaded model, no class hierarchy.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge.card import CardError, ModelCard, card_path, read_card, sha256_file
from edge.preprocess import to_model_input

MODEL_SUFFIXES = (".tflite", ".onnx")


class ModelError(RuntimeError):
    """A missing, corrupt or mismatched model; the message says which and why."""


@dataclass
class Loaded:
    """A loaded artifact: `run` maps one model-ready batch to the model's outputs."""
    path: Path
    card: ModelCard
    backend: str
    input_dtype: str
    input_quant: tuple[float, int]
    output_quant: list[tuple[float, int]]
    run: Callable[[np.ndarray], list[np.ndarray]] = field(repr=False)

    @property
    def size(self) -> int:
        return self.card.input_size

    def _outputs(self, images_u8: np.ndarray) -> list[np.ndarray]:
        if images_u8.ndim != 4 or images_u8.shape[1:] != (self.size, self.size, 3):
            raise ModelError(f"expected N×{self.size}×{self.size}×3 images, got {images_u8.shape}")
        x = to_model_input(images_u8, self.input_dtype, *self.input_quant)
        outs = self.run(x)
        return [dequantize(o, q) for o, q in zip(outs, self.output_quant)]

    def predict(self, images_u8: np.ndarray) -> np.ndarray:
        """P(Parasitized) per image, float32."""
        return self._outputs(images_u8)[0].reshape(len(images_u8), -1)[:, 0].astype(np.float32)

    def explain(self, images_u8: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
        """(P(Parasitized), Grad-CAM heat map in [0,1] at the conv layer's resolution) per image, for the
        class given per image (1 Parasitized, 0 Uninfected): the class whose label is displayed."""
        if self.card.role != "explainer":
            raise ModelError(f"{self.path}: is a {self.card.role}, not a Grad-CAM explainer")
        outs = self._outputs(images_u8)
        prob = next(o for o in outs if o.size == len(images_u8))
        cam = next(o for o in outs if o.ndim == 3)
        return prob.reshape(-1).astype(np.float32), class_map(cam, classes)


def class_map(cam: np.ndarray, classes) -> np.ndarray:
    """Grad-CAM of a class from the explainer's signed map: ReLU of ±cam, scaled to [0,1] per image."""
    sign = np.where(np.broadcast_to(np.asarray(classes), (len(cam),)) == 1, 1.0, -1.0).astype(np.float32)
    heat = np.maximum(cam.astype(np.float32) * sign[:, None, None], 0)
    return heat / (heat.max(axis=(1, 2), keepdims=True) + 1e-8)


def dequantize(x: np.ndarray, q: tuple[float, int]) -> np.ndarray:
    scale, zp = q
    if x.dtype in (np.int8, np.uint8, np.int16) and scale:
        return (x.astype(np.float32) - zp) * scale
    return x


def load(path: str | Path, threads: int | None = None) -> Loaded:
    """Load an artifact and its card, checking the file is the one the card describes (sha256); every
    failure is a one-line ModelError."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file")
    if path.suffix not in MODEL_SUFFIXES:
        raise ModelError(f"{path}: unsupported model format (use {' or '.join(MODEL_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: model file is empty")
    try:
        card = read_card(path)
    except CardError as e:
        raise ModelError(str(e)) from None
    if not card.artifact_sha256:
        raise ModelError(f"{path}: its model card {card_path(path).name} records no artifact_sha256; re-export it")
    if sha256_file(path) != card.artifact_sha256:
        raise ModelError(f"{path}: file does not match its model card {card_path(path).name} (sha256 differs): "
                         "the model or the card was changed or copied from another export")
    loader = _load_tflite if path.suffix == ".tflite" else _load_onnx
    return loader(path, card, threads)


def load_classifier(path: str | Path, threads: int | None = None, allow_failed_gate: bool = False) -> Loaded:
    """A classifier; one whose card says it failed the export parity gate is refused unless allowed."""
    m = load(path, threads)
    if m.card.role != "classifier":
        raise ModelError(f"{path}: is a {m.card.role}, not a classifier")
    if gate_failed(m.card) and not allow_failed_gate:
        raise ModelError(f"{path}: {gate_failed(m.card)}; pass --allow-failed-gate to run it anyway")
    return m


def gate_failed(card: ModelCard) -> str:
    """Why the card says its artifact failed the export parity gate, or '' when it did not."""
    status = (card.parity or {}).get("status", "pass")
    if status == "pass":
        return ""
    return f"failed the export parity gate ({status}: {(card.parity or {}).get('reason') or 'no reason recorded'})"


def load_explainer_for(classifier: Loaded, threads: int | None = None) -> Loaded:
    """The Grad-CAM explainer named in a classifier's card, in the same format when there is one."""
    name = classifier.card.explainer
    if not name:
        raise ModelError(f"{classifier.path}: its model card names no Grad-CAM explainer")
    path = classifier.path.with_name(name)
    if not path.exists():
        raise ModelError(f"{path}: Grad-CAM explainer named by the model card is missing")
    ex = load(path, threads)
    if ex.card.role != "explainer":
        raise ModelError(f"{path}: is a {ex.card.role}, not a Grad-CAM explainer")
    if ex.card.source_sha256 != classifier.card.source_sha256:
        raise ModelError(f"{path}: explainer comes from another model than {classifier.path.name} "
                         "(source_sha256 differs); re-export both together")
    if ex.card.heatmap != "signed":
        raise ModelError(f"{path}: explainer from an older export (it explains one fixed class); re-export it")
    return ex


def _check_shape(path: Path, shape, card: ModelCard) -> None:
    if len(shape) != 4 or list(shape[1:3]) != [card.input_size, card.input_size] or shape[3] != 3:
        raise ModelError(f"{path}: model input {list(shape)} does not match its card (input_size {card.input_size})")


def _interpreter_class():
    """LiteRT's interpreter: the runtime never falls back to TensorFlow's (absent on a Pi, deprecated there)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:
        raise ModelError("no TFLite runtime: pip install ai-edge-litert") from None


def _load_tflite(path: Path, card: ModelCard, threads: int | None) -> Loaded:
    Interpreter = _interpreter_class()
    try:
        interp = Interpreter(model_path=str(path), num_threads=threads or cpu_count())
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a valid TFLite model ({str(e).splitlines()[0][:160]})") from None
    inp = interp.get_input_details()[0]
    outs = interp.get_output_details()
    _check_shape(path, inp["shape_signature"] if len(inp.get("shape_signature", [])) else inp["shape"], card)
    state = {"n": int(inp["shape"][0])}

    def run(x: np.ndarray) -> list[np.ndarray]:
        if x.shape[0] != state["n"]:
            interp.resize_tensor_input(inp["index"], list(x.shape))
            interp.allocate_tensors()
            state["n"] = x.shape[0]
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return [interp.get_tensor(o["index"]) for o in outs]

    return Loaded(path, card, "litert", np.dtype(inp["dtype"]).name, tuple(inp["quantization"]),
                  [tuple(o["quantization"]) for o in outs], run)


def _load_onnx(path: Path, card: ModelCard, threads: int | None) -> Loaded:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(f"{path}: ONNX models need onnxruntime: pip install \"malaria-edge[onnx]\" "
                         "(or use the .tflite artifact)") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or cpu_count()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"{path}: not a valid ONNX model ({str(e).splitlines()[0][:160]})") from None
    inp = sess.get_inputs()[0]
    _check_shape(path, [d if isinstance(d, int) else -1 for d in inp.shape], card)
    dtype = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}[inp.type]
    names = [o.name for o in sess.get_outputs()]

    def run(x: np.ndarray) -> list[np.ndarray]:
        return sess.run(names, {inp.name: x})

    return Loaded(path, card, "onnxruntime", dtype, (1.0, 0), [(0.0, 0)] * len(names), run)


def cpu_count() -> int:
    """The CPUs this process may run on (a container or taskset limits them), not the host's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def models_dirs() -> list[Path]:
    """Where shipped models live: $MALARIA_EDGE_MODELS, a clone's models/, an install's share/."""
    dirs = []
    if env := os.environ.get("MALARIA_EDGE_MODELS"):
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parents[1] / "models")
    dirs.append(Path(sys.prefix) / "share" / "malaria-edge" / "models")
    return dirs


def installed_classifiers(suffixes=(".tflite", ".onnx")) -> list[tuple[Path, ModelCard]]:
    """Every classifier artifact (by its card's role) in the model folders, each file once, with its card."""
    seen, out = set(), []
    for d in models_dirs():
        for p in sorted(d.glob("*/*")) if d.is_dir() else []:
            if p.suffix not in suffixes or p.resolve() in seen:
                continue
            try:
                card = read_card(p)
            except CardError:
                continue
            if card.role == "classifier":
                seen.add(p.resolve())
                out.append((p, card))
    return out


def default_model(mode: str = "cell") -> Path:
    """The shipped int8 model for cells (models/default.txt) or fields (models/default_field.txt)."""
    for d in models_dirs():
        pointer = d / ("default_field.txt" if mode == "field" else "default.txt")
        if pointer.exists():
            path = d / pointer.read_text().strip()
            if path.exists():
                return path
    raise ModelError("no shipped default model found (looked in "
                     + ", ".join(str(d) for d in models_dirs()) + "); pass --model PATH")
