"""Operating points from the card, and the screened counting point: a fast screen clears most cells,
the card's model decides the rest, and the counts the correction reads belong to that whole rule."""
import dataclasses
import json
import shutil

import numpy as np
import pytest

from edge.classifier import Classifier
from edge.operating import FAST, operating_point, predict
from edge.runtime import ModelError, load_classifier
from tests.conftest import ROOT, run
from train.evaluate import LabelledSet, screened_point

MNV2 = ROOT / "models" / "mobilenetv2" / "mobilenetv2_int8.tflite"


@pytest.fixture(scope="module")
def crops(cell_files):
    return Classifier.load(MNV2).batch(cell_files)


def test_the_deciding_model_sees_only_the_cells_the_screen_forwards(crops):
    model = load_classifier(MNV2)
    point = operating_point(model, FAST)
    seen = []
    counted = dataclasses.replace(model, run=lambda x: (seen.append(len(x)), model.run(x))[1])
    p = predict(counted, crops, point.screen)
    s = point.screen.model.predict(crops)
    fwd = s >= point.screen.forward_at
    assert 0 < fwd.sum() < len(crops)  # the fixture holds cells of both kinds
    assert seen == [int(fwd.sum())]
    assert np.array_equal(p[~fwd], s[~fwd])  # cleared cells keep the screen's P, below the threshold
    assert np.allclose(p[fwd], model.predict(crops[fwd]))
    assert (p[~fwd] < point.threshold).all()


def test_field_mode_defaults_to_the_screened_counting_point():
    clf = Classifier.load(MNV2, mode="field")
    assert clf.operating_point == FAST and clf.screen is not None
    assert clf.counts == clf.model.card.operating_points[FAST]["counts"]
    assert Classifier.load(MNV2).screen is None  # cell mode keeps the card's threshold, no screen


def _copy(tmp_path, edit):
    """The shipped field model with its screen, in a tmp models tree, its card edited."""
    for sub in ("mobilenetv2", "cnn_s2"):
        (tmp_path / sub).mkdir(parents=True)
    dst = tmp_path / "mobilenetv2" / MNV2.name
    shutil.copy(MNV2, dst)
    card = json.loads(MNV2.with_name(MNV2.name + ".card.json").read_text())
    edit(card)
    dst.with_name(dst.name + ".card.json").write_text(json.dumps(card))
    s2 = ROOT / "models" / "cnn_s2" / "cnn_s2_int8.tflite"
    for f in (s2, s2.with_name(s2.name + ".card.json")):
        shutil.copy(f, tmp_path / "cnn_s2" / f.name)
    return dst


def test_a_screen_other_than_the_one_measured_is_refused(tmp_path):
    path = _copy(tmp_path, lambda c: c["operating_points"][FAST]["screen"].update(sha256="0" * 64))
    with pytest.raises(ModelError, match="sha256 differs"):
        Classifier.load(path, mode="field")


def test_a_missing_screen_is_a_clear_error(tmp_path):
    path = _copy(tmp_path, lambda c: c["operating_points"][FAST]["screen"].update(model="../gone/x.tflite"))
    with pytest.raises(ModelError, match="screen model .* is missing"):
        Classifier.load(path, mode="field")


def test_field_mode_reads_the_validation_patients_counts_and_checks_they_add_up(tmp_path):
    clf = Classifier.load(MNV2, mode="field")
    assert len(clf.point.by_patient) >= 10
    assert {k: sum(b[k] for b in clf.point.by_patient) for k in clf.counts} == clf.counts
    path = _copy(tmp_path, lambda c: c["operating_points"][FAST]["counts_by_patient"][0].update(tp=10 ** 6))
    with pytest.raises(ModelError, match="do not add up"):
        Classifier.load(path, mode="field")


def test_field_mode_counts_at_counting_where_the_card_has_no_screened_point(tmp_path):
    path = _copy(tmp_path, lambda c: c["operating_points"].pop(FAST))
    clf = Classifier.load(path, mode="field")
    assert clf.operating_point == "counting" and clf.screen is None


def test_screened_point_forwards_the_kept_share_and_counts_the_whole_rule():
    # the decider calls cells 0-3 and 8 positive at 0.9; the screen gives them 0.2, 0.6, 0.7, 0.8 and 0.1
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    p = np.array([.95, .99, .97, .93, .5, .1, .2, .3, .92, .4])
    s = np.array([.2, .6, .7, .8, .9, .1, .1, .65, .1, .9])
    ls = LabelledSet(np.zeros((10, 1, 1, 3), np.uint8), y, ["g"] * 10, [""] * 10, "val")
    counting = {"threshold": 0.9, "rule": "specificity"}
    op = screened_point({"val": (ls, p)}, {"val": (ls, s)}, counting, "../s/s.tflite", "abc", keep=0.6)
    # forwarding 3 of those 5 leaves out the two lowest (0.1, 0.2): forward_at is the next, 0.6
    assert op["screen"]["forward_at"] == 0.6
    # cell 0 is cleared (a lost true positive); cell 8 (P .92, a false positive) is cleared by its screen P .1
    assert op["counts"] == {"tp": 2, "fn": 2, "tn": 5, "fp": 1}
    assert op["screen"]["forwarded_val"] == {"uninfected": 3 / 6, "parasitized": 3 / 4}
    assert op["threshold"] == 0.9 and op["screen"]["sha256"] == "abc"


