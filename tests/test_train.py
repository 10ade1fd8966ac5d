"""Recipes build flat with an addressable Grad-CAM layer; a tiny real run yields a model and card that load."""
import csv
import json

import cv2
import keras
import numpy as np
import pytest

from edge.card import read_card
from train.models import WeightsError, build_cnn, build_mobilenetv2, gradcam_layer_for
from train.train import CellBatches


@pytest.mark.parametrize("recipe", ["cnn", "mobilenetv2-frozen"])
def test_recipe_is_flat_with_named_gradcam_layer(recipe):
    m = build_cnn(96) if recipe == "cnn" else build_mobilenetv2(96, alpha=0.35)
    layer = m.get_layer(gradcam_layer_for(recipe))
    assert len(layer.output.shape) == 4
    assert not any(isinstance(l, keras.Model) for l in m.layers)  # no nested base model
    # the conv output and the logit are reachable from the model's own input (no "Graph disconnected")
    keras.Model(m.inputs, [layer.output, m.get_layer("logit").output])
    assert m.get_layer("prob").output.shape == (None, 1)


def test_cnn_stride_two_stem_sees_the_full_crop_and_runs_later_layers_at_a_quarter_of_the_pixels():
    plain, s2 = build_cnn(96), build_cnn(96, stem_stride=2)
    assert plain.input_shape == s2.input_shape == (None, 96, 96, 3)
    for name in ("conv2", "last_conv"):
        h1, w1 = plain.get_layer(name).output.shape[1:3]
        h2, w2 = s2.get_layer(name).output.shape[1:3]
        assert (h2, w2) == (h1 // 2, w1 // 2)
    assert s2.count_params() < plain.count_params()  # the flattened head shrinks too


def test_cnn_batchnorm_keeps_the_gradcam_layer_and_adds_one_norm_per_convolution():
    m = build_cnn(64, batchnorm=True)
    bns = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
    convs = [l for l in m.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(bns) == len(convs) == 4 and all(b.momentum == 0.9 for b in bns)
    assert m.get_layer("last_conv").output.shape[1:] == (8, 8, 128)


def test_cnn_width_multiplies_every_blocks_filters():
    from train.train import TrainConfig, build
    half, double = build(TrainConfig(width=0.5), 64), build(TrainConfig(width=2.0), 64)
    filters = [[l.filters for l in m.layers if isinstance(l, keras.layers.Conv2D)] for m in (half, double)]
    assert filters == [[8, 16, 32, 64], [32, 64, 128, 256]]


def test_imagenet_weights_offline_is_one_clear_line(monkeypatch):
    import keras.src.applications.mobilenet_v2 as mv

    def offline(*a, **k):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(mv.file_utils, "get_file", offline)
    with pytest.raises(WeightsError, match="--weights PATH"):
        build_mobilenetv2(96, weights="imagenet", alpha=0.35)


def test_weights_path_loads_a_local_file(tmp_path):
    base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False, weights=None, alpha=0.35)
    k = base.get_layer("Conv1").kernel
    k.assign(np.full(k.shape, 0.123, "float32"))
    path = tmp_path / "base.weights.h5"
    base.save_weights(path)
    m = build_mobilenetv2(96, weights=str(path), alpha=0.35)
    assert np.allclose(m.get_layer("Conv1").kernel.numpy(), 0.123)
    with pytest.raises(WeightsError, match="not found"):
        build_mobilenetv2(96, weights=str(tmp_path / "missing.weights.h5"), alpha=0.35)


def test_tiny_training_run_yields_model_and_card(tiny_model):
    card = read_card(tiny_model)
    assert card.format == "keras" and card.recipe == "cnn" and card.gradcam_layer == "last_conv"
    assert card.split_hash and card.artifact_sha256 and 0 < card.threshold < 1
    t = card.metrics["test"]
    assert t["n"] > 0 and "ci95" in t and len(t["confusion_matrix"]) == 2
    assert card.training["epochs"] == 1 and card.training["seconds"] > 0
    assert card.training["augmentation"].startswith("90° rotations and flips") and "field mode" not in \
        card.training["augmentation"]
    m = keras.models.load_model(tiny_model, compile=False)
    p = m(np.zeros((2, 128, 128, 3), "float32")).numpy()
    assert p.shape == (2, 1) and np.all((p >= 0) & (p <= 1))
    run_dir = tiny_model.parent
    for f in ("history.csv", "training_curves.png", "confusion_matrix.png", "roc.png", "test_metrics.json"):
        assert (run_dir / f).stat().st_size > 0, f
    assert json.loads((run_dir / "test_metrics.json").read_text())["n"] == t["n"]


def test_training_batches_match_edge_preprocessing(prepared, cells):
    """The tensor training sees for a cell equals what the edge runtime feeds the model."""
    from edge.images import load_image
    from edge.preprocess import resize_rgb, to_model_input
    from train.data import load_prepared
    d = load_prepared(prepared)
    i = int(d.indices("train")[0])
    x, _ = CellBatches(d.images, d.labels, [i], 1, augment=False)[0]
    edge = to_model_input(resize_rgb(load_image(cells / d.relpaths[i]), 128)[None], "float32")
    assert x.dtype == edge.dtype and np.array_equal(x, edge)


def test_augmentation_keeps_shape_and_range():
    from train.train import augment_batch
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y = augment_batch(x, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == np.float32 and y.min() >= 0 and y.max() <= 255
    assert not np.array_equal(x, y)


def test_augmentation_is_a_rotation_or_flip_with_mild_colour_jitter():
    """Each augmented cell is one of the 8 rotations/flips of its source, within the colour jitter."""
    from train.train import augment_batch
    x = np.random.default_rng(0).integers(0, 256, (16, 24, 24, 3), dtype=np.uint8)
    y = augment_batch(x, np.random.default_rng(2))
    for xi, yi in zip(x.astype(np.float32), y):
        views = [np.rot90(xi, k)[:, ::-1] if f else np.rot90(xi, k) for k in range(4) for f in (False, True)]
        errs = sorted(np.abs(v - yi).mean() for v in views)
        assert errs[0] < 25 and errs[1] > 60  # one view matches (up to the jitter); unrelated pixels differ by ~85


def test_time_budget_stops_training_after_an_epoch_and_says_so(prepared, tmp_path):
    from train.data import load_prepared
    from train.train import TrainConfig, train
    _, info = train(load_prepared(prepared), TrainConfig(recipe="cnn", epochs=5, batch=16, verbose=0, workers=2,
                                                          max_minutes=1e-4), tmp_path / "run")
    assert info["epochs"] == 1 and info["stages"][0]["stopped_by"] == "time budget"
    assert info["stages"][0]["backend"] == keras.backend.backend() and (tmp_path / "run" / "model.keras").exists()


def _fit_with_step_delays(first: float, rest: float, budget: float, epochs: int = 8):
    """A tiny fit whose first training step takes `first` seconds (as compilation does) and every
    later step `rest`, under a Deadline `budget` seconds away; returns (epochs run, stopped, seconds)."""
    import time
    from train.train import Deadline

    class Delays(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(first if not hasattr(self, "seen") else rest)
            self.seen = True

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((16, 2), "float32"), np.zeros((16, 1), "float32")
    t0 = time.time()
    deadline = Deadline(t0 + budget)
    h = model.fit(x, y, batch_size=2, epochs=epochs, validation_data=(x, y), callbacks=[Delays(), deadline], verbose=0)
    return len(h.history["loss"]), deadline.stopped, time.time() - t0


def test_time_budget_does_not_count_a_slow_first_step_as_the_pace_of_every_epoch():
    # 8 steps an epoch: 4.0 s + 7 x 0.02 s, then about 0.2 s an epoch; budget 6 s. Projecting the
    # whole first epoch (over 4 s) would stop after it; the steady pace leaves room for more. (With 2 s and
    # a 3 s budget, Keras' own first-call tracing on a loaded 2-core CI machine left too little room.)
    epochs, stopped, _ = _fit_with_step_delays(first=4.0, rest=0.02, budget=6.0)
    assert stopped and epochs >= 2


def test_time_budget_still_stops_before_a_steadily_slow_epoch_would_overrun():
    # 0.1 s a step, about 0.9 s an epoch: a 2.5 s budget has room for two or three of the eight.
    epochs, stopped, _ = _fit_with_step_delays(first=0.1, rest=0.1, budget=2.5)
    assert stopped and 2 <= epochs <= 3


def test_rescoring_a_model_trained_elsewhere_keeps_its_training_record(tiny_model, prepared, tmp_path):
    """`train --init M --epochs 0` (e.g. after a GPU run) scores the test split and keeps M's record."""
    import shutil
    from train.data import load_prepared
    from train.train import TrainConfig, train
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model.parent, run_dir)
    record = json.loads((run_dir / "train_info.json").read_text())
    record["stages"][0].update(backend="jax", device="NVIDIA H200")
    (run_dir / "train_info.json").write_text(json.dumps(record))
    _, info = train(load_prepared(prepared), TrainConfig(recipe="cnn", epochs=0, verbose=0,
                                                          init=str(run_dir / "model.keras")), run_dir)
    assert info == record


def test_rescoring_keeps_the_threshold_and_operating_points_set_on_the_card(tiny_model, prepared, tmp_path):
    import shutil
    from edge.card import read_card, write_card
    from train.data import load_prepared
    from train.report import finalize
    from train.train import TrainConfig, train
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model.parent, run_dir)
    card = read_card(run_dir / "model.keras")
    card.threshold, card.operating_points = 0.0234, {"counting": {"threshold": 0.9}}
    write_card(run_dir / "model.keras", card)
    data = load_prepared(prepared)
    cfg = TrainConfig(recipe="cnn", epochs=0, verbose=0, init=str(run_dir / "model.keras"))
    model, info = train(data, cfg, run_dir)
    after = finalize(model, run_dir, data, cfg, info)
    assert after.threshold == 0.0234 and after.operating_points == {"counting": {"threshold": 0.9}}
    assert read_card(run_dir / "model.keras").threshold == 0.0234


def test_evaluate_cli_writes_json_and_predictions(tiny_model, prepared, tmp_path):
    from tests.conftest import run
    res = run(["-m", "malaria_edge", "evaluate", str(tiny_model), "--data", str(prepared), "--split", "test",
               "--json", str(tmp_path / "m.json"), "--predictions", str(tmp_path / "p.csv"),
               "--plots", str(tmp_path / "plots")])
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "path,true_label,prob_parasitized,predicted_label" and len(rows) == m["n"] + 1
    assert (tmp_path / "plots" / "roc.png").exists() and "accuracy" in res.stdout
    assert f"warning: small sample ({m['n']} images" in res.stdout  # the fixture split is a handful of cells


def test_evaluate_sets_operating_points_and_temperature_together_on_validation(exported, prepared, tmp_path):
    import shutil

    from tests.conftest import run
    art = tmp_path / "tiny_int8.tflite"
    for suffix in ("", ".card.json"):
        shutil.copy(exported / f"tiny_int8.tflite{suffix}", f"{art}{suffix}")
    res = run(["-m", "malaria_edge", "evaluate", str(art), "--data", str(prepared), "--operating-points",
               "--calibrate", "--update-card", "--plots", str(tmp_path / "plots")])
    assert res.returncode == 0, res.stderr
    card = read_card(art)
    assert set(card.operating_points) == {"screening", "counting"}
    assert card.operating_points["counting"]["rule"] == "specificity >= 0.995 on validation"
    assert card.temperature != 1.0 and card.calibration["fitted_on"].startswith("val split")
    assert "operating points and temperature written" in res.stdout
    assert (tmp_path / "plots" / "tiny_int8.tflite.reliability.png").exists()


def test_no_small_sample_warning_on_a_real_sized_split():
    from train.evaluate import small_sample_warning
    rep = {"n": 3431, "n_groups": 28, "confusion_matrix": [[1500, 20], [40, 1871]]}
    assert small_sample_warning(rep) == ""
    assert small_sample_warning({**rep, "n_groups": 4}).startswith("warning: small sample")


def test_compare_builds_the_readme_table_and_figure(tiny_model, tmp_path):
    from tests.conftest import run
    res = run(["-m", "malaria_edge", "compare", str(tiny_model), "--figure", str(tmp_path / "cm.png")])
    assert res.returncode == 0, res.stderr
    assert "| tiny | cnn | from scratch" in res.stdout and "patient-grouped" in res.stdout
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_continuing_a_run_keeps_history_and_the_best_checkpoint(tiny_model, prepared, tmp_path):
    import shutil
    from train.data import load_prepared
    from train.train import TrainConfig, read_history, train
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model.parent, run_dir)
    before = read_history(run_dir / "history.csv")
    _, info = train(load_prepared(prepared), TrainConfig(recipe="cnn", epochs=1, batch=16, verbose=0,
                                                          init=str(run_dir / "model.keras")), run_dir)
    after = read_history(run_dir / "history.csv")
    assert len(after["epoch"]) == len(before["epoch"]) + 1 and info["epochs"] == len(after["epoch"])
    assert info["init"].endswith("model.keras")


