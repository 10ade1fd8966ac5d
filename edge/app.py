"""The browser app next to the microscope: cells and fields on the edge runtime (no TensorFlow, no Keras).

Started by `malaria-edge app` (`streamlit run` on this file). Models load once per process
(`st.cache_resource`, one lock each: an interpreter is not thread-safe and every browser session is a
thread); everything a visitor uploads or gets back lives in that visitor's session state, and files
are written only to that session's own temporary folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import streamlit as st

from edge.camera import CameraError
from edge.card import calibrated
from edge.classifier import Classifier
from edge.gradcam import overlay
from edge.images import IMAGE_SUFFIXES, ImageError, decode_image
from edge.infer import not_a_cell
from edge.report import encode, left_out_text, percent_text
from edge.runtime import (ModelError, default_model, installed_classifiers, load_classifier, load_explainer_for,
                          models_dirs)

MAX_UPLOAD_MB = 50  # also passed to Streamlit's server by `malaria-edge app`
CAMERA = os.environ.get("MALARIA_EDGE_CAMERA", "auto")  # `malaria-edge app --camera SPEC`
NOTE = "Research use only, not a diagnosis: a trained microscopist must confirm every result."
TYPES = sorted(s.lstrip(".") for s in IMAGE_SUFFIXES)


def installed_models() -> dict[str, Path]:
    """Every shipped or installed classifier artifact this install can run, by a label read from its card."""
    import importlib.util
    suffixes = (".tflite", ".onnx") if importlib.util.find_spec("onnxruntime") else (".tflite",)
    found = {}
    for p, card in installed_classifiers(suffixes):
        found.setdefault(f"{card.name} · {card.format} · {card.variant}", p)
    return found


@st.cache_resource(max_entries=6, show_spinner="Loading the model…")
def get_model(path: str):
    """(classifier, explainer or None, lock), once per process."""
    model = load_classifier(path)
    try:
        explainer = load_explainer_for(model)
    except ModelError:
        explainer = None
    return model, explainer, threading.Lock()


def session_folder() -> Path:
    """This browser session's own temporary folder (reports are written here, then downloaded)."""
    if "tmp" not in st.session_state:
        st.session_state["tmp"] = tempfile.mkdtemp(prefix="malaria-edge-app-")
    return Path(st.session_state["tmp"])


