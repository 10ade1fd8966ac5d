"""Live mode: classify camera or video frames at an interval, save annotated frames and a results log."""
from __future__ import annotations

import click
import cv2

from edge.camera import CameraError, Source, frames, has_gui
from edge.classifier import Classifier
from edge.gradcam import overlay, save_png
from edge.options import RunOptions
from edge.preprocess import resize_rgb
from edge.results import Row, open_results, session_dir, summary


def run_live(src: Source, clf: Classifier, opts: RunOptions) -> int:
    """Classify frames into a new session folder under opts.out. Returns the exit code: 0 on a clean end
    (video over, q, --max-frames), 1 if the camera failed or gave no frame, 130 on Ctrl-C."""
    interval, show, max_frames = opts.interval, opts.show, opts.max_frames
    extra = [open_results(opts.output, mode=opts.output_mode)[0]] if opts.output else []  # refused before any folder
    sdir = session_dir(opts.out)
    (sdir / "frames").mkdir()
    if show and not has_gui():
        click.echo("no display or no GUI in this OpenCV build (headless): running without a window", err=True)
        show = False
    log_path = sdir / "live_results.csv"
    writer, _ = open_results(log_path)
    n_ok = n_par = 0
    last_t, code = None, 0
    click.echo(f"reading {src.describe()}; results → {log_path}; Ctrl-C{' or q' if show else ''} to stop", err=True)
    try:
        for n, t, frame in frames(src, opts.retries, opts.retry_wait, log=lambda m: click.echo(m, err=True)):
            grab = show and (cv2.waitKey(1) & 0xFF)
            if grab == ord("q"):
                break
            if last_t is not None and t - last_t < interval and grab != ord(" "):
                continue
            last_t = t
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            x = resize_rgb(rgb, clf.size)[None]
            probs, heats, classes = clf.run(x, opts.evidence)
            prob = float(probs[0])
            heat = None if heats is None else heats[0]
            cls = None if classes is None else clf.model.card.class_names[classes[0]]
            label = clf.prediction(prob).label
            name = f"frame_{n:06d}.png"
            annotated = overlay(rgb, heat, label, clf.calibrated(prob), panel=opts.panel, heat_class=cls)
            save_png(sdir / "frames" / name, annotated)
            for w in [writer, *extra]:
                w.write([Row(f"{src.spec}#{n}", label, prob, clf.model.path.name, "ok")])
            n_ok += 1
            n_par += label == "Parasitized"
            click.echo(f"frame {n:6d}  t={t:7.2f}s  {label:<11} p={prob:.3f}", err=True)
            if show:
                cv2.imshow("malaria-edge", annotated)
            if max_frames and n_ok >= max_frames:
                break
    except CameraError as e:
        click.echo(f"error: {e}", err=True)
        code = 1
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        code = 130
    finally:
        for w in [writer, *extra]:
            w.close()
        if show:
            cv2.destroyAllWindows()
    if n_ok == 0 and code == 0:
        click.echo(f"error: {src.describe()} gave no frames", err=True)
        code = 1
    click.echo(f"{summary(n_ok, 0, n_par)}; annotated frames in {sdir / 'frames'}", err=True)
    return code
