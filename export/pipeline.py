"""`malaria-edge export`: every format, its model card, the Grad-CAM explainers and the parity report."""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge import metrics as M
from edge.card import CARD_SUFFIX, CardError, ModelCard, atomic_write_bytes, read_card, sha256_file, write_card
from edge.runtime import load
from export import parity as P

FORMATS = ("tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "onnx-fp32", "onnx-int8")
# Maps are scaled to [0, 1] per image. On a cell whose channel terms nearly cancel (raw map max 650×
# below the sum of |terms|, seen on the shipped CNN) float32 summation order alone moves the scaled
# map by ~1e-4; a wrong gradient moves it by 0.1 or more.
EXPLAINER_TOL = 1e-3


@dataclass
class ExportData:
    calibration: np.ndarray  # uint8 images from the train split
    images: np.ndarray  # uint8 images of the parity split
    labels: np.ndarray
    title: str


def stratified(labels: np.ndarray, idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices from idx, half per class (as far as each class allows), seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for c in (0, 1):
        pool = idx[labels[idx] == c]
        out.append(rng.choice(pool, min(len(pool), n // 2), replace=False))
    return np.sort(np.concatenate(out))


def full_range(images: np.ndarray) -> np.ndarray:
    """Calibration images with one pixel at 0 and one at 255, so the calibrated input range is the
    whole 0..255 (int8 input = pixel − 128 exactly; no bright pixel ever clips)."""
    out = np.array(images, copy=True)
    out[0, 0, 0, :] = 0
    out[0, 0, 1, :] = 255
    return out


def export_data(data_dir: Path, calib_n: int = 300, parity_split: str = "test", max_parity: int | None = None,
                seed: int = 0) -> ExportData:
    from train.data import DataError, load_prepared
    d = load_prepared(data_dir)
    cal = stratified(d.labels, d.indices("train"), calib_n, seed)
    par = d.indices(parity_split)
    if len(par) == 0 or len(cal) == 0:
        raise DataError(f"{data_dir}: the {'train' if len(cal) == 0 else parity_split} split is empty")
    if max_parity and len(par) > max_parity:
        par = stratified(d.labels, par, max_parity, seed)
    return ExportData(full_range(d.images[cal]), np.asarray(d.images[par]), d.labels[par],
                      f"{parity_split} split ({len(par)} images, split hash {d.split_info['hash']})")


def tool_versions() -> dict:
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx
    import keras
    try:
        from importlib.metadata import version
        litert = version("ai-edge-litert")
    except Exception:
        litert = "n/a"
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "ai-edge-litert": litert,
            "python": platform.python_version()}


class ExportFailed(RuntimeError):
    """A conversion or gate failed: nothing in the output folder was changed. `.rows` says which and why."""

    def __init__(self, msg: str, rows: list[P.Row], report: str):
        super().__init__(msg)
        self.rows, self.report = rows, report


def export_model(keras_path: Path, out: Path, data: ExportData, formats=FORMATS, gate: P.Gate = P.Gate(),
                 name: str | None = None, explainer: bool = True, log=print) -> list[P.Row]:
    """Write each artifact with its card, gate it against the float model, and report. Returns the rows.

    Everything is written to a staging folder beside `out` and moved in only when every artifact and
    explainer passes; otherwise `out` is left exactly as it was and ExportFailed says why."""
    keras_path, out = Path(keras_path), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        rows = _export_into(keras_path, stage, data, formats, gate, name, explainer, log)
        failed = [r for r in rows if r.status != "pass"]
        if failed:
            raise ExportFailed(f"{len(failed)} artifact(s) failed; {out} left unchanged: "
                               + ", ".join(f"{r.format} ({r.reason})" for r in failed),
                               rows, (stage / "parity.md").read_text())
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage.iterdir(), key=lambda f: f.name.endswith(CARD_SUFFIX)):  # artifacts, then cards
            os.replace(f, out / f.name)
        return rows
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _export_into(keras_path: Path, out: Path, data: ExportData, formats, gate: P.Gate, name: str | None,
                 explainer: bool, log) -> list[P.Row]:
    import keras
    from export import graph, onnx as onnx_export, tflite
    from train.evaluate import keras_predict

    model = keras.models.load_model(keras_path, compile=False)
    try:
        src_card = read_card(keras_path)
    except CardError:
        src_card = ModelCard(name=keras_path.stem, format="keras", gradcam_layer="last_conv")
    size = int(model.input_shape[1])
    name = name or src_card.name or keras_path.stem
    src_sha = sha256_file(keras_path)
    tools = tool_versions()
    serve = graph.serving_function(model, size)
    p_ref = keras_predict(model, data.images)
    ref = {"n": int(len(data.labels)), **M.binary_metrics(data.labels, p_ref, src_card.threshold)}
    base = dataclasses.replace(src_card, name=name, source_sha256=src_sha, tools=tools, parity={})
    thresholds = P.thresholds_of(src_card)

    explainers, checks = export_explainers(model, src_card, size, out, name, base, data, log) if explainer else ({}, {})

    rows = []
    for fmt in formats:
        kind, variant = fmt.split("-", 1)
        path = out / f"{name}_{variant}.{kind}"
        log(f"export {fmt} → {path.name}")
        try:
            if kind == "tflite":
                atomic_write_bytes(path, tflite.convert(serve, variant, data.calibration))
            elif variant == "fp32":
                onnx_export.convert(serve, path, size)
            else:
                fp32 = out / f"{name}_fp32.onnx"  # always this export's own (staging starts empty)
                if not fp32.exists():
                    onnx_export.convert(serve, fp32, size)
                onnx_export.quantize_int8(fp32, path, data.calibration)
        except Exception as e:  # a converter failure marks this artifact failed, the others go on
            rows.append(P.Row(fmt, path.name, "error", 0.0, f"conversion failed: {type(e).__name__}: {str(e)[:200]}"))
            log(f"  error: {rows[-1].reason}")
            continue
        card = dataclasses.replace(base, format=kind, variant=variant, artifact_sha256=sha256_file(path),
                                   explainer=explainers.get(kind, ""))
        write_card(path, card)
        row = P.check(fmt, path, data.labels, p_ref, data.images, gate, thresholds)
        if row.status != "error":  # an artifact the runtime cannot load is reported as an error row, not raised
            loaded = load(path)
            card.input_dtype, card.input_quant = loaded.input_dtype, _q(loaded.input_quant)
            card.output_quant = _q(loaded.output_quant[0])
        card.parity = {"status": row.status, "reason": row.reason, "on": data.title, **row.metrics}
        if kind == "onnx":
            onnx_export.set_metadata(path, _onnx_props(card))
            card.artifact_sha256 = sha256_file(path)
        write_card(path, card)
        rows.append(row)
        log(f"  {row.status} {row.reason}")
    if "onnx-fp32" not in formats:
        (out / f"{name}_fp32.onnx").unlink(missing_ok=True)  # only the int8 export's intermediate
    P.write_report(out, rows, f"Parity of {name} (source sha256 {src_sha[:12]}) on the {data.title}", ref, gate,
                   {"explainer_vs_gradienttape": checks}, thresholds)
    return rows


def _q(q) -> tuple[float, int] | None:
    return (float(q[0]), int(q[1])) if q and q[0] else None


def _onnx_props(card: ModelCard) -> dict[str, str]:
    return {"malaria_edge.class_names": ",".join(card.class_names), "malaria_edge.input_size": str(card.input_size),
            "malaria_edge.normalization": card.normalization, "malaria_edge.threshold": str(card.threshold),
            "malaria_edge.source_sha256": card.source_sha256, "malaria_edge.split_hash": card.split_hash,
            "malaria_edge.variant": card.variant, "malaria_edge.recipe": card.recipe}


class ExplainerMismatch(RuntimeError):
    pass


def export_explainers(model, src_card: ModelCard, size: int, out: Path, name: str, base: ModelCard,
                      data: ExportData, log=print, probe_n: int = 32) -> tuple[dict, dict]:
    """Grad-CAM of the full float model as its own graph, in both formats, checked against GradientTape for
    both classes' maps on a class-balanced probe of the parity images."""
    from export import graph, onnx as onnx_export, tflite
    layer = src_card.gradcam_layer
    fn = graph.explainer_function(model, layer, size)
    probe_idx = stratified(data.labels, np.arange(len(data.labels)), probe_n, seed=0)
    probe = data.images[probe_idx]
    refs = {c: graph.gradcam_reference(model, layer, probe, np.full(len(probe), c)) for c in (0, 1)}
    written, checks = {}, {}
    for kind in ("tflite", "onnx"):
        path = out / f"{name}_explainer.{kind}"
        log(f"export Grad-CAM explainer → {path.name}")
        if kind == "tflite":
            atomic_write_bytes(path, tflite.convert(fn, "fp32"))
        else:
            onnx_export.convert(fn, path, size)
        card = dataclasses.replace(base, format=kind, variant="fp32", role="explainer", heatmap="signed",
                                   artifact_sha256=sha256_file(path))
        write_card(path, card)
        ex = load(path)
        diff = dprob = 0.0
        for c, (ref_p, ref_h) in refs.items():
            p, h = ex.explain(probe, c)
            diff, dprob = max(diff, float(np.max(np.abs(h - ref_h)))), max(dprob, float(np.max(np.abs(p - ref_p))))
        checks[kind] = {"max_abs_diff": diff, "prob_max_abs_diff": dprob, "images": len(probe),
                        "per_class": int(np.bincount(data.labels[probe_idx].astype(int), minlength=2).min())}
        card.parity = {"gradcam_vs_gradienttape": checks[kind], "heatmap_shape": list(h.shape[1:])}
        write_card(path, card)
        log(f"  heat map max |Δ| vs GradientTape: {diff:.2e} on {len(probe)} images, both classes")
        if diff > EXPLAINER_TOL:
            raise ExplainerMismatch(f"{path.name}: Grad-CAM differs from the GradientTape reference by {diff:.2e} "
                                    f"(> {EXPLAINER_TOL})")
        written[kind] = path.name
    return written, checks
