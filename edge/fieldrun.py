"""Run field mode over image files or camera/video frames: rows as they come, a session folder with an
overlay per field, session.json after every field, and report.html at the end."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import click
import cv2
import numpy as np

from edge.field import FieldOptions, FieldResult, Session, analyze, positive_maps
from edge.card import atomic_write_bytes
from edge.gradcam import save_png
from edge.images import ImageError, load_image
from edge.report import data_uri, encode, field_overlay, write_html, write_session
from edge.results import CELL_FIELDS, open_results, session_dir
from edge.runtime import Loaded

CROP_MAX_SIDE = 400


def cell_rows(res: FieldResult) -> list[dict]:
    return [{"path": res.path, "cell": c.cell, "box": list(c.box), "image_width": res.width,
             "image_height": res.height, "label": c.label,
             "prob_parasitized": None if c.prob_parasitized is None else round(c.prob_parasitized, 6),
             "status": c.status if res.status == "ok" else f"field {res.status}"} for c in res.cells]


def looks_like_one_cell(res: FieldResult) -> bool:
    """A single cell crop (the NIH crops are 40-394 px): too small to hold a field of cells worth counting."""
    return max(res.width, res.height) <= CROP_MAX_SIDE


def run_session(items: Iterable[tuple[str, np.ndarray | str]], model: Loaded, explainer: Loaded | None,
                opts: FieldOptions, out: Path, output: Path | None, stop_at_target: bool = False,
                keep_frames: bool = False, log=lambda m: click.echo(m, err=True), output_mode: str = "new"
                ) -> tuple[Session, Path, int]:
    """items: (name, RGB image) or (name, error message). Returns (session, its folder, exit code).
    The report's gallery holds the cells called Parasitized, so their maps explain that class."""
    rows = open_results(output, CELL_FIELDS, output_mode)[0] if output else None
    sdir = session_dir(out)
    (sdir / "overlays").mkdir()
    session = Session(opts)
    overlays, gallery, code, warned = [], [], 0, False
    try:
        for k, (name, img) in enumerate(items):
            if isinstance(img, str):
                res = FieldResult(name, 0, 0, "error", img)
                session.add(res)
                log(f"{name}: error: {img}")
                code = 1
            else:
                res = analyze(img, name, model, opts)
                if looks_like_one_cell(res):
                    res.status, res.reason = "error", "looks like a single cell crop, not a field: run without --field"
                    code = 1
                session.add(res)
                if rows:
                    rows.write(cell_rows(res))
                pic = field_overlay(img, res)
                stem = f"{k:04d}_{Path(name).stem}"
                atomic_write_bytes(sdir / "overlays" / f"{stem}.jpg", encode(pic))
                # kept encoded, not as pixels: a long live session must not grow by megabytes a field
                overlays.append((name, data_uri(cv2.resize(pic, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))))
                if keep_frames and res.status == "ok":
                    save_png(sdir / "fields" / f"{stem}.png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                heat = positive_maps(res, explainer)
                gallery += [(name, i, res.cells[i].prob_parasitized, rgb, heat[i]) for i, rgb in res.crops.items()]
                res.detection, res.crops = None, {}  # drawn and kept: a long live session holds counts, not pixels
                small = opts.detect.small_cell_px
                if res.status == "ok" and res.diameter_px < small and not warned:
                    log(f"warning: cells are {res.diameter_px:.0f} px across (< {small:.0f}): the camera resolution "
                        "is too low for the classifier; use a higher magnification or resolution")
                    warned = True
                msg = (f"{res.rbc} red cells, {res.positive} parasitized, cells {res.diameter_px:.0f} px, "
                       f"detect {res.seconds['detect'] * 1000:.0f} ms, classify {res.seconds['classify'] * 1000:.0f} ms"
                       if res.status == "ok" else f"{res.status}: {res.reason}")
                log(f"{name}: {msg}; session {session.rbc}/{opts.target_cells} red cells")
            write_session(sdir, session.summary(model))
            if stop_at_target and session.target_reached:
                log(f"target of {opts.target_cells} red cells reached")
                break
    except KeyboardInterrupt:
        log("interrupted: every finished field is saved")
        code = 130
    finally:
        if rows:
            rows.close()
        summary = session.summary(model)
        write_session(sdir, summary)
        write_html(sdir, summary, overlays, gallery, session.confirmed_table())
    return session, sdir, code


def file_items(paths: list[Path]) -> Iterator[tuple[str, np.ndarray | str]]:
    for p in paths:
        try:
            yield str(p), load_image(p)
        except ImageError as e:
            yield str(p), str(e).removeprefix(f"{p}: ")


def frame_items(frames, interval: float, show: bool) -> Iterator[tuple[str, np.ndarray]]:
    """A field every `interval` seconds of the stream (or on space with --show; q stops)."""
    last = None
    for n, t, frame in frames:
        key = (cv2.waitKey(1) & 0xFF) if show else -1
        if show:
            cv2.imshow("malaria-edge", frame)
        if key == ord("q"):
            return
        if show and interval <= 0 and key != ord(" "):
            continue
        if last is not None and t - last < interval and key != ord(" "):
            continue
        last = t
        yield f"frame_{n:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
