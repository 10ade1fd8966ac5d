"""Export: every format runs through the edge runtime, the gate catches bad artifacts, Grad-CAM matches."""
import json

import keras
import numpy as np
import pytest

from edge.card import read_card, write_card
from edge.runtime import ModelError, load, load_classifier, load_explainer_for
from export import parity as P
from export.pipeline import FORMATS
from tests.conftest import run


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
    write_card(bad, read_card(_artifact(exported, "tflite-fp32")))
    row = P.check("tflite-fp32", bad, data.labels, p_ref, data.images, P.Gate())
    assert row.status == "FAIL" and "agreement" in row.reason
    good = P.check("tflite-fp32", _artifact(exported, "tflite-fp32"), data.labels, p_ref, data.images, P.Gate())
    assert good.status == "pass"


def test_gate_reports_a_corrupt_artifact_as_error(exported, prepared, tmp_path):
    from export.pipeline import export_data
    src = _artifact(exported, "onnx-int8")
    bad = tmp_path / src.name
    bad.write_bytes(src.read_bytes()[:5000])
    write_card(bad, read_card(src))
    data = export_data(prepared, calib_n=8)
    row = P.check("onnx-int8", bad, data.labels, np.zeros(len(data.labels)), data.images, P.Gate())
    assert row.status == "error" and "not a valid ONNX model" in row.reason


@pytest.mark.parametrize("suffix,cut", [(".tflite", 3000), (".onnx", 3000), (".tflite", 0)])
def test_corrupt_or_truncated_model_is_a_clear_error(exported, tmp_path, suffix, cut):
    src = exported / f"tiny_fp32{suffix}"
    bad = tmp_path / src.name
    bad.write_bytes(src.read_bytes()[:cut])
    write_card(bad, read_card(src))
    with pytest.raises(ModelError, match="empty|not a valid"):
        load(bad)


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


def test_explainer_matches_gradienttape_in_both_formats(tiny_model, exported, prepared):
    from export.graph import gradcam_reference
    from train.data import load_prepared
    d = load_prepared(prepared)
    x = np.asarray(d.images[d.indices("test")])
    model = keras.models.load_model(tiny_model, compile=False)
    ref_p, ref_h = gradcam_reference(model, "last_conv", x)
    for fmt in ("tflite-fp32", "onnx-fp32"):
        ex = load_explainer_for(load_classifier(_artifact(exported, fmt)))
        p, h = ex.explain(x)
        assert h.shape == ref_h.shape == (len(x), 16, 16)
        assert np.max(np.abs(h - ref_h)) <= 1e-4
        assert np.max(np.abs(p - ref_p)) <= 1e-4
        assert h.min() >= 0 and h.max() <= 1 + 1e-6


def test_explainer_that_disagrees_with_gradienttape_stops_the_export(tiny_model, prepared, tmp_path, monkeypatch):
    """A wrong gradient moves the map by far more than the tolerance: the export refuses it."""
    from export import graph
    from export.pipeline import ExplainerMismatch, export_data, export_explainers
    real = graph.gradcam_reference
    monkeypatch.setattr(graph, "gradcam_reference", lambda *a, **k: (lambda p, h: (p, h[:, ::-1]))(*real(*a, **k)))
    model = keras.models.load_model(tiny_model, compile=False)
    card = read_card(tiny_model)
    with pytest.raises(ExplainerMismatch, match="differs from the GradientTape reference"):
        export_explainers(model, card, 128, tmp_path, "tiny", card, export_data(prepared, calib_n=8),
                          log=lambda *_: None)


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
    res = run(["-m", "train.cli", "export", str(tiny_model), "--data", str(prepared), "--out", str(tmp_path),
               "--formats", "tflite-int4"])
    assert res.returncode == 2 and "unknown format" in res.stderr
