"""`malaria-edge`: every action of the toolkit as one command (data, train, evaluate, export, bench,
infer, app), on top of the packages it drives; nothing imports this module.

TensorFlow is imported only inside the subcommands that need it, so `--help`, `data`, `infer` and
`app` run without it (on a Pi).
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from edge.card import CardError
from edge.images import ImageError
from edge.operating import FAST
from edge.results import OutputError
from edge.runtime import ModelError
from export.pipeline import FORMATS  # light: TensorFlow loads inside its functions

_USER_ERRORS = (CardError, ImageError, ModelError, OutputError, FileNotFoundError)
SPLITS = click.Choice(["train", "val", "test"])


def _fail_cleanly(fn):
    """Turn the project's user-facing errors into one line and exit code 1, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from train.data import DataError
        try:
            return fn(*a, **kw)
        except (DataError, *_USER_ERRORS) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="malaria-edge")
def main():
    """Train, evaluate, export and benchmark malaria blood-cell classifiers.

    \b
    Every action is a subcommand; `malaria-edge infer` is `edge-infer` (same flags).
    Typical flow:
      malaria-edge data prepare ../shared/data/nih_malaria_dev --out data/prepared
      malaria-edge train --recipe cnn --data data/prepared --out runs/cnn
      malaria-edge evaluate runs/cnn/model.keras --data data/prepared --split test
      malaria-edge export runs/cnn/model.keras --data data/prepared --out models/cnn
      malaria-edge bench models/cnn --data data/prepared
      malaria-edge infer --field examples/field/ --out runs/fields
      malaria-edge app --host 0.0.0.0
    """


@main.group()
def data():
    """Get the NIH cell images and turn them into a manifest, a patient split and a cache;
    pack splits into one small file to train on another machine."""


@data.command("prepare")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True,
              help="Output folder: manifest.csv, split.json, report.json, cache_<size>.npy.")
@click.option("--size", default=128, show_default=True, help="Square model input size of the cache.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split.")
@click.option("--split", "split_kind", type=click.Choice(["patient", "random"]), default="patient", show_default=True,
              help="'random' splits images, not patients: it leaks and exists only to compare with published numbers.")
@click.option("--fractions", default="0.7,0.15,0.15", show_default=True, help="train,val,test fractions.")
@click.option("--workers", type=int, default=None, help="Decoding processes (default: all cores).")
@_fail_cleanly
def data_prepare(src, out, size, seed, split_kind, fractions, workers):
    """Decode SRC (Kaggle zip, its folder, or any folder with Parasitized/ and Uninfected/).

    Bad files (corrupt, empty, truncated, not images, absurdly large) are skipped and listed in
    report.json; exact duplicates (same pixels) are dropped. The split keeps each patient (or
    healthy slide) in one split.
    """
    from train.data import prepare
    fr = tuple(float(x) for x in fractions.split(","))
    rep = prepare(src, out, size=size, seed=seed, split_kind=split_kind, fractions=fr, workers=workers)
    _print_prepare_report(rep, out)


def _print_prepare_report(rep: dict, out: Path) -> None:
    click.echo(f"kept {rep['images_kept']} of {rep['images_found']} images in {rep['seconds']} s → {out}")
    for kind in ("skipped", "duplicates_dropped", "ignored"):
        if rep[kind]:
            click.echo(f"{kind.replace('_', ' ')}: {len(rep[kind])} (see {out / 'report.json'})")
            for r in rep[kind][:5]:
                click.echo(f"  {r['file']}: {r.get('reason') or 'same as ' + r['same_as']}")
    s = rep["split"]
    click.echo(f"split ({s['kind']}, seed {s['seed']}, hash {s['hash']}):")
    for name, v in s["summary"].items():
        click.echo(f"  {name:5s} {v['images']:6d} images  {v['groups']:4d} groups  "
                   f"Parasitized {v['Parasitized']:6d}  Uninfected {v['Uninfected']:6d}")


