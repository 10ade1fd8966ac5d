"""Export: every format runs through the edge runtime, the gate catches bad artifacts, Grad-CAM matches."""
import json

import keras
import numpy as np
import pytest

from edge.card import read_card, sha256_file, write_card
from edge.runtime import ModelError, load, load_classifier, load_explainer_for
from export import parity as P
from export.pipeline import FORMATS
from tests.conftest import ROOT, run


def _card_beside(path, src):
    """src's card for a file made in the test, with the file's own sha256 (or load refuses it first)."""
    card = read_card(src)
    card.artifact_sha256 = sha256_file(path)
    write_card(path, card)


def _artifact(exported, fmt):
    kind, variant = fmt.split("-", 1)
    return exported / f"tiny_{variant}.{kind}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_and_predicts(exported, prepared, fmt):
    from train.data import load_prepared
    d = load_prepared(prepared)
    m = load_classifier(_artifact(exported, fmt))
    p = m.predict(np.asarray(d.images[:5]))
    assert p.shape == (5,) and np.all((p >= 0) & (p <= 1))
    card = read_card(m.path)
    assert card.parity["status"] == "pass" and card.source_sha256 and card.split_hash
    assert card.artifact_sha256 and card.tools["tf2onnx"]


def test_int8_tflite_takes_int8_pixels_exactly(exported):
    m = load(_artifact(exported, "tflite-int8"))
    assert m.input_dtype == "int8" and m.input_quant == (1.0, -128)
    assert read_card(m.path).input_quant == (1.0, -128)


def test_parity_report_lists_every_format(exported):
    rep = json.loads((exported / "parity.json").read_text())
    assert [r["format"] for r in rep["rows"]] == list(FORMATS)
    md = (exported / "parity.md").read_text()
    assert "| Format | Status | Size MB | Accuracy | AUC | Δacc pp | Agreement % |" in md


def test_gate_fails_an_artifact_that_disagrees(tiny_model, exported, prepared, tmp_path):
    """A model whose logit is negated (every label flips) must be reported as FAIL, not pass."""
    from export import graph, tflite
    from export.pipeline import export_data
    from train.evaluate import keras_predict
    model = keras.models.load_model(tiny_model, compile=False)
    data = export_data(prepared, calib_n=8)
    p_ref = keras_predict(model, data.images)
    logit = model.get_layer("logit")
    logit.kernel.assign(-logit.kernel)
    logit.bias.assign(-logit.bias)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(tflite.convert(graph.serving_function(model, 128), "fp32"))
    _card_beside(bad, _artifact(exported, "tflite-fp32"))
    row = P.check("tflite-fp32", bad, data.labels, p_ref, data.images, P.Gate(), {"card": 0.5})
    assert row.status == "FAIL" and "agreement 0.00% < 99.0% at the card threshold 0.5000" in row.reason
    good = P.check("tflite-fp32", _artifact(exported, "tflite-fp32"), data.labels, p_ref, data.images, P.Gate())
    assert good.status == "pass"


def test_gate_reports_a_corrupt_artifact_as_error(exported, prepared, tmp_path):
    from export.pipeline import export_data
    src = _artifact(exported, "onnx-int8")
    bad = tmp_path / src.name
    bad.write_bytes(src.read_bytes()[:5000])
    _card_beside(bad, src)
    data = export_data(prepared, calib_n=8)
    row = P.check("onnx-int8", bad, data.labels, np.zeros(len(data.labels)), data.images, P.Gate())
    assert row.status == "error" and "not a valid ONNX model" in row.reason


@pytest.mark.parametrize("suffix,cut", [(".tflite", 3000), (".onnx", 3000), (".tflite", 0)])
def test_corrupt_or_truncated_model_is_a_clear_error(exported, tmp_path, suffix, cut):
    src = exported / f"tiny_fp32{suffix}"
    bad = tmp_path / src.name
    bad.write_bytes(src.read_bytes()[:cut])
    _card_beside(bad, src)
    with pytest.raises(ModelError, match="empty|not a valid"):
        load(bad)


def test_an_artifact_that_is_not_the_one_its_card_describes_is_refused(exported, tmp_path):
    """The int8 file copied over the fp32 one (or a card copied from another export)."""
    swapped = tmp_path / "tiny_fp32.tflite"
    swapped.write_bytes((exported / "tiny_int8.tflite").read_bytes())
    write_card(swapped, read_card(exported / "tiny_fp32.tflite"))
    with pytest.raises(ModelError, match=r"tiny_fp32.tflite: file does not match its model card "
                                         r"tiny_fp32.tflite.card.json \(sha256 differs\)"):
        load(swapped)


