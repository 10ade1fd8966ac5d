"""`edge-infer` end to end on real images, videos and exported models."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from edge.images import load_image
from edge.options import RunOptions
from edge.preprocess import resize_rgb
from edge.runtime import load_classifier, load_explainer_for
from tests.conftest import ROOT, run


def infer(*args, **kw):
    return run(["-m", "edge.cli", *map(str, args)], **kw)


@pytest.fixture(scope="module")
def mixed_inputs(cell_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    good = cell_files[:3]
    for p in good:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "empty.png").write_bytes(b"")
    (d / "corrupt.webp").write_bytes(good[0].read_bytes()[:200])
    (d / "text.jpg").write_text("hello")
    grey = cv2.cvtColor(load_image(good[0]), cv2.COLOR_RGB2GRAY)  # a monochrome camera's picture of a real cell
    cv2.imwrite(str(d / "grey.png"), grey)
    return d


def test_folder_with_bad_files_gives_error_rows_and_exit_1(exported, mixed_inputs, tmp_path):
    res = infer(mixed_inputs, "--model", exported / "tiny_int8.tflite", "--output", tmp_path / "r.csv")
    assert res.returncode == 1, res.stderr
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 7
    bad = {os.path.basename(r["path"]): r for r in rows if r["status"] == "error"}
    assert set(bad) == {"empty.png", "corrupt.webp", "text.jpg", "grey.png"}
    assert bad["empty.png"]["error"] == "empty file" and bad["empty.png"]["prob_parasitized"] == ""
    assert bad["grey.png"]["error"].startswith("no stain colour")
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["label"] in ("Parasitized", "Uninfected") and 0 <= float(r["prob_parasitized"]) <= 1 for r in ok)
    assert "4 errors" in res.stderr


def test_every_real_cell_crop_has_stain_colour_and_its_grey_copy_has_none(cell_files):
    from edge.infer import not_a_cell
    rgbs = [load_image(p) for p in cell_files]
    assert all(not_a_cell(rgb, 128) == "" for rgb in rgbs)
    greys = [np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2) for rgb in rgbs]
    assert all(not_a_cell(g, 128).startswith("no stain colour") for g in greys)


def test_int8_model_input_is_each_pixel_minus_128():
    from edge.preprocess import to_model_input
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x[0, 0, 0] = (0, 128, 255)
    q = to_model_input(x, "int8", 1.0, -128)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert np.array_equal(q.astype(int), x.astype(int) - 128) and list(q[0, 0, 0]) == [-128, 0, 127]
    # any other quantization goes the general way: round(pixel / scale + zero point), clipped
    assert list(to_model_input(x[:1, :1, :1], "int8", 2.0, -100)[0, 0, 0]) == [-100, -36, 28]  # 127.5 − 100 rounds to even


def test_single_file_glob_and_missing_file(exported, cell_files, tmp_path):
    m = exported / "tiny_int8.onnx"
    one = infer(cell_files[0], "--model", m, "--format", "jsonl")
    assert one.returncode == 0
    assert json.loads(one.stdout.splitlines()[0])["path"] == str(cell_files[0])
    glob = infer(str(cell_files[0].parent / "*.webp"), "--model", m, "--format", "csv")
    assert glob.returncode == 0 and len(glob.stdout.strip().splitlines()) == 1 + len(list(cell_files[0].parent.glob("*.webp")))
    missing = infer(tmp_path / "nope.png", "--model", m, "--format", "json")
    assert missing.returncode == 1
    assert json.loads(missing.stdout)[0]["error"].startswith("no such file")


def test_json_output_file_and_table(exported, cell_files, tmp_path):
    res = infer(*cell_files[:2], "--model", exported / "tiny_fp32.tflite", "--output", tmp_path / "r.json")
    assert res.returncode == 0 and "p(parasitized)" in res.stdout
    assert [r["status"] for r in json.loads((tmp_path / "r.json").read_text())] == ["ok", "ok"]


def test_tflite_and_onnx_give_the_same_labels(exported, cell_files):
    x = np.stack([resize_rgb(load_image(p), 128) for p in cell_files])
    for variant in ("fp32", "int8"):
        a = load_classifier(exported / f"tiny_{variant}.tflite").predict(x)
        b = load_classifier(exported / f"tiny_{variant}.onnx").predict(x)
        assert np.mean((a >= 0.5) == (b >= 0.5)) >= (1.0 if variant == "fp32" else 0.95)
        assert np.max(np.abs(a - b)) < (1e-4 if variant == "fp32" else 0.05)


@pytest.mark.parametrize("threshold", ["0.001", "0.999"])
def test_gradcam_overlay_explains_the_label_it_prints_at_any_threshold(exported, cell_files, tmp_path, threshold):
    """At 0.001 every cell is called Parasitized, at 0.999 Uninfected: the saved map must be that class's."""
    from edge.gradcam import overlay
    model = exported / "tiny_fp32.onnx"
    res = infer(*cell_files[:2], "--model", model, "--gradcam", "--out", tmp_path, "--batch", "1",
                "--threshold", threshold)
    assert res.returncode == 0, res.stderr
    label, cls = ("Parasitized", 1) if threshold == "0.001" else ("Uninfected", 0)
    assert [r.split()[0] for r in res.stdout.splitlines()[1:]] == [label, label]
    m = load_classifier(model)
    for p in cell_files[:2]:
        saved = cv2.imread(str(tmp_path / f"{p.stem}_webp_gradcam.png"))
        rgb = load_image(p)
        x = resize_rgb(rgb, 128)[None]
        prob = float(m.predict(x)[0])
        ex = load_explainer_for(m)
        shown, other = ex.explain(x, cls)[1], ex.explain(x, 1 - cls)[1]
        want = overlay(rgb, shown[0], label, prob, heat_class=label)
        wrong = overlay(rgb, other[0], label, prob, heat_class=label)
        assert saved.shape == want.shape
        assert np.mean(np.abs(saved.astype(int) - want.astype(int))) < 1.0
        assert np.mean(np.abs(saved.astype(int) - wrong.astype(int))) > 3.0