def to_rgb(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_upload(f) -> np.ndarray:
    data = f.getvalue()
    if len(data) > MAX_UPLOAD_MB * 1_000_000:
        raise ImageError(f"{f.name}: {len(data) / 1e6:.0f} MB is over the {MAX_UPLOAD_MB} MB upload limit")
    return decode_image(data, f.name)


@st.cache_resource(max_entries=12, show_spinner=False)
def get_point(path: str, name: str):
    """A named operating point of a cached model, its screen loaded once per process."""
    from edge.operating import operating_point
    return operating_point(get_model(path)[0], name)


def default_index(models: dict[str, Path], mode: str) -> int:
    """Where the shipped default for cells or fields sits in the list (models/default*.txt)."""
    try:
        want = default_model(mode).resolve()
        return next(i for i, p in enumerate(models.values()) if p.resolve() == want)
    except (StopIteration, ModelError):
        return 0


@dataclass(frozen=True)
class Capture:
    """A field grabbed from the camera beside the app, held like an upload (name, getvalue)."""
    name: str
    data: bytes

    def getvalue(self) -> bytes:
        return self.data


def capture_field(spec: str, k: int) -> Capture:
    """One frame from the microscope camera on the machine running the app (the Pi camera, a USB camera,
    or a video file standing in for one), as a lossless PNG."""
    from edge.camera import Source, frames, parse_camera
    src = Source(spec, is_file=True) if Path(spec).is_file() else parse_camera(spec)
    for _, _, frame in frames(src, retries=1, retry_wait=0.5, log=lambda m: None):
        return Capture(f"camera-{k + 1:03d}.png", encode(frame, ".png"))
    raise CameraError(f"{src.describe()} gave no frame")


def sidebar(models: dict[str, Path]):
    st.sidebar.header("Cells: model and threshold")
    choice = st.sidebar.selectbox("Classifier (from the installed model cards)", list(models),
                                  index=default_index(models, "cell"), key="model")
    model, explainer, lock = get_model(str(models[choice]))
    card = model.card
    # a screened point is a rule of two models, measured for fields: the cell tab offers plain thresholds
    ops = {"card default": card.threshold,
           **{k: v["threshold"] for k, v in card.operating_points.items() if "screen" not in v}}
    op = st.sidebar.selectbox("Operating point", [*ops, "custom"], key="op",
                              format_func=lambda k: k if k == "custom" else f"{k} ({ops[k]:.4f})")
    thr = st.sidebar.slider("Threshold on P(Parasitized)", 0.001, 0.999, float(ops.get(op, card.threshold)),
                            step=0.001, format="%.3f", key=f"thr-{choice}-{op}", disabled=op != "custom")
    st.sidebar.caption("Card points: " + " · ".join(f"{k} {v:.4f}" for k, v in ops.items()))
    evidence = st.sidebar.radio("Grad-CAM shows evidence for", ["label", "Parasitized"], key="evidence",
                                format_func=lambda e: "the label shown" if e == "label" else "Parasitized (every cell)")
    st.sidebar.caption(f"{model.path.name} · input {card.input_size} px · {model.backend}"
                       + ("" if explainer else " · no Grad-CAM explainer"))
    return model, explainer, lock, thr, evidence


def cells_tab(model, explainer, lock, thr: float, evidence: str) -> None:
    files = st.file_uploader("Cell images (one cell per image)", type=TYPES, accept_multiple_files=True, key="cells")
    if not files:
        st.info("Upload one or more single-cell images (PNG, JPEG, WebP, TIFF, BMP).")
        return
    good, rows = [], []
    for f in files:
        try:
            rgb = decode_upload(f)
        except ImageError as e:
            st.error(str(e))
            rows.append({"file": f.name, "label": "", "prob_parasitized": None, "status": "error", "error": str(e)})
            continue
        if why := not_a_cell(rgb, model.size):
            st.error(f"{f.name}: {why.replace('use --field', 'use the Fields tab')}")
            rows.append({"file": f.name, "label": "", "prob_parasitized": None, "status": "error", "error": why})
            continue
        good.append((f.name, rgb))
    pics = []
    if good:
        clf = Classifier(model, thr, explainer)  # this session's threshold over the shared, locked model
        x = clf.batch([rgb for _, rgb in good])
        with lock:
            probs, heat, cls = clf.run(x, evidence)
        if heat is None:
            heat, cls = [None] * len(good), [None] * len(good)
        names = model.card.class_names
        for (name, rgb), p, c, h in zip(good, probs, cls, heat):
            pred = clf.prediction(float(p))
            pic = overlay(rgb, h, pred.label, clf.calibrated(float(p)), panel=True,
                          heat_class=None if c is None else names[c])
            pics.append((name, pic))
            rows.append({"file": name, "label": pred.label, "prob_parasitized": round(float(p), 6), "status": "ok",
                         "error": ""})
            left, right = st.columns([3, 2])
            left.image(to_rgb(pic), caption=name)
            right.markdown(f"### {pred.label}\nconfidence **{pred.confidence:.1%}** · P(Parasitized) {p:.4f} · "
                           f"threshold {thr:.4f}" + (f"\n\nGrad-CAM: evidence for **{names[c]}**" if h is not None else ""))
    st.subheader("Results")
    st.dataframe(rows, hide_index=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["file", "label", "prob_parasitized", "status", "error"])
    w.writeheader()
    w.writerows(rows)
    a, b = st.columns(2)
    a.download_button("Download results (CSV)", buf.getvalue(), "cells.csv", "text/csv", key="dl-cells-csv")
    if pics:
        z = io.BytesIO()
        with zipfile.ZipFile(z, "w") as zf:
            for k, (name, pic) in enumerate(pics):
                zf.writestr(f"{k:03d}_{Path(name).stem}_gradcam.png", encode(pic, ".png"))
        b.download_button("Download overlays (zip)", z.getvalue(), "overlays.zip", "application/zip", key="dl-cells-zip")


def fields_tab(models: dict[str, Path]) -> None:
    from edge.field import FieldOptions, Session, analyze, positive_maps
    from edge.operating import describe, field_point
    from edge.fieldrun import cell_rows, looks_like_one_cell
    from edge.report import data_uri, field_overlay, write_html
    from edge.results import CELL_FIELDS
    a, b, c = st.columns([2, 1, 1])
    choice = a.selectbox("Field classifier", list(models), index=default_index(models, "field"), key="field-model")
    target = c.number_input("Target red cells", 100, 100_000, 2000, step=100, key="target")
    try:
        model, explainer, lock = get_model(str(models[choice]))
        names = list(model.card.operating_points or {}) or ["counting"]
        default = field_point(model)
        op = b.selectbox("Operating point", names, index=names.index(default) if default in names else 0,
                         key=f"field-op-{choice}")
        point = get_point(str(models[choice]), op)
    except ModelError as e:
        st.error(str(e))
        return
    opts = FieldOptions.at(point, target_cells=int(target))
    st.caption(f"Counting at {describe(point)}; the parasitemia is corrected for the "
               "sensitivity and specificity measured there.")
    files = list(st.file_uploader("Field photos (a whole microscope field each)", type=TYPES,
                                  accept_multiple_files=True, key="fields") or [])
    captures = st.session_state.setdefault("captures", [])
    a, b = st.columns(2)
    if a.button(f"Capture a field from the microscope camera ({CAMERA})", key="capture"):
        try:
            captures.append(capture_field(CAMERA, len(captures)))
        except CameraError as e:
            st.error(f"camera: {e}")
    if captures and b.button(f"Forget the {len(captures)} captured field(s)", key="forget"):
        captures.clear()
    files += captures
    if st.checkbox("Take a photo with a camera on the device that opened this page", key="use-camera"):
        shot = st.camera_input("Field photo", key="camera")
        if shot is not None:
            files.append(shot)
    if not files:
        st.info("Upload field photos, capture one from the microscope camera, or take one. Each is searched for "
                "red cells; each cell is classified.")
        return
    cache, used = st.session_state.setdefault("field-cache", {}), set()
    session = Session(opts)
    overlays, gallery = [], []
    with st.spinner("Finding and classifying cells…"):
        for f in files:
            key = (hashlib.sha1(f.getvalue()).hexdigest(), str(model.path), op)
            if key not in cache:  # every widget change reruns this script: decode and analyse each field once
                try:
                    rgb = decode_upload(f)
                except ImageError as e:
                    st.error(str(e))
                    continue
                with lock:
                    res = analyze(rgb, f.name, model, opts)
                    heat = positive_maps(res, explainer)
                cache[key] = (res, heat, field_overlay(rgb, res))
            used.add(key)
            res, heat, pic = cache[key]
            if looks_like_one_cell(res):
                st.error(f"{f.name}: looks like a single cell crop, not a field: use the Cells tab")
                continue
            session.add(res)
            overlays.append((f.name, pic))
            gallery += [(f.name, i, res.cells[i].prob_parasitized, c, heat[i]) for i, c in res.crops.items()]
    for k in set(cache) - used:  # only the uploads still on the page stay in memory
        del cache[k]
    if not session.fields:
        return
    summary = session.summary(model)
    e = session.estimate()
    lo, hi = e.parasitemia_ci95
    a, b, c = st.columns(3)
    a.metric("Parasitemia (corrected)", "n/a" if e.rbc_count == 0 else f"{e.parasitemia_percent:.2f}%",
             help="Rogan–Gladen corrected for the model's sensitivity (its validation sensitivity, scaled for what "
                  "field mode's crops miss where the card measured it) and validation specificity")
    a.caption(f"95% interval {lo:.2f}–{hi:.2f}%")
    b.metric("Red cells counted", f"{e.rbc_count} / {opts.target_cells}")
    b.progress(min(1.0, e.rbc_count / opts.target_cells))
    c.metric("Called parasitized", e.positive_count, help=f"raw share {e.raw_percent:.2f}%")
    if not session.target_reached:
        st.warning(f"Target of {opts.target_cells} red cells not reached: add fields before trusting the count.")
    st.subheader("Fields")
    st.dataframe([{"field": f["path"], "status": f["status"], "reason": f["reason"], "red cells": f["rbc_count"],
                   "parasitized": f["positive_count"], "cell px": f["cell_diameter_px"],
                   "focus": f["quality"].get("focus", ""),
                   "overlapped": percent_text(f["quality"].get("overlapped")),
                   "left out": left_out_text(f.get("left_out", {}))}
                  for f in summary["fields"]], hide_index=True)
    for name, pic in overlays:
        st.image(to_rgb(pic), caption=f"{name}: green uninfected · red parasitized · grey left out "
                                               "(white cells and clumps named: check none is an infected cell)")
    st.subheader(f"Positive cells ({len(gallery)}): crop and Grad-CAM of the Parasitized class")
    cols = st.columns(4)
    for k, (name, i, p, crop, h) in enumerate(gallery):
        cols[k % 4].image(to_rgb(overlay(crop, h, "Parasitized", calibrated(p, model.card.temperature), panel=True)),
                          caption=f"{name} #{i} P={p:.3f}")
    folder = session_folder()
    report = write_html(folder, summary, [(n, data_uri(cv2.resize(p, None, fx=0.5, fy=0.5))) for n, p in overlays],
                        gallery, session.confirmed_table())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CELL_FIELDS)
    w.writeheader()
    for f in session.fields:
        w.writerows({k: (str(v) if isinstance(v, list) else v) for k, v in r.items()} for r in cell_rows(f))
    a, b = st.columns(2)
    a.download_button("Download the session report (HTML)", report.read_bytes(), "report.html", "text/html",
                      key="dl-report")
    b.download_button("Download the cell table (CSV)", buf.getvalue(), "cells.csv", "text/csv", key="dl-fields-csv")


def main() -> None:
    st.set_page_config(page_title="malaria-edge", page_icon="🔬", layout="wide")
    st.title("malaria-edge")
    st.warning(NOTE)
    models = installed_models()
    if not models:
        st.error("No models installed: looked in " + ", ".join(str(d) for d in models_dirs()))
        return
    cells, fields = st.tabs(["Cells", "Fields"])
    with cells:
        try:
            model, explainer, lock, thr, evidence = sidebar(models)
        except ModelError as e:
            st.error(str(e))
        else:
            cells_tab(model, explainer, lock, thr, evidence)
    with fields:
        fields_tab(models)


if __name__ == "__main__":  # `streamlit run` and AppTest run this file as __main__
    main()