def test_training_curves_of_one_epoch_show_it_numbered_as_in_history_csv(tiny_model):
    from train.plots import curves_figure
    from train.train import read_history
    h = read_history(tiny_model.parent / "history.csv")
    assert len(h["loss"]) == 1
    fig = curves_figure(h)
    lines = fig.axes[0].lines
    assert [list(line.get_xdata()) for line in lines] == [h["epoch"], h["epoch"]]
    assert all(line.get_marker() not in (None, "None", "") for line in lines)


def test_max_train_leaves_validation_whole(prepared, tmp_path, capsys):
    from train.data import load_prepared
    from train.train import TrainConfig, train
    data = load_prepared(prepared)
    _, info = train(data, TrainConfig(recipe="cnn", epochs=1, batch=8, verbose=0, max_train=6), tmp_path / "run")
    assert info["train_images"] == 6 and info["val_images"] == len(data.indices("val"))
    assert "train: a random 6 of" in capsys.readouterr().out


def test_field_crop_augmentation_changes_only_the_asked_share_and_keeps_the_cell(prepared):
    from train.data import load_prepared
    from train.train import field_crop_batch
    x = np.asarray(load_prepared(prepared).images[:40])
    out = field_crop_batch(x, np.random.default_rng(0), 0.5)
    assert out.shape == x.shape and out.dtype == x.dtype
    changed = [not np.array_equal(a, b) for a, b in zip(x, out)]
    assert 8 <= sum(changed) <= 32  # about half of 40
    for a, b in zip(x, out):  # the cell's interior (away from its rim) is never touched
        core = cv2.erode((a.max(axis=2) > 12).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=12).astype(bool)
        assert np.array_equal(a[core], b[core])
    assert np.array_equal(field_crop_batch(x, np.random.default_rng(0), 0.0), x)