def test_the_two_class_maps_never_light_up_the_same_spot(exported, cell_files):
    """Grad-CAM of Uninfected is the ReLU of minus Parasitized's weighted sum: where one is hot the other is 0."""
    m = load_classifier(exported / "tiny_fp32.tflite")
    x = np.stack([resize_rgb(load_image(p), 128) for p in cell_files])
    ex = load_explainer_for(m)
    _, h1 = ex.explain(x, 1)
    _, h0 = ex.explain(x, 0)
    assert np.all(h1 * h0 == 0)
    assert np.allclose(h1.max(axis=(1, 2)), 1, atol=1e-5) | np.allclose(h0.max(axis=(1, 2)), 1, atol=1e-5)


def test_killed_run_keeps_every_finished_row(exported, cell_files, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(1500):
        os.symlink(cell_files[i % len(cell_files)], d / f"{i:05d}.webp")
    out = tmp_path / "r.csv"
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", str(d), "--model", str(exported / "tiny_fp32.tflite"),
                             "--batch", "1", "-q", "--output", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 21):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = out.read_text().splitlines()
    assert 20 <= len(lines) - 1 < 1500
    rows = list(csv.DictReader(lines))
    assert all(r["status"] == "ok" and r["label"] for r in rows)


def _video(path, cell_files, n=10, fps=5):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (160, 160))
    assert w.isOpened()
    for i in range(n):
        rgb = resize_rgb(load_image(cell_files[i % len(cell_files)]), 160)
        w.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    w.release()
    return path


def test_video_file_goes_through_the_camera_path(exported, cell_files, tmp_path):
    video = _video(tmp_path / "cells.avi", cell_files)
    res = infer("--video", video, "--model", exported / "tiny_int8.tflite", "--gradcam", "--interval", "0",
                "--out", tmp_path / "live")
    assert res.returncode == 0, res.stderr
    [sdir] = (tmp_path / "live").glob("session-*")
    rows = list(csv.DictReader(open(sdir / "live_results.csv")))
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    assert len(list((sdir / "frames").glob("frame_*.png"))) == 10
    every_second = infer("--video", video, "--model", exported / "tiny_int8.tflite", "--interval", "1",
                         "--out", tmp_path / "live")
    assert every_second.returncode == 0
    sessions = sorted((tmp_path / "live").glob("session-*"))
    assert len(sessions) == 2  # a second run never overwrites the first
    assert len(list(csv.DictReader(open(sdir / "live_results.csv")))) == 10
    [new] = [s for s in sessions if s != sdir]
    assert len(list(csv.DictReader(open(new / "live_results.csv")))) == 2  # t = 0 s and 1 s


def test_a_video_that_yields_no_frames_is_an_error(exported, tmp_path):
    empty = tmp_path / "empty.avi"
    w = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 5, (160, 160))
    w.release()
    res = infer("--video", empty, "--model", exported / "tiny_int8.tflite", "--out", tmp_path / "live",
                "--retries", "0")
    assert res.returncode == 1 and "Traceback" not in res.stderr


