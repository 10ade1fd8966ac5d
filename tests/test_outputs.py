"""Results are never silently lost or overwritten, and user mistakes get one clear line."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from edge.cli import overlay_names
from edge.results import OutputError, open_results
from tests.conftest import ROOT
from tests.test_edge import infer

CELLS = sorted((ROOT / "examples" / "cells").rglob("*.png"))


def test_an_existing_output_file_is_refused_without_overwrite_or_resume(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("precious\n")
    res = infer(*CELLS[:2], "--output", out)
    assert res.returncode == 1 and "already exists: pass --overwrite" in res.stderr
    assert out.read_text() == "precious\n"
    again = infer(*CELLS[:2], "--output", out, "--overwrite")
    assert again.returncode == 0 and len(list(csv.DictReader(open(out)))) == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_resume_skips_inputs_already_in_the_file_and_appends_the_rest(tmp_path, suffix):
    out = tmp_path / f"r{suffix}"
    first = infer(*CELLS[:3], "--output", out, "-q")
    assert first.returncode == 0
    if suffix != ".json":  # a power cut in the middle of the next row
        out.write_text(out.read_text() + ('{"path": "half' if suffix == ".jsonl" else "examples/half"))
    res = infer(*CELLS, "--output", out, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    assert f"{len(CELLS) - 3} to go" in res.stderr
    text = out.read_text()
    rows = (json.loads(text) if suffix == ".json" else [json.loads(x) for x in text.splitlines()]
            if suffix == ".jsonl" else list(csv.DictReader(text.splitlines())))
    assert [r["path"] for r in rows] == [str(c) for c in CELLS]


def test_resume_refuses_a_file_of_another_kind(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(OutputError, match="columns"):
        open_results(out, mode="resume")


def test_out_that_looks_like_a_results_file_is_caught(tmp_path):
    res = infer(*CELLS[:1], "--out", tmp_path / "res.csv", "--gradcam")
    assert res.returncode == 2 and "write rows with --output" in res.stderr
    assert not (tmp_path / "res.csv").exists()


def test_overlay_names_never_collide():
    files = [ROOT / "a" / "x" / "cell.png", ROOT / "a" / "x" / "cell.jpg", ROOT / "b" / "x" / "cell.png",
             ROOT / "a" / "x_cell.png"]
    names = overlay_names(files)
    assert len(set(names.values())) == len(files)


def test_overlays_of_same_named_images_in_two_folders_are_both_kept(tmp_path):
    for d in ("day1/slide", "day2/slide"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "cell.png").write_bytes(CELLS[0].read_bytes())
    Image.open(CELLS[4]).convert("RGB").save(tmp_path / "day1" / "slide" / "cell.jpg")
    res = infer(tmp_path / "day1", tmp_path / "day2", "--gradcam", "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "o").glob("*_gradcam.png"))) == 3


def test_failed_inputs_are_named_even_when_quiet(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG nonsense")
    res = infer(bad, CELLS[0], "-q")
    assert res.returncode == 1 and f"error: {bad}: " in res.stderr


def test_an_image_far_from_square_is_not_called_a_cell(tmp_path):
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((60, 400, 3), 200, np.uint8)).save(strip)
    res = infer(strip, "--format", "jsonl")
    row = json.loads(res.stdout.splitlines()[0])
    assert res.returncode == 1 and row["status"] == "error" and "far from square" in row["error"]
    assert "--field" in row["error"]


def test_threshold_with_field_is_refused(tmp_path):
    res = infer("--field", ROOT / "examples" / "field", "--threshold", "0.5", "--out", tmp_path)
    assert res.returncode == 2 and "--operating-point" in res.stderr


def test_version():
    res = infer("--version")
    assert res.returncode == 0 and res.stdout.split()[-1][0].isdigit()


def test_thread_count_follows_the_cpus_this_process_may_use():
    from tests.conftest import run
    res = run(["-c", "import os; os.sched_setaffinity(0, {0}); from edge.runtime import cpu_count; print(cpu_count())"])
    assert res.stdout.strip() == "1", res.stderr


@pytest.mark.parametrize("args,message", [
    (["evaluate", "{lone}", "--data", "{prepared}"], "no model card beside it"),
    (["evaluate", "{tiny}", "--data", "{prepared}", "--split", "tset"], "'tset' is not one of"),
    (["export", "{tiny}", "--data", "{prepared}", "--out", "{out}", "--parity-split", "tset"], "'tset' is not one of"),
    (["evaluate", "{tiny}", "--folder", "{empty}"], "no images found"),
    (["evaluate", "{tiny}", "--data", "{empty}"], "no manifest.csv"),
])
def test_malaria_edge_user_mistakes_are_one_line(args, message, tiny_model, exported, prepared, tmp_path):
    from tests.conftest import run
    lone = tmp_path / "lone.tflite"
    lone.write_bytes((exported / "tiny_int8.tflite").read_bytes())
    (tmp_path / "empty").mkdir()
    names = {"lone": lone, "tiny": tiny_model, "prepared": prepared, "out": tmp_path / "exp", "empty": tmp_path / "empty"}
    res = run(["-m", "malaria_edge", *[a.format(**names) for a in args]])
    assert res.returncode in (1, 2) and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "exp").exists()


def test_a_threshold_outside_0_1_is_a_usage_error():
    res = infer(CELLS[0], "--threshold", "1.5")
    assert res.returncode == 2 and "--threshold must be between 0 and 1" in res.stderr