def test_evaluate_screen_writes_a_counting_fast_point_that_field_mode_uses(exported, prepared, tmp_path):
    for f in exported.iterdir():
        shutil.copy(f, tmp_path / f.name)
    model, screen = tmp_path / "tiny_int8.tflite", tmp_path / "tiny_fp32.tflite"
    res = run(["-m", "malaria_edge", "evaluate", model, "--data", prepared, "--operating-points", "--screen", screen,
               "--update-card"])
    assert res.returncode == 0, res.stderr
    op = json.loads((tmp_path / "tiny_int8.tflite.card.json").read_text())["operating_points"][FAST]
    assert op["screen"]["model"] == "tiny_fp32.tflite"
    assert op["screen"]["sha256"] == json.loads((tmp_path / "tiny_fp32.tflite.card.json").read_text())["artifact_sha256"]
    from train.data import load_prepared
    assert sum(op["counts"].values()) == len(load_prepared(prepared).indices("val"))
    assert Classifier.load(model, mode="field").operating_point == FAST


def test_evaluate_screen_without_operating_points_is_a_usage_error():
    res = run(["-m", "malaria_edge", "evaluate", MNV2, "--screen", MNV2])
    assert res.returncode == 2 and "--operating-points" in res.stderr


def test_screen_never_clears_a_cell_above_the_threshold():
    y = np.array([1, 1, 0, 0])
    p = np.array([.95, .97, .1, .2])
    ls = LabelledSet(np.zeros((4, 1, 1, 3), np.uint8), y, ["g"] * 4, [""] * 4, "val")
    op = screened_point({"val": (ls, p)}, {"val": (ls, np.array([.98, .99, .95, .1]))},
                        {"threshold": 0.9, "rule": "specificity"}, "s", "abc", keep=1.0)
    assert op["screen"]["forward_at"] == 0.9  # 0.98 would leave cell 2 (screen P .95) positive on its own


def test_field_speed_times_each_point_on_the_same_fields(prepared):
    from benchmarks.fields import speed
    from edge.field import FieldOptions
    from tests.conftest import CELLS
    m = load_classifier(MNV2)
    points = {name: FieldOptions.at(operating_point(m, name)) for name in (FAST, "counting")}
    field = ROOT / "examples" / "field" / "IMG_20150614_124212.jpg"
    r = speed(m, points, field, CELLS, prepared, repeats=1)
    assert set(r) == {f"{size} {name}" for size in ("1280x960", "5312x2988") for name in points}
    assert r[f"1280x960 {FAST}"]["cells"] == r["1280x960 counting"]["cells"] > 100
    assert all(v["total_ms"] >= v["detect_ms"] + v["classify_ms"] for v in r.values())


def test_shifted_crops_change_the_cell_and_keep_the_background_black(crops):
    from benchmarks.fields import shifted
    assert np.array_equal(shifted(crops), crops)
    out = shifted(crops, hue=8, sat=0.6, blur=1.5)
    bg = crops.max(axis=3) == 0
    assert (out[bg] == 0).all() and not np.array_equal(out[~bg], crops[~bg])
    dim = shifted(crops, exposure=0.8)
    assert np.array_equal(dim, (crops * 0.8).astype(np.uint8))  # every channel of every pixel, background still 0


def test_the_screen_under_shift_only_ever_removes_positives(prepared):
    from benchmarks.fields import SHIFTS, screen_under_shift
    m = load_classifier(MNV2)
    rows = screen_under_shift(m, operating_point(m, FAST), prepared, log=lambda *_: None)
    assert [r["shift"] for r in rows] == list(SHIFTS)
    for r in rows:  # a cleared cell is Uninfected, a forwarded one keeps the model's own call
        assert r["sensitivity"] <= r["sensitivity_alone"] and r["specificity"] >= r["specificity_alone"]


def test_a_screen_for_a_model_that_calls_nothing_positive_is_a_clear_error():
    from train.data import DataError
    ls = LabelledSet(np.zeros((2, 1, 1, 3), np.uint8), np.array([1, 0]), ["g"] * 2, [""] * 2, "val")
    with pytest.raises(DataError, match="no validation cell positive"):
        screened_point({"val": (ls, np.array([.5, .1]))}, {"val": (ls, np.array([.5, .1]))},
                       {"threshold": 0.9, "rule": "specificity"}, "s", "abc")


