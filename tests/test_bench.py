"""The benchmark runs end to end on a tiny model and writes table, CSV, JSON and plot with sane values."""
import csv
import json
import shutil

import numpy as np
import pytest

from tests.conftest import run


@pytest.fixture(scope="module")
def bench_result(tiny_model, exported, prepared, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "tiny"
    shutil.copytree(exported, d)
    for f in (tiny_model, tiny_model.with_name(tiny_model.name + ".card.json")):
        shutil.copy(f, d / f.name)
    out = d.parent / "results"
    res = run(["-m", "malaria_edge", "bench", str(d), "--data", str(prepared), "--out", str(out), "--threads", "1",
               "--runs", "20", "--budget-s", "1", "--max-images", "20", "--e2e-images", "12"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_bench_writes_every_output(bench_result):
    for ext in ("md", "csv", "json", "png"):
        assert (bench_result / f"tiny.{ext}").stat().st_size > 0


def test_bench_rows_cover_every_artifact_with_sane_values(bench_result):
    res = json.loads((bench_result / "tiny.json").read_text())
    names = [r["artifact"] for r in res["rows"]]
    assert names[:2] == ["keras model.predict", "keras model(x)"]
    assert {"tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "onnx-fp32", "onnx-int8"} <= set(names)
    for r in res["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement_pct"] <= 100
        assert 0 < r["p50_b1_t1_ms"] <= r["p99_b1_ms"] and r["runs_b1"] >= 20
        assert r["peak_rss_mb"] > 10 and r["size_mb"] > 0 and r["cells_per_s_b32"] > 0
    tmax = max(int(k.split("_t")[1].split("_")[0]) for k in res["rows"][0] if k.startswith("p50_b1_t"))
    base = res["rows"][0][f"p50_b1_t{tmax}_ms"]
    for r in res["rows"][1:]:  # each speed-up is the baseline's p50 over the row's own, measured in the same run
        assert r["speedup_vs_keras_predict"] == pytest.approx(base / r[f"p50_b1_t{tmax}_ms"])
    assert res["macs_per_image"] > 1e6 and res["peaks"]["1"]["fp32_gflops"] > 0
    f = res["field_mode"]
    assert f["cells"] > 100 and f["fields_per_s"] == pytest.approx(1000 / f["total_ms"])
    assert f["total_ms"] >= f["detect_ms"] + f["classify_ms"] and "fields/s" in (bench_result / "tiny.md").read_text()
    e = res["end_to_end"]
    assert e["images"] == 12 and e["cells_per_s"] > 0 and e["peak_rss_mb"] > 10
    with open(bench_result / "tiny.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res["rows"]) and "speedup_vs_keras_predict" in rows[0]
    md = (bench_result / "tiny.md").read_text()
    assert "| Artifact | Size MB | Accuracy |" in md and "cells/s" in md and "cores" in md


def test_tta_views_are_the_eight_rotations_and_flips_of_each_cell():
    from benchmarks.tta import dihedral
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (2, 6, 6, 3), dtype=np.uint8)
    views = dihedral(x)
    assert len(views) == 8 and all(v.shape == x.shape for v in views)
    assert len({v.tobytes() for v in views}) == 8  # all distinct on a random image
    assert np.array_equal(views[0], x) and np.array_equal(views[2], np.rot90(x, 1, axes=(1, 2)))
    assert all(np.array_equal(np.sort(v[i].ravel()), np.sort(x[i].ravel())) for v in views for i in range(2))


def test_front_reports_each_candidate_card_metrics_beside_its_measured_int8_latency(tiny_model, exported, tmp_path):
    from benchmarks.front import run
    cand = tmp_path / "cand"
    cand.mkdir()
    for f in (tiny_model, tiny_model.with_name(tiny_model.name + ".card.json")):
        shutil.copy(f, cand / f.name)
    (cand / "export").symlink_to(exported)
    res = run([cand, cand], tmp_path / "out", threads=1, rounds=2, log=lambda *_: None)
    card = json.loads((cand / (tiny_model.name + ".card.json")).read_text())
    a, b = res["rows"]
    assert a["val_accuracy"] == card["metrics"]["val"]["accuracy"] and a["test_auc"] == card["metrics"]["test"]["auc"]
    assert a["int8_p50_ms"] > 0 and a["p50_vs_first"] == 1.0
    assert b["p50_vs_first"] == pytest.approx(b["int8_p50_ms"] / a["int8_p50_ms"])
    assert a["int8_kb"] == pytest.approx((exported / "tiny_int8.tflite").stat().st_size / 1024)
    md = (tmp_path / "out" / "front.md").read_text()
    assert md.count(f"| `{cand}` |") == 2 and (tmp_path / "out" / "front.png").stat().st_size > 10_000
