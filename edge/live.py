"""Live mode: classify camera or video frames at an interval, save annotated frames and a results log."""
from __future__ import annotations

from pathlib import Path

import click
import cv2

from edge.camera import CameraError, Source, frames, has_gui
from edge.card import label_of
from edge.gradcam import overlay, save_png
from edge.preprocess import resize_rgb
from edge.results import Row, Writer, open_output, summary
from edge.runtime import Loaded


def run_live(src: Source, model: Loaded, thr: float, explainer: Loaded | None, out: Path, interval: float,
             max_frames: int | None, show: bool, panel: bool, retries: int = 3, retry_wait: float = 1.0) -> int:
    """Returns the exit code: 0 on a clean end (video over, q, --max-frames), 1 if the camera failed, 130 on Ctrl-C."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "frames").mkdir(exist_ok=True)
    if show and not has_gui():
        click.echo("no display or no GUI in this OpenCV build (headless): running without a window", err=True)
        show = False
    log_path = out / "live_results.csv"
    fh = open_output(log_path)
    writer = Writer(fh, "csv")
    n_ok = n_par = 0
    last_t, code = None, 0
    click.echo(f"reading {src.describe()}; results → {log_path}; Ctrl-C{' or q' if show else ''} to stop", err=True)
    try:
        for n, t, frame in frames(src, retries, retry_wait, log=lambda m: click.echo(m, err=True)):
            grab = show and (cv2.waitKey(1) & 0xFF)
            if grab == ord("q"):
                break
            if last_t is not None and t - last_t < interval and grab != ord(" "):
                continue
            last_t = t
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            x = resize_rgb(rgb, model.size)[None]
            prob = float(model.predict(x)[0])
            heat = explainer.explain(x)[1][0] if explainer is not None else None
            label = label_of(prob, thr, model.card.class_names)
            name = f"frame_{n:06d}.png"
            annotated = overlay(rgb, heat, label, prob, panel=panel)
            save_png(out / "frames" / name, annotated)
            writer.write([Row(f"{src.spec}#{n}", label, prob, model.path.name, "ok")])
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
        writer.close()
        fh.close()
        if show:
            cv2.destroyAllWindows()
    click.echo(f"{summary(n_ok, 0, n_par)}; annotated frames in {out / 'frames'}", err=True)
    return code