def test_field_mode_reads_field_modes_spread_and_refuses_one_that_is_not_a_variance(tmp_path):
    clf = Classifier.load(MNV2, mode="field")
    fs = clf.model.card.operating_points[FAST]["field_spread"]
    assert clf.point.spread == (fs["sensitivity_var"], fs["specificity_var"]) and fs["sensitivity_var"] > 0
    path = _copy(tmp_path, lambda c: c["operating_points"][FAST]["field_spread"].update(sensitivity_var=0.5))
    with pytest.raises(ModelError, match="field_spread"):
        Classifier.load(path, mode="field")


def test_field_mode_scales_sensitivity_as_the_card_measured_and_refuses_counts_that_are_not(tmp_path):
    rc = Classifier.load(MNV2, mode="field").model.card.operating_points[FAST]["field_spread"]["recut"]
    point = Classifier.load(MNV2, mode="field").point
    assert point.recut == (rc["field_called"], rc["crops_called"], rc["infected"]) and 0 < rc["field_called"] < rc["infected"]
    from edge.field import FieldOptions
    assert FieldOptions.at(point).recut == point.recut
    bad = _copy(tmp_path, lambda c: c["operating_points"][FAST]["field_spread"]["recut"].update(field_called=10 ** 6))
    with pytest.raises(ModelError, match="recut"):
        Classifier.load(bad, mode="field")


def test_field_mode_cuts_cells_as_the_card_says_its_model_was_trained_and_refuses_a_nonsense_value(tmp_path):
    from edge.field import FieldOptions
    from edge.detect import DetectParams
    assert FieldOptions.at(Classifier.load(MNV2, mode="field").point).detect.complete_overlap == 0
    path = _copy(tmp_path, lambda c: c.update(field_crops={"complete_overlap": 0.067}))
    point = Classifier.load(path, mode="field").point
    assert point.complete_overlap == 0.067
    assert FieldOptions.at(point).detect.complete_overlap == 0.067
    given = FieldOptions.at(point, detect=DetectParams(cell_diameter=60)).detect  # a user's --cell-diameter keeps it
    assert (given.cell_diameter, given.complete_overlap) == (60, 0.067)
    for i, nonsense in enumerate((3, "wide", ["x"])):
        bad = _copy(tmp_path / f"bad{i}", lambda c: c.update(field_crops={"complete_overlap": nonsense}))
        with pytest.raises(ModelError, match="complete_overlap"):
            Classifier.load(bad, mode="field")


def test_evaluate_field_spread_measures_it_on_the_validation_patients_fields_and_writes_it(tmp_path, prepared):
    from tests.conftest import CELLS
    path = _copy(tmp_path, lambda c: [op.pop("field_spread", None) for op in c["operating_points"].values()])
    res = run(["-m", "malaria_edge", "evaluate", str(path), "--field-spread", "--data", str(prepared),
               "--crops", str(CELLS), "--update-card"])
    assert res.returncode == 0, res.stderr
    ops = json.loads(path.with_name(path.name + ".card.json").read_text())["operating_points"]
    for name in ("counting", FAST):
        fs = ops[name]["field_spread"]
        assert fs["patients"] >= 2 and fs["infected"] > 0 and 0 <= fs["sensitivity_var"] < 0.25
        assert fs["recut"]["infected"] == fs["infected"] and fs["recut"]["crops_called"] <= fs["infected"]
    assert "field mode's between-patient SD" in res.stdout and "sensitivity scaled by" in res.stdout


def test_evaluate_field_spread_takes_the_recut_share_from_a_crossfit_run_and_refuses_another_file(tmp_path, prepared):
    from tests.conftest import CELLS
    path = _copy(tmp_path, lambda c: [op.pop("field_spread", None) for op in c["operating_points"].values()])
    cf = tmp_path / "crossfit.json"
    cf.write_text(json.dumps({"folds": [{}, {}, {}, {}],
                              "recut_pooled": {"field_called": 2672, "crops_called": 3203, "infected": 4120}}))
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    args = ["-m", "malaria_edge", "evaluate", str(path), "--field-spread", "--data", str(prepared), "--crops", str(CELLS)]
    bad = run(args + ["--recut-from", str(junk)])
    assert bad.returncode == 2 and "not a crossfit.json" in bad.stderr and "Traceback" not in bad.stderr
    res = run(args + ["--recut-from", str(cf), "--update-card"])
    assert res.returncode == 0, res.stderr
    for op in json.loads(path.with_name(path.name + ".card.json").read_text())["operating_points"].values():
        if "field_spread" in op:
            rc = op["field_spread"]["recut"]
            assert (rc["field_called"], rc["crops_called"], rc["infected"]) == (2672, 3203, 4120)
            assert "4 patient folds" in rc["source"]
    assert "sensitivity scaled by 0.834" in res.stdout


def test_evaluate_field_spread_needs_an_exported_artifact(tmp_path):
    res = run(["-m", "malaria_edge", "evaluate", str(ROOT / "models" / "mobilenetv2" / "mobilenetv2.keras"),
               "--field-spread"])
    assert res.returncode == 2 and "exported .tflite/.onnx" in res.stderr