def test_an_explainer_from_another_model_is_refused(exported, tmp_path):
    import shutil
    for f in exported.glob("tiny_int8.tflite*"):
        shutil.copy(f, tmp_path / f.name)
    for f in exported.glob("tiny_explainer.tflite*"):
        shutil.copy(f, tmp_path / f.name)
    card = read_card(tmp_path / "tiny_explainer.tflite")
    card.source_sha256 = "0" * 64
    write_card(tmp_path / "tiny_explainer.tflite", card)
    with pytest.raises(ModelError, match="explainer comes from another model than tiny_int8.tflite"):
        load_explainer_for(load_classifier(tmp_path / "tiny_int8.tflite"))


def test_a_model_that_failed_the_gate_runs_only_when_allowed(exported, tmp_path):
    import shutil
    m = tmp_path / "tiny_int8.onnx"
    shutil.copy(exported / "tiny_int8.onnx", m)
    card = read_card(exported / "tiny_int8.onnx")
    card.parity = {**card.parity, "status": "FAIL", "reason": "agreement 97.00% < 99.0% at the card threshold 0.5000"}
    write_card(m, card)
    with pytest.raises(ModelError, match="failed the export parity gate .*agreement 97.00%.*--allow-failed-gate"):
        load_classifier(m)
    assert load_classifier(m, allow_failed_gate=True).card.parity["status"] == "FAIL"
    from tests.test_edge import infer
    refused = infer(exported.parent / "x.png", "--model", m)
    assert refused.returncode == 1 and "--allow-failed-gate" in refused.stderr
    cell = next((ROOT / "examples" / "cells").rglob("*.png"))
    allowed = infer(cell, "--model", m, "--allow-failed-gate")
    assert allowed.returncode == 0 and "warning: tiny_int8.onnx failed the export parity gate" in allowed.stderr


def test_model_without_card_or_wrong_size_is_refused(exported, tmp_path):
    src = exported / "tiny_int8.tflite"
    lone = tmp_path / "lone.tflite"
    lone.write_bytes(src.read_bytes())
    with pytest.raises(ModelError, match="no model card"):
        load(lone)
    card = read_card(src)
    card.input_size = 96
    write_card(lone, card)
    with pytest.raises(ModelError, match="does not match its card"):
        load(lone)


@pytest.mark.parametrize("cls", [0, 1])
def test_explainer_matches_gradienttape_for_either_class_in_both_formats(tiny_model, exported, prepared, cls):
    from export.graph import gradcam_reference
    from train.data import load_prepared
    d = load_prepared(prepared)
    x = np.asarray(d.images[d.indices("test")])
    model = keras.models.load_model(tiny_model, compile=False)
    ref_p, ref_h = gradcam_reference(model, "last_conv", x, np.full(len(x), cls))
    for fmt in ("tflite-fp32", "onnx-fp32"):
        ex = load_explainer_for(load_classifier(_artifact(exported, fmt)))
        p, h = ex.explain(x, cls)
        assert h.shape == ref_h.shape == (len(x), 16, 16)
        assert np.max(np.abs(h - ref_h)) <= 1e-4
        assert np.max(np.abs(p - ref_p)) <= 1e-4
        assert h.min() >= 0 and h.max() <= 1 + 1e-6


def test_explainer_probe_is_class_balanced(exported):
    c = json.loads((exported / "parity.json").read_text())["explainer_vs_gradienttape"]["tflite"]
    assert c["per_class"] >= 1 and c["per_class"] * 2 <= c["images"]


def test_explainer_that_disagrees_with_gradienttape_stops_the_export(tiny_model, prepared, tmp_path, monkeypatch):
    """A wrong explainer graph (its map mirrored, as a wrong gradient would move it) is refused."""
    import tensorflow as tf
    from export import graph
    from export.pipeline import ExplainerMismatch, export_data, export_explainers
    real = graph.gradcam

    def mirrored(model, layer):
        f = real(model, layer)
        return lambda image: (lambda o: {"prob": o["prob"], "cam": tf.reverse(o["cam"], axis=[1])})(f(image))

    monkeypatch.setattr(graph, "gradcam", mirrored)
    model = keras.models.load_model(tiny_model, compile=False)
    card = read_card(tiny_model)
    with pytest.raises(ExplainerMismatch, match="differs from the GradientTape reference"):
        export_explainers(model, card, 128, tmp_path, "tiny", card, export_data(prepared, calib_n=8),
                          log=lambda *_: None)


