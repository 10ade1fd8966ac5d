"""Classify many images: expand paths, decode in threads while the model runs, one row per input."""
from __future__ import annotations

import glob
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edge.classifier import Classifier
from edge.images import GREY_CHROMA, ImageError, is_image_path, load_image, stain_colour
from edge.preprocess import resize_rgb
from edge.results import Row
from edge.runtime import cpu_count


def expand_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders recursively (image files only), globs expanded; order kept."""
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and is_image_path(q))
        elif not p.exists() and glob.has_magic(s):
            out += sorted(Path(q) for q in glob.glob(s, recursive=True) if Path(q).is_file())
        else:
            out.append(p)  # a missing file becomes an error row, not a crash
    return out


@dataclass
class Decoded:
    path: Path
    rgb: np.ndarray | None  # original image (kept only for Grad-CAM overlays)
    x: np.ndarray | None  # model-size uint8
    error: str = ""


FIELD_PIXELS = 36  # × the model's input area: an image this large is many cells, not one
MAX_ASPECT = 3.0  # the NIH crops' longest side is at most 2.6× the shortest (1 of 22,061 over 2.5)


def not_a_cell(rgb: np.ndarray, size: int) -> str:
    """Why an image cannot be one cell crop for a model of this input size, or '' when it can be."""
    h, w = rgb.shape[:2]
    if h * w > FIELD_PIXELS * size * size:
        return f"{w}x{h} px looks like a whole field, not one cell: use --field"
    if max(h, w) > MAX_ASPECT * min(h, w):
        return f"{w}x{h} px is far from square: not a single cell crop (a field or a strip of cells? use --field)"
    if stain_colour(rgb) < GREY_CHROMA:
        return "no stain colour (a grayscale or monochrome image): the classifier needs the stain's colour"
    return ""


def _decode(path: Path, size: int, keep: bool) -> Decoded:
    try:
        rgb = load_image(path)
    except ImageError as e:
        return Decoded(path, None, None, str(e).removeprefix(f"{path}: "))
    if why := not_a_cell(rgb, size):
        return Decoded(path, None, None, why)
    return Decoded(path, rgb if keep else None, resize_rgb(rgb, size))


def batches(paths: list[Path], size: int, batch: int, keep_rgb: bool = False, workers: int | None = None
            ) -> Iterator[list[Decoded]]:
    """Decoded batches; the next batch decodes in a thread pool while the caller runs the current one."""
    workers = workers or min(4, cpu_count())
    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    with ThreadPoolExecutor(workers) as pool:
        def submit(i):
            return [pool.submit(_decode, p, size, keep_rgb) for p in chunks[i]] if i < len(chunks) else []
        ahead = submit(0)
        for i in range(len(chunks)):
            current, ahead = ahead, submit(i + 1)
            yield [f.result() for f in current]


def classify(items: list[Decoded], clf: Classifier, evidence: str = "label"
             ) -> tuple[list[Row], np.ndarray | None, np.ndarray | None]:
    """Rows for one decoded batch (errors included, in order), and for the good ones the heat maps and the
    class each explains (the label shown, unless evidence="Parasitized") when the classifier has an explainer."""
    good = [d for d in items if d.x is not None]
    probs, heat, cls = np.zeros(0), None, None
    if good:
        probs, heat, cls = clf.run(np.stack([d.x for d in good]), evidence)
    name = clf.model.path.name
    rows, k = [], 0
    for d in items:
        if d.x is None:
            rows.append(Row(str(d.path), "", None, name, "error", d.error))
        else:
            p = float(probs[k])
            rows.append(Row(str(d.path), clf.prediction(p).label, p, name, "ok"))
            k += 1
    return rows, heat, cls