def test_label_issues_flag_the_labels_the_probabilities_contradict():
    from train.labelnoise import find_issues
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200, int), np.ones(200, int)]
    probs = np.clip(np.where(labels == 1, 0.9, 0.1) + rng.normal(0, 0.05, 400), 0.01, 0.99)
    probs[[5, 250]] = [0.98, 0.02]  # a "healthy" cell the models call infected, and the other way round
    flagged = find_issues(labels, probs)
    assert set(flagged.tolist()) == {5, 250}


def test_label_issues_cli_writes_out_of_fold_probabilities_for_every_training_image(prepared, tmp_path):
    from click.testing import CliRunner

    from malaria_edge.cli import main
    from train.data import load_prepared
    out = tmp_path / "issues"
    r = CliRunner().invoke(main, ["label-issues", "--data", str(prepared), "--out", str(out), "--folds", "2",
                                  "--epochs", "1"])
    assert r.exit_code == 0, r.output
    d = load_prepared(prepared)
    rows = list(csv.DictReader(open(out / "oof.csv")))
    assert sorted(x["relpath"] for x in rows) == sorted(d.relpaths[i] for i in d.indices("train"))
    assert all(0 <= float(x["p_parasitized_oof"]) <= 1 for x in rows)
    flagged = list(csv.DictReader(open(out / "issues.csv")))
    assert len(flagged) == sum(int(x["issue"]) for x in rows) == json.loads((out / "summary.json").read_text())["issues"]
    sides = [list(csv.DictReader(open(out / f"issues_labelled_{n}.csv"))) for n in ("parasitized", "uninfected")]
    assert [len(x) for x in sides] == [sum(x["label"] == y for x in flagged) for y in ("1", "0")]
    # each fold's model stopped on validation and trained on the other fold's patients only
    infos = [json.loads((out / "folds" / f"fold{k}" / "train_info.json").read_text()) for k in (1, 2)]
    assert sum(i["train_images"] for i in infos) == len(rows)