@data.command("download")
@click.option("--dest", type=click.Path(path_type=Path), default=Path("data/kaggle"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True)
@click.option("--size", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@_fail_cleanly
def data_download(dest, out, size, seed):
    """Download Kaggle's iarunava/cell-images-for-detecting-malaria, then prepare it.

    Credentials come from ~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY.
    """
    from train.data import download_kaggle, prepare
    zip_path = download_kaggle(dest)
    _print_prepare_report(prepare(zip_path, out, size=size, seed=seed), out)


@data.command("pack")
@click.argument("prepared", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle file to write (.zip).")
@click.option("--splits", default="train,val", show_default=True, help="Which splits to carry.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="Lossy WebP quality (95: ~2.7 kB a cell, 43 dB PSNR).")
@click.option("--lossless", is_flag=True, help="Lossless WebP (~3x larger).")
@_fail_cleanly
def data_pack(prepared, out, splits, quality, lossless):
    """Pack splits of a prepared set into one small file for training elsewhere (a rented GPU).

    The manifest rows and split.json travel unchanged, so the split hash stays the same. The test
    split stays behind by default: score models on it where the full set lives.
    """
    from train.bundle import pack
    info = pack(prepared, out, tuple(splits.split(",")), None if lossless else quality)
    click.echo(f"{info['images']} images ({', '.join(info['splits'])}, {info['encoding']}) → {out} "
               f"({info['bytes'] / 2**20:.1f} MiB)")


@data.command("fold")
@click.argument("prepared", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--fold", "fold", type=int, required=True, help="Which fold becomes the val split (0-based).")
@click.option("--folds", type=click.IntRange(2, 10), default=4, show_default=True,
              help="Folds by patient over the train and val patients.")
@click.option("--seed", default=0, show_default=True, help="Seed of the folds.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Prepared folder to create.")
@_fail_cleanly
def data_fold(prepared, fold, folds, seed, out):
    """A prepared folder for cross-fitting: fold FOLD of the train and val patients as val, the rest as
    train, test unchanged (the cache is linked). Train one model per fold to measure on every patient."""
    from train.data import write_fold
    summary = write_fold(prepared, out, fold, folds, seed)
    click.echo(", ".join(f"{s} {v['images']} images / {v['groups']} patients" for s, v in summary.items()) + f" → {out}")


@data.command("unpack")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Prepared folder to create.")
@_fail_cleanly
def data_unpack(bundle, out):
    """Rebuild a prepared folder (manifest, split, cache) from a bundle made by `data pack`."""
    from train.bundle import unpack
    info = unpack(bundle, out)
    click.echo(f"{info['images']} images ({', '.join(info['splits'])}, {info['encoding']}) → {out}")


def _switches(ctx, param, value):
    from train.augment import parse
    try:
        parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@main.command("train")
@click.option("--recipe", type=click.Choice(["cnn", "mobilenetv2-frozen", "mobilenetv2-finetune"]), default="cnn",
              show_default=True, help="Custom CNN, MobileNetV2 with a frozen base, or MobileNetV2 fine-tuned.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True,
              help="Output of `malaria-edge data prepare`.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder: model.keras, card, history, plots.")
@click.option("--epochs", default=12, show_default=True, help="Epochs (first stage for MobileNetV2).")
@click.option("--finetune-epochs", default=4, show_default=True, help="mobilenetv2-finetune: epochs with the top blocks unfrozen.")
@click.option("--batch", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True, help="Learning rate (fine-tuning uses lr/10).")
@click.option("--seed", default=0, show_default=True)
@click.option("--weights", default="none", show_default=True,
              help="MobileNetV2 start: imagenet (downloads), none (from scratch) or PATH to a .weights.h5 of the base.")
@click.option("--alpha", default=1.0, show_default=True, help="MobileNetV2 width multiplier.")
@click.option("--stem-stride", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="cnn: 2 makes the first convolution stride, 4x fewer operations at the same input size.")
@click.option("--batchnorm", is_flag=True, help="cnn: BatchNorm after every convolution (folded away at export).")
@click.option("--width", type=click.FloatRange(0.25, 4), default=1.0, show_default=True,
              help="cnn: filter multiplier (blocks of 16, 32, 64, 128 filters × width).")
@click.option("--patience", default=4, show_default=True, help="Early-stopping patience (epochs) on validation loss.")
@click.option("--max-minutes", type=float, default=None,
              help="Time budget for all stages; training stops before an epoch would overrun it (best epoch kept).")
@click.option("--workers", default=1, show_default=True, help="Threads preparing training batches.")
@click.option("--mixed-precision", is_flag=True, help="float16 compute (GPU).")
@click.option("--max-train", type=int, default=None, help="Use at most this many training images (quick runs).")
@click.option("--max-val", type=int, default=None,
              help="Use at most this many validation images for early stopping (quick runs; the card's validation "
                   "metrics always use the whole split).")
@click.option("--target-sensitivity", type=float, default=None,
              help="Set the card's threshold to reach this sensitivity on validation (default: 0.5).")
@click.option("--field-crops", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of training crops made to look like field mode's (mask a few px off, a platelet stuck "
                   "to the rim, a slice of a neighbour).")
@click.option("--augment", default=None, metavar="SWITCHES", callback=_switches,
              help="Extra augmentation, comma-separated: stain (colour jitter, gamma), stain-wide "
                   "(the same, wider), blur (defocus), noise, "
                   "scale (a cell seen with 40-128 px); each measured on validation before it is kept.")
@click.option("--exclude", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="CSV with a relpath column (e.g. label-issues' issues.csv): training images to leave out. "
                   "Validation and test images cannot be left out.")
@click.option("--init", type=click.Path(path_type=Path, exists=True), default=None,
              help="Continue from this .keras (--epochs 0: only the fine-tune stage; --epochs 0 --finetune-epochs 0: "
                   "only score it, e.g. after training elsewhere).")
@_fail_cleanly
def train_cmd(recipe, data_dir, out, epochs, finetune_epochs, batch, lr, seed, weights, alpha, stem_stride, batchnorm,
              width, patience, max_minutes, workers, mixed_precision, max_train, max_val, target_sensitivity, field_crops, augment, exclude, init):
    """Train a recipe on the patient-grouped train split, pick the best epoch on validation,
    then report test metrics with 95% CIs and write the model card and plots."""
    from train.data import load_prepared
    from train.models import WeightsError
    from train.train import TrainConfig, train
    from train.report import finalize
    data = load_prepared(data_dir)
    cfg = TrainConfig(recipe=recipe, epochs=epochs, finetune_epochs=finetune_epochs, batch=batch, lr=lr, seed=seed,
                      weights=weights, alpha=alpha, stem_stride=int(stem_stride),
                      batchnorm=batchnorm, width=width, patience=patience, max_minutes=max_minutes, workers=workers,
                      mixed_precision=mixed_precision,
                      max_train=max_train, max_val=max_val, field_crops=field_crops, init=str(init) if init else None,
                      exclude=str(exclude) if exclude else None, augment=augment,
                      verbose=1 if sys.stdout.isatty() else 2)
    try:
        model, info = train(data, cfg, out)
    except WeightsError as e:
        raise click.ClickException(str(e)) from None
    card = finalize(model, out, data, cfg, info, target_sensitivity)
    split = "test" if "test" in card.metrics else "val"  # a packed bundle may carry no test split
    t = card.metrics[split]
    click.echo(f"{split} ({t['n']} images, {t['n_groups']} patient groups): accuracy {t['accuracy']:.4f} "
               f"{_ci(t, 'accuracy')}, AUC {t['auc']:.4f} {_ci(t, 'auc')}; model → {out / 'model.keras'}")


def _ci(m, k):
    return f"[{m['ci95'][k][0]:.4f}, {m['ci95'][k][1]:.4f}]" if "ci95" in m else ""


@main.command("label-issues")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True,
              help="Output of `malaria-edge data prepare` (a 64 px cache makes the folds 4x cheaper).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder: oof.csv, issues.csv, issues.png, summary.json, one model per fold.")
@click.option("--folds", type=click.IntRange(2, 10), default=3, show_default=True, help="Folds by patient.")
@click.option("--epochs", default=12, show_default=True, help="Epochs per fold (custom CNN).")
@click.option("--patience", default=4, show_default=True, help="Early-stopping patience on validation loss.")
@click.option("--seed", default=0, show_default=True)
@_fail_cleanly
def label_issues_cmd(data_dir, out, folds, epochs, patience, seed):
    """Likely label errors in the training split: out-of-fold predictions of the custom CNN, flagged
    by confident learning (cleanlab). Look at issues.png, then `train --exclude OUT/issues.csv` to
    measure on validation whether leaving them out helps."""
    from train.data import load_prepared
    from train.labelnoise import run
    from train.train import TrainConfig
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise click.ClickException("label-issues needs cleanlab: pip install -e '.[train]'") from None
    data = load_prepared(data_dir)
    cfg = TrainConfig(recipe="cnn", epochs=epochs, patience=patience, seed=seed, verbose=2)
    s = run(data, cfg, folds, out, log=click.echo)
    click.echo(f"{s['issues']} likely label errors in {s['train_images']} training images "
               f"({s['issues_labelled_uninfected']} labelled Uninfected, {s['issues_labelled_parasitized']} labelled "
               f"Parasitized; out-of-fold accuracy {s['oof_accuracy']:.4f}) -> {out}/issues.csv, {out}/issues.png")


@main.command("evaluate")
@click.argument("model_path", type=click.Path(path_type=Path, exists=True))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True,
              help="Output of `malaria-edge data prepare` (as in train, export and bench).")
@click.option("--split", type=SPLITS, default="test", show_default=True, help="Which split of --data.")
@click.option("--folder", "folder", type=click.Path(path_type=Path), default=None,
              help="Instead of a split: any labelled folder (Parasitized/, Uninfected/; Kaggle layout too).")
@click.option("--threshold", type=float, default=None, help="Default: the model card's threshold, else 0.5.")
@click.option("--target-sensitivity", type=float, default=None,
              help="Pick the threshold reaching this sensitivity on the validation split of --data.")
@click.option("--operating-points", is_flag=True,
              help="Set the named operating points (screening: sensitivity >= 0.97, counting: specificity >= 0.995) "
                   "on the validation split, with their confusion counts and test-split rates.")
@click.option("--screen", "screen_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="With --operating-points: also set counting-fast, the counting rule behind this faster screen "
                   "model (it forwards 99.5%% of the cells MODEL calls positive at counting on validation), with the "
                   "rule's own counts.")
@click.option("--calibrate", is_flag=True,
              help="Fit temperature scaling on the validation split (the confidence shown then means what it says); "
                   "reports ECE before and after on validation and test, and a reliability diagram into --plots.")
@click.option("--field-spread", is_flag=True,
              help="Measure how far field mode's sensitivity and specificity differ between the validation patients "
                   "(synthetic fields of their crops at 0.5, 2 and 5%, re-cut and classified at each operating point) "
                   "and, with --update-card, store it in each point: field mode's interval draws a patient's rates "
                   "with that spread where it is wider than the crops'. Needs the crops --crops points to.")
@click.option("--crops", "crops_root", type=click.Path(path_type=Path, file_okay=False),
              default=Path("../shared/data/nih_malaria_dev"), show_default=True,
              help="With --field-spread: the folder `data prepare` read (the crops synthetic fields are built from).")
@click.option("--recut-from", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="With --field-spread: take the share of the sensitivity field mode's re-cut keeps from this "
                   "cross-fitted measurement (benchmarks/results/crossfit/crossfit.json: every train/val patient) "
                   "instead of the validation patients' fields alone.")
@click.option("--update-card", is_flag=True,
              help="Write the chosen threshold, operating points or temperature into the model card.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write metrics JSON here.")
@click.option("--predictions", type=click.Path(path_type=Path), default=None, help="Write one CSV row per image here.")
@click.option("--plots", type=click.Path(path_type=Path), default=None, help="Folder for confusion matrix and ROC PNGs.")
@_fail_cleanly
def evaluate_cmd(model_path, data_dir, split, folder, threshold, target_sensitivity, operating_points, screen_path,
                 calibrate, field_spread, crops_root, recut_from, update_card, json_path, predictions, plots):
    """Accuracy, precision, recall, specificity, F1, AUC, MCC with patient-bootstrap 95% CIs.

    MODEL_PATH is a .keras file or an exported .tflite/.onnx (run through the edge runtime).
    """
    from edge.card import read_card, write_card
    from edge.metrics import threshold_for_sensitivity
    from train.evaluate import (classification_report, evaluate, from_folder, from_prepared, predict_file,
                                save_json, write_predictions)
    try:
        card = read_card(model_path)
    except CardError:
        card = None
    if threshold is None:
        threshold = card.threshold if card else 0.5
    if screen_path and not operating_points:
        raise click.UsageError("--screen sets the counting-fast operating point: add --operating-points")
    if field_spread:
        _field_spread(model_path, data_dir, crops_root, update_card, recut_from)
        return
    if calibrate or operating_points:
        from train.evaluate import fit_calibration, set_operating_points, val_test_probs
        sets = val_test_probs(model_path, data_dir)
        if operating_points:
            ops = set_operating_points(sets)
            if screen_path:
                ops[FAST] = _screened(model_path, screen_path, data_dir, sets, ops["counting"])
            for name, op in ops.items():
                t = op.get("test", {})
                click.echo(f"{name}: threshold {op['threshold']:.4f} ({op['rule']}); validation sensitivity "
                           f"{op['sensitivity']:.4f}, specificity {op['specificity']:.4f}, counts {op['counts']}"
                           + (f"; test sensitivity {t['sensitivity']:.4f} {t['ci95']['sensitivity']}, specificity "
                              f"{t['specificity']:.4f} {t['ci95']['specificity']}" if t else ""))
            if card:
                card.operating_points = ops
        if calibrate:
            t, cal = fit_calibration(sets, model_path.name, plots)
            click.echo(f"temperature {t:.4f} (fitted on the validation split); ECE validation {cal['val_ece_before']:.4f} "
                       f"→ {cal['val_ece_after']:.4f}" + (f", test {cal['test_ece_before']:.4f} → "
                                                          f"{cal['test_ece_after']:.4f}" if "test_ece_after" in cal else ""))
            if card:
                card.temperature, card.calibration = t, cal
        if update_card and card:
            write_card(model_path, card)
            click.echo(f"{' and '.join(w for w, on in (('operating points', operating_points), ('temperature', calibrate)) if on)} "
                       f"written to {model_path.name}'s card")
        return
    if target_sensitivity is not None:
        val = from_prepared(data_dir, "val")
        threshold = threshold_for_sensitivity(val.labels, predict_file(model_path, val.images), target_sensitivity)
        click.echo(f"threshold {threshold:.4f} reaches sensitivity {target_sensitivity} on the validation split")
    size = card.input_size if card else 128
    ls = from_folder(folder, size) if folder else from_prepared(data_dir, split)
    p = predict_file(model_path, ls.images)
    rep = evaluate(ls.labels, p, ls.groups, threshold, plots, f"{model_path.name} on {ls.name}")
    rep["on"] = ls.name
    click.echo(f"{model_path} on {ls.name}")
    click.echo(classification_report(rep))
    if json_path:
        save_json(json_path, rep)
    if predictions:
        write_predictions(predictions, ls, p, threshold)
    if update_card and card:
        card.threshold = float(threshold)
        write_card(model_path, card)
        click.echo(f"threshold written to {model_path.name}'s card")


def _field_spread(model_path: Path, data_dir: Path, crops_root: Path, update_card: bool,
                  recut_from: Path | None = None) -> None:
    """Field mode's between-patient spread at each of the card's counting points, on the validation patients."""
    from edge.card import read_card, write_card
    from edge.field import FieldOptions
    from edge.operating import operating_point
    from edge.runtime import load_classifier
    from train.fieldpool import field_pool, field_spread
    if model_path.suffix not in (".tflite", ".onnx"):
        raise click.UsageError(f"--field-spread {model_path}: field mode runs an exported .tflite/.onnx artifact")
    if not crops_root.is_dir():
        raise click.UsageError(f"--crops {crops_root}: no such folder (the crops `data prepare` read)")
    crossfit = _crossfit_recut(recut_from) if recut_from is not None else None
    model = load_classifier(model_path)
    ops = model.card.operating_points or {}
    points = [n for n in ("counting", FAST) if n in ops]
    if not points:
        raise click.UsageError(f"{model_path.name}: its card has no counting point; set them first with --operating-points")
    card = read_card(model_path)  # as written, to write back with only the spreads added
    for name in points:
        opts = FieldOptions.at(operating_point(model, name))
        pools = [field_pool(data_dir, crops_root, model, opts, split="val", parasitemia=pi,
                            log=lambda m: click.echo(m, err=True)) for pi in (0.005, 0.02, 0.05)]
        fs = field_spread(pools, opts.threshold)
        if crossfit is not None:
            fs["recut"] = crossfit
        card.operating_points[name]["field_spread"] = fs
        rc = fs["recut"]
        click.echo(f"{name}: field mode's between-patient SD over {fs['patients']} validation patients: sensitivity "
                   f"{fs['sensitivity_var'] ** 0.5:.3f}, specificity {fs['specificity_var'] ** 0.5:.4f} "
                   f"({fs['infected']} infected and {fs['uninfected']} uninfected cells in {fs['fields']} fields); "
                   f"field mode called {rc['field_called']} of {rc['infected']} infected cells, their own crops "
                   f"{rc['crops_called']} ({rc.get('source', 'these validation fields')}): sensitivity scaled by "
                   f"{rc['field_called'] / max(rc['crops_called'], 1):.3f}")
    if update_card:
        write_card(model_path, card)
        click.echo(f"field spread written to {model_path.name}'s card")


def _crossfit_recut(path: Path) -> dict:
    """The pooled re-cut counts of a `python -m benchmarks.crossfit` run, with where they came from."""
    try:
        res = json.loads(path.read_text())
        rc = {k: int(res["recut_pooled"][k]) for k in ("field_called", "crops_called", "infected")}
        folds = len(res["folds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise click.UsageError(f"--recut-from {path}: not a crossfit.json ({type(e).__name__}: {e})") from None
    return {**rc, "source": f"cross-fitted over {folds} patient folds of the train/val patients ({path.as_posix()})"}


def _screened(model_path: Path, screen_path: Path, data_dir: Path, sets: dict, counting: dict) -> dict:
    import os
    from edge.card import read_card
    from train.evaluate import screened_point, val_test_probs
    if screen_path.suffix not in (".tflite", ".onnx"):
        raise click.UsageError(f"--screen {screen_path}: the screen is an exported .tflite/.onnx artifact with its card")
    sha = read_card(screen_path).artifact_sha256
    ref = os.path.relpath(screen_path.resolve(), model_path.resolve().parent)
    op = screened_point(sets, val_test_probs(screen_path, data_dir), counting, ref, sha)
    f = op["screen"]["forwarded_val"]
    click.echo(f"screen {screen_path.name}: forward_at {op['screen']['forward_at']:.4f} forwards "
               f"{f['uninfected']:.1%} of validation's uninfected and {f['parasitized']:.1%} of its parasitized cells"
               + (f"; its calls agree with counting alone on {op['test']['agreement_with_counting']:.2%} of test"
                  if "test" in op else ""))
    return op


@main.command("compare")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--figure", type=click.Path(path_type=Path), default=None, help="Write one confusion-matrix figure here.")
@_fail_cleanly
def compare_cmd(models, figure):
    """Comparison table (Markdown) of trained .keras models from their cards, test split metrics."""
    from train.report import comparison
    click.echo(comparison(list(models), figure))


@main.command("export")
@click.argument("model_path", type=click.Path(path_type=Path, exists=True))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True,
              help="Prepared data: calibration images come from its train split, parity from --parity-split.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--formats", default=",".join(FORMATS), show_default=True)
@click.option("--name", default=None, help="Artifact name prefix (default: the model card's name).")
@click.option("--calib", default=300, show_default=True, help="Calibration images (stratified, train split).")
@click.option("--parity-split", type=SPLITS, default="test", show_default=True,
              help="The split the parity gate compares on.")
@click.option("--max-parity", type=int, default=None, help="Cap the parity images (quick runs).")
@click.option("--max-delta-pp", default=1.0, show_default=True, help="Gate: largest allowed accuracy drop (points).")
@click.option("--min-agreement", default=99.0, show_default=True, help="Gate: least label agreement with float (%).")
@click.option("--no-explainer", is_flag=True, help="Skip the Grad-CAM explainer graphs.")
@_fail_cleanly
def export_cmd(model_path, data_dir, out, formats, name, calib, parity_split, max_parity, max_delta_pp,
               min_agreement, no_explainer):
    """Export to TFLite (fp32, fp16, dynamic, int8) and ONNX (fp32, int8 QDQ) with a parity gate.

    Each artifact runs through the edge runtime on the parity split and is compared with the float
    Keras model; one that loses more than --max-delta-pp accuracy, or agrees on fewer than
    --min-agreement % of labels at the card's threshold or any of its operating points, fails. All
    files are staged and moved into --out only when every artifact passes: a failed export leaves
    --out exactly as it was and exits 1.
    """
    from export.parity import Gate
    from export.pipeline import ExplainerMismatch, ExportFailed, export_data, export_model
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise click.UsageError(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    data = export_data(data_dir, calib, parity_split, max_parity)
    try:
        rows = export_model(model_path, out, data, fmts, Gate(max_delta_pp, min_agreement), name,
                            explainer=not no_explainer, log=click.echo)
    except ExplainerMismatch as e:
        raise click.ClickException(f"{e}; {out} left unchanged") from None
    except ExportFailed as e:
        click.echo(e.report)
        raise click.ClickException(str(e)) from None
    click.echo((out / "parity.md").read_text())


@main.command("bench")
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="Thread counts to time.")
@click.option("--runs", default=200, show_default=True, help="Timed runs at batch 1 (a quarter of that at batch 32).")
@click.option("--budget-s", default=15.0, show_default=True, help="Time cap per measurement (never under 20 runs).")
@click.option("--max-images", type=int, default=None, help="Cap the accuracy images (quick runs).")
@click.option("--e2e-images", default=2000, show_default=True, help="Real images for the edge-infer folder run (0: skip).")
@_fail_cleanly
def bench_cmd(model_dirs, data_dir, out, threads, runs, budget_s, max_images, e2e_images):
    """Accuracy and CPU latency of every artifact in each MODEL_DIR against its Keras baseline.

    MODEL_DIR holds a .keras model and its exports (`malaria-edge export` output). Writes
    <name>.md/.csv/.json/.png into --out.
    """
    from benchmarks.bench import bench, markdown
    for d in model_dirs:
        res = bench(d, data_dir, out, tuple(int(t) for t in threads.split(",")), runs, budget_s, max_images,
                    e2e_images, log=click.echo)
        click.echo(markdown(res))


@main.command("bench-front")
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--threads", default=2, show_default=True, help="Threads per int8 inference.")
@click.option("--rounds", type=click.IntRange(1, 50), default=5, show_default=True,
              help="Latency: the candidates take turns this many times; the median p50 counts.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@_fail_cleanly
def bench_front_cmd(folders, threads, rounds, out):
    """Accuracy-latency front: each FOLDER (a train run or model folder with its .keras, card and int8
    TFLite export) gets its validation and test accuracy/AUC beside its int8 p50, measured in one run;
    the first folder is the baseline of the speed ratio."""
    from benchmarks.front import run
    run(list(folders), out, threads, rounds, log=click.echo)
    click.echo(f"-> {out}/front.md, front.png")


@main.command("bench-fields")
@click.option("--model", "model_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="Classifier artifact (default: the shipped field model).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True)
@click.option("--crops", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=Path("../shared/data/nih_malaria_dev"), show_default=True,
              help="The folder `data prepare` read (the crops synthetic fields are built from).")
@click.option("--fields", "fields_root", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=Path("../shared/data/nih_fields/239C12NThinF"), show_default=True,
              help="Real fields: Img/*.jpg with GT/*.txt point sets.")
@click.option("--sessions", default=200, show_default=True, help="Simulated sessions per parasitemia level.")
@click.option("--operating-point", "point", default=None,
              help="The card's operating point to count at (default: field mode's, counting-fast where the card has it).")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True,
              help="Which patients the synthetic sessions are composed from: test (held out from every choice) or val "
                   "(where detection and counting choices are judged).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@_fail_cleanly
def bench_fields_cmd(model_path, data_dir, crops, fields_root, sessions, point, split, out):
    """Field mode: detection on real fields, corrected counts on simulated sessions, fields/s."""
    from benchmarks.fields import markdown, run
    from edge.runtime import default_model
    res = run(model_path or default_model("field"), data_dir, crops, fields_root, out, sessions, point_name=point,
              split=split, log=click.echo)
    click.echo(markdown(res))


def _add_infer() -> None:
    """`malaria-edge infer` is `edge-infer` (the device command), with the same flags."""
    from edge.cli import main as edge_infer
    main.add_command(edge_infer, name="infer")


_add_infer()


@main.command("app")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 lets a phone or laptop on the local network open it.")
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@click.option("--camera", default="auto", show_default=True, metavar="[auto|picam|INDEX|URL|VIDEO]",
              help="The microscope camera the Fields tab captures from (as edge-infer --camera; a video file "
                   "stands in for one).")
def app_cmd(host, port, camera):
    """The browser app (Streamlit) on the edge runtime: cells and fields, Grad-CAM, reports.

    Needs the app extra: pip install -e ".[app]". No TensorFlow: it runs on the Pi beside the microscope.
    """
    import importlib.util
    import os
    if importlib.util.find_spec("streamlit") is None:
        raise click.ClickException("the app needs Streamlit: pip install -e \".[app]\"")
    from edge import app
    click.echo(f"malaria-edge app on http://{host}:{port} (Ctrl-C stops it)", err=True)
    args = [sys.executable, "-m", "streamlit", "run", app.__file__, "--server.address", host,
            "--server.port", str(port), "--server.maxUploadSize", str(app.MAX_UPLOAD_MB), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false", "--client.toolbarMode", "minimal"]
    os.environ["MALARIA_EDGE_CAMERA"] = camera
    os.execv(sys.executable, args)  # this process becomes the server: Ctrl-C and kill reach it directly


if __name__ == "__main__":
    main()