def test_missing_camera_is_a_clear_error_after_bounded_retries(exported, tmp_path):
    res = infer("--camera", "57", "--model", exported / "tiny_int8.tflite", "--retries", "2", "--retry-wait", "0.1",
                "--out", tmp_path)
    assert res.returncode == 1
    assert "camera 57 could not be opened" in res.stderr and "retry 2/2" in res.stderr
    assert "Traceback" not in res.stderr


def test_usage_and_model_errors_are_one_line(exported, cell_files, tmp_path):
    none = infer()
    assert none.returncode == 2 and "give image PATHS" in none.stderr
    bad_model = infer(cell_files[0], "--model", tmp_path / "missing.tflite")
    assert bad_model.returncode == 1 and "no such model file" in bad_model.stderr
    assert "Traceback" not in bad_model.stderr
    wrong = tmp_path / "model.onnx"
    wrong.write_text("nonsense")
    (tmp_path / "model.onnx.card.json").write_text((exported / "tiny_int8.onnx.card.json").read_text())
    res = infer(cell_files[0], "--model", wrong)
    assert res.returncode == 1 and "does not match its model card" in res.stderr and "Traceback" not in res.stderr


BLOCK_TF = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx', 'tf_keras'):
            raise ImportError(name + ' is not installed on this device')
sys.meta_path.insert(0, Block())
"""


def test_edge_modules_never_import_tensorflow():
    code = BLOCK_TF + """
import pkgutil, importlib, edge
for m in pkgutil.iter_modules(edge.__path__):
    importlib.import_module('edge.' + m.name)
bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]
assert not bad, bad
print('ok', len(list(pkgutil.iter_modules(edge.__path__))))
"""
    res = run(["-c", code])
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
@pytest.mark.parametrize("gradcam", [False, True])
def test_edge_infer_works_where_tensorflow_cannot_be_imported(exported, cell_files, tmp_path, fmt, gradcam):
    args = [str(cell_files[0]), "--model", str(exported / f"tiny_int8.{fmt}"), "--format", "jsonl", "--out", str(tmp_path)]
    args += ["--gradcam"] if gradcam else []
    code = BLOCK_TF + f"sys.argv = ['edge-infer', *{args!r}]\nfrom edge.cli import main\nmain()\n"
    res = run(["-c", code])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[0])["status"] == "ok"
    assert bool(list(tmp_path.glob("*_gradcam.png"))) == gradcam


def test_camera_unplugged_mid_run_keeps_what_was_saved(exported, cell_files, tmp_path, monkeypatch):
    """A 'camera' whose device disappears after it was opened (the file is deleted while open):
    frames already read are classified and saved, reconnects are bounded, the exit code says so."""
    import edge.camera as camera
    from edge.live import run_live
    video = _video(tmp_path / "cam.avi", cell_files, n=6)
    real_open = camera.open_capture

    def open_then_unplug(src):
        cap = real_open(src)
        if video.exists():
            video.unlink()
        return cap

    monkeypatch.setattr(camera, "open_capture", open_then_unplug)
    from edge.classifier import Classifier
    clf = Classifier.load(exported / "tiny_int8.tflite")
    opts = RunOptions(out=tmp_path / "live", threshold=0.5, interval=0, retries=2, retry_wait=0.01)
    code = run_live(camera.Source(str(video), is_file=False), clf, opts)
    assert code == 1
    [sdir] = (tmp_path / "live").glob("session-*")
    rows = list(csv.DictReader(open(sdir / "live_results.csv")))
    assert len(rows) == 6 and len(list((sdir / "frames").glob("*.png"))) == 6


def test_a_device_without_onnxruntime_runs_tflite_and_names_the_extra_for_onnx(tmp_path):
    """onnxruntime is the `onnx` extra: the base install (what a Pi needs) runs the shipped TFLite models."""
    block = BLOCK_TF.replace("'tf_keras')", "'tf_keras', 'onnxruntime')")
    cell = str(next((ROOT / "examples" / "cells").rglob("*.png")))
    for model, want_rc, want in ((None, 0, '"status": "ok"'),
                                 (str(ROOT / "models" / "cnn" / "cnn_int8.onnx"), 1, 'pip install "malaria-edge[onnx]"')):
        args = [cell, "--format", "jsonl"] + (["--model", model] if model else [])
        res = run(["-c", block + f"sys.argv = ['edge-infer', *{args!r}]\nfrom edge.cli import main\nmain()\n"])
        assert res.returncode == want_rc and want in res.stdout + res.stderr, res.stderr[-500:]