def test_train_exclude_leaves_out_listed_training_images_and_refuses_validation_ones(prepared, tmp_path):
    from click.testing import CliRunner

    from malaria_edge.cli import main
    from train.data import load_prepared
    d = load_prepared(prepared)
    tr, va = d.indices("train"), d.indices("val")
    ok = tmp_path / "ok.csv"
    ok.write_text("relpath\n" + "\n".join(d.relpaths[i] for i in tr[:3]) + "\n")
    r = CliRunner().invoke(main, ["train", "--data", str(prepared), "--out", str(tmp_path / "run"), "--epochs", "1",
                                  "--exclude", str(ok)])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert info["train_images"] == len(tr) - 3 and info["excluded"]["images"] == 3
    bad = tmp_path / "bad.csv"
    bad.write_text(f"relpath\n{d.relpaths[va[0]]}\n")
    r = CliRunner().invoke(main, ["train", "--data", str(prepared), "--out", str(tmp_path / "run2"), "--epochs", "1",
                                  "--exclude", str(bad)])
    assert r.exit_code == 1 and "validation or test" in r.output and "Traceback" not in r.output


def test_augmentation_switches_keep_shape_range_and_the_black_background(prepared):
    from train.augment import Augmenter
    from train.data import load_prepared
    x = np.asarray(load_prepared(prepared).images[:8]).astype(np.float32)
    background = x.max(axis=3) == 0
    for names in [("stain",), ("blur",), ("noise",), ("scale",), ("stain", "blur", "noise", "scale")]:
        out = Augmenter(names, seed=1)(x, np.random.default_rng(0))
        assert out.shape == x.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
        assert np.abs(out - x).mean() > 0.5, names  # each switch does something
        if names == ("stain",):
            assert out[background].max() == 0  # colour and gamma leave the masked-out background black