def test_a_failed_export_leaves_the_previous_artifacts_untouched(tiny_model, exported, prepared, tmp_path):
    import shutil
    from export.pipeline import ExportFailed, export_data, export_model
    out = tmp_path / "models"
    shutil.copytree(exported, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(ExportFailed, match="left unchanged") as e:
        export_model(tiny_model, out, export_data(prepared, calib_n=8), ("tflite-fp32", "onnx-int8"),
                     P.Gate(min_agreement_pct=100.1), name="tiny", log=lambda *_: None)
    assert {r.format for r in e.value.rows} == {"tflite-fp32", "onnx-int8"}
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["models"]  # no staging folder left behind


def test_gate_judges_agreement_at_every_card_threshold_outside_the_band():
    y = np.array([0, 0, 1, 1])
    ref = np.array([0.015, 0.30, 0.60, 0.95])
    new = np.array([0.025, 0.30, 0.60, 0.93])  # flips only the image 0.005 from the 0.02 threshold
    assert P.agreement(ref, new, 0.02, band=0.01) == {"threshold": 0.02, "agreement_pct": 100.0, "judged": 3, "near": 1}
    assert P.agreement(ref, new, 0.02, band=0.0)["agreement_pct"] == 75.0
    flip = np.array([0.015, 0.30, 0.60, 0.90])  # the 0.95 image crosses a 0.94 counting threshold
    assert P.agreement(ref, flip, 0.94, band=0.005)["agreement_pct"] == 75.0


def test_onnx_metadata_round_trip(exported):
    from export.onnx import get_metadata
    path = _artifact(exported, "onnx-int8")
    meta, card = get_metadata(path), read_card(path)
    assert meta["malaria_edge.class_names"] == ",".join(card.class_names)
    assert meta["malaria_edge.source_sha256"] == card.source_sha256
    assert float(meta["malaria_edge.threshold"]) == card.threshold
    from edge.card import ModelCard, sha256_file
    assert ModelCard.from_dict(json.loads(card.to_json())) == card
    assert card.artifact_sha256 == sha256_file(path)


def test_export_cli_rejects_unknown_format(tiny_model, prepared, tmp_path):
    res = run(["-m", "malaria_edge", "export", str(tiny_model), "--data", str(prepared), "--out", str(tmp_path),
               "--formats", "tflite-int4"])
    assert res.returncode == 2 and "unknown format" in res.stderr


def test_mobilenetv2_exports_with_a_pooling_explainer_that_matches_gradienttape(prepared, tmp_path):
    """The MobileNetV2 path (GlobalAveragePooling between the Grad-CAM layer and the head), tiny width and input."""
    import cv2
    from edge.card import ModelCard
    from export.pipeline import ExportData, export_model
    from train.data import load_prepared
    from train.models import build_mobilenetv2, gradcam_layer_for
    model = build_mobilenetv2(32, weights="none", alpha=0.35)
    path = tmp_path / "mnv2.keras"
    model.save(path)
    write_card(path, ModelCard(name="mnv2", format="keras", recipe="mobilenetv2", input_size=32,
                               gradcam_layer=gradcam_layer_for("mobilenetv2")))
    d = load_prepared(prepared)
    small = np.stack([cv2.resize(np.asarray(im), (32, 32), interpolation=cv2.INTER_AREA) for im in d.images])
    data = ExportData(small[:8], small, d.labels, "all fixture cells")
    rows = export_model(path, tmp_path / "out", data, ("tflite-int8",), P.Gate(max_delta_pp=100, min_agreement_pct=0),
                        log=lambda *_: None)
    assert [r.status for r in rows] == ["pass"]
    checks = json.loads((tmp_path / "out" / "parity.json").read_text())["explainer_vs_gradienttape"]
    assert set(checks) == {"tflite", "onnx"} and all(c["max_abs_diff"] <= 1e-3 for c in checks.values())
    m = load_classifier(tmp_path / "out" / "mnv2_int8.tflite")
    _, heat = load_explainer_for(m).explain(small[:4], 1)
    shape = read_card(m.path.with_name("mnv2_explainer.tflite")).parity["heatmap_shape"]
    assert heat.shape == (4, *shape) and np.all((heat >= 0) & (heat <= 1))
