"""`edge-infer`: classify cell images, a video or a live camera on a CPU device, no TensorFlow."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from edge.card import CardError
from edge.classifier import Classifier
from edge.options import RunOptions
from edge.results import OutputError, Writer, open_results, summary
from edge.runtime import ModelError, gate_failed, load_explainer_for

RESULT_SUFFIXES = {".csv", ".jsonl", ".ndjson", ".json"}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1)
@click.option("--model", "-m", "model_path", type=click.Path(path_type=Path), default=None,
              help="A .tflite or .onnx artifact with its .card.json. Default: the shipped int8 model.")
@click.option("--camera", default=None, is_flag=False, flag_value="auto", metavar="[picam|INDEX|URL]",
              help="Live camera: picam (the Raspberry Pi's CSI camera, via Picamera2), an index, a device path, a URL "
                   "or a GStreamer pipeline. Alone: the Pi camera on a Pi that has one, else index 0.")
@click.option("--video", type=click.Path(path_type=Path), default=None, help="A video file, read like a camera.")
@click.option("--gradcam", is_flag=True, help="Save a Grad-CAM overlay PNG per input into --out.")
@click.option("--panel", is_flag=True, help="With --gradcam: original and overlay side by side.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/infer"), show_default=True,
              help="Folder for overlays, annotated frames and the live results log.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Also write rows to this file (CSV, or JSON Lines for .jsonl, JSON for .json), flushed per batch.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl", "json"]), default="table",
              show_default=True, help="Terminal output format.")
@click.option("--threshold", type=float, default=None, help="P(Parasitized) cut-off. Default: the model card's.")
@click.option("--threads", type=int, default=None, help="Inference threads (default: all cores).")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per inference batch.")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Live: seconds between classified frames (0: every frame).")
@click.option("--max-frames", type=int, default=None, help="Live: stop after classifying this many frames.")
@click.option("--retries", default=3, show_default=True, help="Live: reconnect attempts when the camera is lost.")
@click.option("--retry-wait", default=1.0, show_default=True, help="Live: seconds between reconnect attempts.")
@click.option("--show", is_flag=True, help="Live: show a window (needs a display and a GUI OpenCV; q quits).")
@click.option("--quiet", "-q", is_flag=True, help="No per-image rows on the terminal, only the summary and errors.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--resume", is_flag=True,
              help="Continue an existing --output file: inputs already in it are skipped (e.g. after a power cut).")
@click.option("--gradcam-class", "evidence", type=click.Choice(["label", "Parasitized"]), default="label",
              show_default=True, help="The class each Grad-CAM map explains: the label shown, or Parasitized "
                                      "for every cell (the most suspicious spot of a negative call).")
@click.option("--allow-failed-gate", is_flag=True,
              help="Run a model whose card says it failed the export parity gate (a warning is printed every run).")
@click.option("--field", "field_mode", is_flag=True,
              help="Whole fields: find every red cell, classify each, and count a corrected parasitemia over the "
                   "session (files, --video or --camera). Writes a session folder into --out.")
@click.option("--target-cells", type=click.IntRange(1), default=2000, show_default=True,
              help="Field: red cells to count; live runs stop there.")
@click.option("--operating-point", default=None,
              help="A named operating point of the model card (screening, counting, counting-fast). Field default: "
                   "counting-fast where the card has it (a small screen clears most healthy cells first; its counts "
                   "were measured for that whole rule), else counting.")
@click.option("--rbc-per-ul", type=float, default=5e6, show_default=True,
              help="Field: the patient's red cells per µL, for parasites/µL.")
@click.option("--cell-diameter", type=float, default=None,
              help="Field: red-cell diameter in pixels (default: estimated from each image).")
@click.version_option(package_name="malaria-edge", message="%(prog)s %(version)s")
def main(paths, model_path, camera, video, gradcam, panel, out, output, fmt, threshold, threads, batch, interval,
         max_frames, retries, retry_wait, show, quiet, overwrite, resume, evidence, allow_failed_gate, field_mode,
         target_cells, operating_point, rbc_per_ul, cell_diameter):
    """Classify blood-cell images as Parasitized or Uninfected.

    \b
    PATHS are image files, folders (searched recursively) or globs. Every input gets a row:
    path, label, prob_parasitized, model, status (ok/error), error. A bad file gets an error
    row and the run goes on; the exit code is 1 when any input failed.

    \b
    Examples:
      edge-infer examples/cells/ --gradcam --out runs/demo
      edge-infer cells/ -q --output runs/results.csv          (add --resume after an interruption)
      edge-infer --camera 0 --gradcam --interval 2
      edge-infer --video smear.mp4 --max-frames 50
      edge-infer --field examples/field/ --out runs/fields --output runs/cells.csv
      edge-infer --field --camera 0 --interval 3 --target-cells 2000
    """
    if sum(bool(x) for x in (paths, camera is not None, video is not None)) != 1:
        raise click.UsageError("give image PATHS, or --camera, or --video (one of them)")
    if batch < 1:
        raise click.UsageError("--batch must be at least 1")
    if output is not None and output.is_dir():
        raise click.UsageError(f"--output {output} is a folder: --output is the results file (.csv/.jsonl/.json); "
                               "--out is the folder for pictures and reports")
    if out.suffix.lower() in RESULT_SUFFIXES:
        raise click.UsageError(f"--out {out} looks like a results file: --out is the folder for pictures and "
                               f"reports; write rows with --output {out}")
    if overwrite and resume:
        raise click.UsageError("--overwrite and --resume contradict each other: pick one")
    if (overwrite or resume) and output is None:
        raise click.UsageError("--overwrite and --resume apply to an --output file; none was given")
    if resume and (field_mode or camera is not None or video is not None):
        raise click.UsageError("--resume continues a run over image files; a field session or a live run "
                               "starts its own session folder")
    if threshold is not None and not 0 < threshold < 1:
        raise click.UsageError("--threshold must be between 0 and 1")
    if field_mode and threshold is not None:
        raise click.UsageError("--threshold with --field: the parasitemia correction needs the sensitivity and "
                               "specificity measured at its threshold; choose a card's --operating-point instead")
    try:
        clf = Classifier.load(model_path, mode="field" if field_mode else "cell", threshold=threshold,
                              operating_point=operating_point,
                              gradcam=gradcam, threads=threads, allow_failed_gate=allow_failed_gate)
        if field_mode and clf.explainer is None and clf.model.card.explainer:
            clf.explainer = load_explainer_for(clf.model, threads)  # reports show Grad-CAM of the positive cells
    except (ModelError, CardError) as e:
        raise click.ClickException(str(e)) from None
    if gate_failed(clf.model.card):
        click.echo(f"warning: {clf.model.path.name} {gate_failed(clf.model.card)}: its labels may differ from the "
                   "float model's", err=True)
    opts = RunOptions(out=out, output=output, output_mode="overwrite" if overwrite else "resume" if resume else "new",
                      threshold=clf.threshold, evidence=evidence, fmt=fmt, batch=batch, panel=panel, quiet=quiet,
                      interval=interval, max_frames=max_frames, show=show, retries=retries, retry_wait=retry_wait)
    try:
        if field_mode:
            from edge.detect import DetectParams
            from edge.field import FieldOptions
            from edge.operating import describe
            fopts = FieldOptions.at(clf.point, target_cells=target_cells, rbc_per_ul=rbc_per_ul, batch=batch,
                                    detect=DetectParams(cell_diameter=cell_diameter))
            click.echo(f"{clf.model.path.name}: counting at {describe(clf.point)}", err=True)
            sys.exit(run_field(list(paths), camera, video, clf, opts, fopts))
        if camera is not None or video is not None:
            from edge.live import run_live
            from edge.camera import Source, parse_camera
            src = Source(str(video), is_file=True) if video is not None else parse_camera(camera)
            sys.exit(run_live(src, clf, opts))
        sys.exit(run_files(list(paths), clf, opts))
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write results: {e.strerror or e}") from None


def run_files(paths, clf: Classifier, opts: RunOptions) -> int:
    from edge.gradcam import overlay, save_png
    from edge.infer import batches, classify, expand_paths
    files = expand_paths(paths)
    if not files:
        raise click.ClickException("no image files found in " + ", ".join(paths))
    filewriter, done = open_results(opts.output, mode=opts.output_mode) if opts.output else (None, set())
    if done:
        before = len(files)
        files = [f for f in files if str(f) not in done]
        click.echo(f"resuming {opts.output}: {before - len(files)} inputs already there, {len(files)} to go", err=True)
    names = overlay_names(files) if clf.explainer is not None else {}
    term = Writer(sys.stdout, opts.fmt) if not opts.quiet else None
    n_ok = n_err = n_par = 0
    t0 = time.perf_counter()
    from tqdm import tqdm
    bar = tqdm(total=len(files), unit="img", disable=not opts.quiet or len(files) < 200, file=sys.stderr)
    try:
        for items in batches(files, clf.size, opts.batch, keep_rgb=clf.explainer is not None):
            rows, heat, cls = classify(items, clf, opts.evidence)
            for w in (term, filewriter):
                if w:
                    w.write(rows)
            if heat is not None:
                good = [(d, r) for d, r in zip(items, rows) if r.status == "ok"]
                for k, (d, r) in enumerate(good):
                    save_png(opts.out / names[d.path], overlay(d.rgb, heat[k], r.label, clf.calibrated(r.prob_parasitized),
                                                               panel=opts.panel, heat_class=clf.model.card.class_names[cls[k]]))
            for r in rows:
                if r.status == "error" and opts.quiet:
                    click.echo(f"error: {r.path}: {r.error}", err=True)
            n_ok += sum(r.status == "ok" for r in rows)
            n_err += sum(r.status == "error" for r in rows)
            n_par += sum(r.label == "Parasitized" for r in rows)
            bar.update(len(rows))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: every finished row is saved" + (" (continue with --resume)" if filewriter else ""),
                   err=True)
        click.echo(summary(n_ok, n_err, n_par), err=True)
        return 130
    finally:
        bar.close()
        for w in (term, filewriter):
            if w:
                w.close()
    dt = time.perf_counter() - t0
    click.echo(f"{summary(n_ok, n_err, n_par)}; {(n_ok + n_err) / max(dt, 1e-9):.0f} img/s with {clf.model.path.name}",
               err=True)
    if clf.explainer is not None:
        click.echo(f"Grad-CAM overlays in {opts.out}/", err=True)
    return 1 if n_err else 0


def run_field(paths, camera, video, clf: Classifier, opts: RunOptions, fopts) -> int:
    from edge.camera import CameraError, Source, frames, has_gui, parse_camera
    from edge.fieldrun import file_items, frame_items, run_session
    from edge.infer import expand_paths
    live = camera is not None or video is not None
    if live:
        src = Source(str(video), is_file=True) if video is not None else parse_camera(camera)
        show = opts.show
        if show and not has_gui():
            click.echo("no display or no GUI in this OpenCV build (headless): running without a window", err=True)
            show = False
        items = frame_items(frames(src, opts.retries, opts.retry_wait, log=lambda m: click.echo(m, err=True)),
                            opts.interval, show)
    else:
        files = expand_paths(paths)
        if not files:
            raise click.ClickException("no image files found in " + ", ".join(paths))
        items = file_items(files)
    try:
        session, sdir, code = run_session(items, clf.model, clf.explainer, fopts, opts.out, opts.output, stop_at_target=live,
                                          keep_frames=live, output_mode=opts.output_mode)
    except CameraError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    if live and not session.fields:
        click.echo(f"error: {src.describe()} gave no frames", err=True)
        code = code or 1
    e = session.estimate()
    lo, hi = e.parasitemia_ci95
    pct = "n/a" if e.rbc_count == 0 else f"{e.parasitemia_percent:.2f}% (95% interval {lo:.2f}-{hi:.2f}%)"
    raw = "n/a" if e.rbc_count == 0 else f"{e.raw_percent:.2f}%"
    click.echo(f"parasitemia {pct}; {e.positive_count} of {e.rbc_count} red cells called parasitized "
               f"(raw {raw}); target {fopts.target_cells} "
               f"{'reached' if session.target_reached else 'NOT reached'}; "
               f"{sum(f.status != 'ok' for f in session.fields)} of {len(session.fields)} fields not counted")
    click.echo(f"report: {sdir / 'report.html'}", err=True)
    if e.rbc_count == 0:
        click.echo("no red cells were counted: nothing plausible found in these images", err=True)
        code = code or 1
    return code


def overlay_names(files: list[Path]) -> dict[Path, str]:
    """A unique flat overlay file name per input: its path below the inputs' common folder, extension
    kept (a.png and a.jpg differ), '/' as '__'."""
    absolute = [f.resolve() for f in files]
    root = Path(os.path.commonpath([a.parent for a in absolute])) if absolute else Path("/")
    return {f: "__".join(a.relative_to(root).parts).replace(".", "_") + "_gradcam.png" for f, a in zip(files, absolute)}


if __name__ == "__main__":
    main()