def test_scale_augmentation_removes_fine_detail_as_a_coarser_camera_would(prepared):
    from train.augment import Augmenter
    from train.data import load_prepared
    x = np.asarray(load_prepared(prepared).images[:8]).astype(np.float32)
    inside = [cv2.erode((im.max(axis=2) > 20).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) for im in x]

    def detail(batch):  # fine structure inside the cells (a parasite's edges), not the cell's outline
        return np.mean([np.abs(cv2.Laplacian(im.mean(axis=2), cv2.CV_32F))[m].mean() for im, m in zip(batch, inside)])
    out = Augmenter(("scale",), seed=1)(x, np.random.default_rng(23))  # this generator draws a 43 px cell
    assert detail(out) < 0.8 * detail(x)


def test_unknown_augmentation_is_a_one_line_error():
    from click.testing import CliRunner

    from malaria_edge.cli import main
    r = CliRunner().invoke(main, ["train", "--out", "/tmp/never", "--augment", "stain,sharpen"])
    assert r.exit_code == 2 and "unknown augmentation 'sharpen'" in r.output and "Traceback" not in r.output


def test_stain_matrix_keeps_grey_and_turns_only_the_chroma():
    from train.augment import stain_matrices
    ident, grey, turned = stain_matrices(np.array([0.0, 0.0, 360.0]), np.array([1.0, 0.0, 1.0]))
    pink = np.array([200.0, 120.0, 160.0])
    assert np.allclose(ident @ pink, pink, atol=0.05) and np.allclose(turned @ pink, pink, atol=0.05)
    assert np.allclose(grey @ pink, 0.299 * 200 + 0.587 * 120 + 0.114 * 160, atol=0.5)  # luma, as a grey


def test_stain_wide_spreads_stain_colours_further_than_stain_and_keeps_the_background_black():
    from train.augment import Augmenter
    x = np.zeros((400, 4, 4, 3), np.float32)
    x[:, :2] = [200.0, 120.0, 160.0]  # a pink cell above, the masked-out background below
    out = {k: Augmenter((k,))(x, np.random.default_rng(0)) for k in ("stain", "stain-wide")}
    spread = {k: v[:, 0, 0].std(axis=0).sum() for k, v in out.items()}
    assert spread["stain-wide"] > 1.2 * spread["stain"]
    assert all(np.all(v[:, 2:] == 0) for v in out.values())
