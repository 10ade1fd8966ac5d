"""Synthetic whole fields composed from real NIH cell crops, with their ground truth.

Field mode needs infected fields with known answers, and the real fields here are all from a healthy
slide. A synthetic field places real crops (their level-set masks: the non-black pixels) on a
smear-like background, touching and slightly overlapping, adds white-cell and platelet distractors,
defocus blur, uneven illumination, sensor noise, JPEG artefacts and optionally an eyepiece disc, at a
chosen parasitemia. Cells keep their native scale unless `scale` resizes the whole field.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np


@dataclass
class SynthParams:
    width: int = 2560  # at the crops' native scale, before `scale`
    height: int = 1920
    n_cells: int = 250  # attempted; fewer fit when the field is full
    parasitemia: float = 0.02  # share of the placed red cells drawn from Parasitized crops
    spacing: tuple[float, float] = (0.8, 1.05)  # centre distance / (r1 + r2): < 1 overlaps, ~1 touches
    wbc: int = 1  # white blood cells
    platelets: int = 6  # platelet clusters
    blur: float = 0.0  # Gaussian sigma (px at native scale)
    vignette: float = 0.15  # brightness lost at the corners
    noise: float = 2.0  # sensor noise, grey levels
    jpeg_quality: int | None = 90
    eyepiece: bool = False  # black outside a disc, as a phone through an eyepiece sees
    scale: float = 1.0  # resize the finished field (e.g. 0.5: cells half as wide)
    infected_scale: float = 1.0  # infected cells this much wider than the crops: P. vivax and P. ovale enlarge
    # the cells they infect (1.5-2× in late stages); the NIH crops are P. falciparum, which does not
    background: tuple[int, int, int] | None = None  # RGB between cells; None: from the crops' pale rims
    seed: int = 0


@dataclass
class Truth:
    x: float  # cell centre in the final image
    y: float
    r: float  # equivalent radius
    label: str  # Parasitized | Uninfected | White_Blood_Cell
    source: str = ""  # the crop it came from
    # where it was laid, at native scale: the crop's top-left corner and its quarter turns (np.rot90);
    # with its source crop this gives the cell's own mask in the field (benchmarks/recut.py; infected_scale 1)
    corner: tuple[int, int] = (0, 0)
    turns: int = 0

    def own_crop(self, crops: dict) -> np.ndarray:
        """The NIH crop this cell was laid from, turned as it was laid; crops: name -> RGB crop."""
        return np.ascontiguousarray(np.rot90(crops[self.source], self.turns))


@dataclass
class SynthField:
    rgb: np.ndarray
    truth: list[Truth] = field(default_factory=list)

    @property
    def red_cells(self) -> list[Truth]:
        return [t for t in self.truth if t.label != "White_Blood_Cell"]


def cell_mask(crop: np.ndarray) -> np.ndarray:
    """The cell in an NIH crop: its non-black pixels, largest component, holes filled."""
    m = (crop.max(axis=2) > 12).astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m)
    if n <= 1:
        return m.astype(bool)
    m = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(m, cs, -1, 1, -1)
    return m.astype(bool)


def smear_colour(crops: list) -> tuple[float, float, float]:
    """The slide's background colour, from the crops themselves: level-set masks keep a thin rim of
    background, the brightest few percent of a slide's cell pixels."""
    px = np.concatenate([c[cell_mask(c)] for _, c in crops[:40]]).astype(np.float32)
    lum = px.sum(1)
    bright = px[lum >= np.percentile(lum, 98)]
    return tuple(float(v) for v in np.clip(bright.mean(0) * 1.04, 0, 250))


def _background(h: int, w: int, colour, rng) -> np.ndarray:
    base = np.array(colour, np.float32) + rng.normal(0, 4, 3)
    low = cv2.resize(rng.normal(0, 1, (max(2, h // 160), max(2, w // 160), 3)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    return np.clip(base + 3 * low, 0, 255)


def _paste(canvas: np.ndarray, img: np.ndarray, mask: np.ndarray, cx: float, cy: float, light) -> bool:
    """Lay img (where mask) centred at (cx, cy), feathering the rim; False if it falls outside.
    Stained cells absorb light: img / light is its transmittance, and overlapping cells multiply theirs
    (Beer–Lambert), so an overlap is darker and a parasite under another cell stays visible."""
    h, w = mask.shape
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    H, W = canvas.shape[:2]
    if x0 < 0 or y0 < 0 or x0 + w > W or y0 + h > H:
        return False
    a = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.8)[..., None]
    region = canvas[y0:y0 + h, x0:x0 + w]
    t = np.clip(img.astype(np.float32) / np.maximum(np.asarray(light, np.float32), 1), 0, 1.1)
    region *= 1 - a + a * t
    return True


def _wbc(d: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """A white cell: a pale round cytoplasm around a dark, lobed purple nucleus."""
    s = int(d * rng.uniform(1.3, 1.8)) | 1
    img = np.zeros((s, s, 3), np.float32)
    mask = np.zeros((s, s), np.uint8)
    c = s // 2
    cv2.circle(mask, (c, c), c - 1, 1, -1)
    img[:] = (205, 175, 210)
    nuc = np.zeros((s, s), np.uint8)
    for _ in range(rng.integers(1, 4)):
        off = rng.normal(0, s * 0.1, 2)
        axes = (int(s * rng.uniform(0.15, 0.28)), int(s * rng.uniform(0.12, 0.22)))
        cv2.ellipse(nuc, (int(c + off[0]), int(c + off[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    img[nuc.astype(bool)] = (115, 45, 135)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255), mask.astype(bool)


def _platelets(d: float, rng) -> tuple[np.ndarray, np.ndarray]:
    s = max(5, int(d * rng.uniform(0.2, 0.45))) | 1
    img = np.zeros((s, s, 3), np.float32)
    mask = np.zeros((s, s), np.uint8)
    for _ in range(rng.integers(1, 5)):
        r = max(1, int(s * rng.uniform(0.12, 0.25)))
        cx, cy = rng.integers(r, s - r, 2)
        cv2.circle(mask, (int(cx), int(cy)), r, 1, -1)
    img[:] = (150, 60, 160)
    return img, mask.astype(bool)


def make_field(pos_crops: list, neg_crops: list, p: SynthParams = SynthParams()) -> SynthField:
    """pos_crops/neg_crops: lists of (name, RGB crop) to draw from (with replacement)."""
    rng = np.random.default_rng(p.seed)
    H, W = p.height, p.width
    light = p.background or smear_colour(neg_crops or pos_crops)  # the slide's colour where nothing absorbs
    canvas = _background(H, W, light, rng)
    placed: list[tuple[float, float, float]] = []
    truth: list[Truth] = []
    n_pos = int(rng.binomial(p.n_cells, p.parasitemia))
    labels = ["Parasitized"] * n_pos + ["Uninfected"] * (p.n_cells - n_pos)
    rng.shuffle(labels)
    d_typ = float(np.median([max(c.shape[:2]) for _, c in (neg_crops[:50] or pos_crops[:50])]))
    items = [("White_Blood_Cell", None)] * p.wbc + [(lab, None) for lab in labels]
    for lab, _ in items:
        if lab == "White_Blood_Cell":
            img, mask, name = *_wbc(d_typ, rng), "synthetic white cell"
        else:
            pool = pos_crops if lab == "Parasitized" else neg_crops
            name, crop = pool[int(rng.integers(len(pool)))]
            k = int(rng.integers(4))
            crop = np.rot90(crop, k).copy()
            if lab == "Parasitized" and p.infected_scale != 1.0:
                crop = cv2.resize(crop, None, fx=p.infected_scale, fy=p.infected_scale, interpolation=cv2.INTER_CUBIC)
            mask = cell_mask(crop)
            img = crop
        r = float(np.sqrt(mask.sum() / np.pi))
        for _ in range(40):  # dart throwing: a spot that keeps the spacing to every placed cell
            cx, cy = rng.uniform(r, W - r), rng.uniform(r, H - r)
            f = rng.uniform(*p.spacing)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= (f * (r + rr)) ** 2 for x, y, rr in placed):
                # the truth point is the centroid of the mask, which the paste centres on its box
                if _paste(canvas, img, mask, cx, cy, light):
                    ys, xs = np.nonzero(mask)
                    x0, y0 = round(cx - mask.shape[1] / 2), round(cy - mask.shape[0] / 2)  # as _paste lays it
                    placed.append((cx, cy, r))
                    truth.append(Truth(float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5), r, lab, name,
                                       (x0, y0), k if lab != "White_Blood_Cell" else 0))
                break
    # platelets in the gaps, as in a thin smear's monolayer, some touching a cell's rim (one lying on a
    # cell's middle is a purple dot no annotator would call, so none is put there)
    prng = np.random.default_rng([p.seed, 1])  # its own stream: the same seed lays the same cells
    for _ in range(p.platelets):
        img, mask = _platelets(d_typ, prng)
        half = mask.shape[0] / 2
        for _ in range(40):
            cx, cy = prng.uniform(half, W - half), prng.uniform(half, H - half)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= (rr + half) ** 2 for x, y, rr in placed):
                _paste(canvas, img, mask, cx, cy, light)
                break
    if p.blur > 0:
        canvas = cv2.GaussianBlur(canvas, (0, 0), p.blur)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rr = ((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / ((W / 2) ** 2 + (H / 2) ** 2)
    tilt = 1 + 0.05 * rng.uniform(-1, 1) * (xx / W - 0.5)
    canvas *= ((1 - p.vignette * rr) * tilt)[..., None]
    canvas += rng.normal(0, p.noise, canvas.shape)
    if p.eyepiece:
        disc = np.zeros((H, W), np.uint8)
        cv2.circle(disc, (W // 2, H // 2), int(0.48 * min(H, W)), 1, -1)
        canvas *= disc[..., None]
        inside = [(t.x - W / 2) ** 2 + (t.y - H / 2) ** 2 <= (0.48 * min(H, W) - t.r) ** 2 for t in truth]
        truth = [t for t, ok in zip(truth, inside) if ok]
    rgb = np.clip(canvas, 0, 255).astype(np.uint8)
    if p.scale != 1.0:
        rgb = cv2.resize(rgb, (round(W * p.scale), round(H * p.scale)), interpolation=cv2.INTER_AREA)
        truth = [replace(t, x=t.x * p.scale, y=t.y * p.scale, r=t.r * p.scale) for t in truth]
    if p.jpeg_quality:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality])
        rgb = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return SynthField(rgb, truth)


def load_crops(root, relpaths: list[str], labels: list[int], groups: list[str]) -> dict[str, tuple[list, list]]:
    """group → ((name, RGB crop) of its Parasitized cells, of its Uninfected cells). A field is one
    patient's slide, so fields are composed from one group's cells: one stain, one camera."""
    from pathlib import Path

    from edge.images import load_image
    out: dict[str, tuple[list, list]] = {}
    for rel, y, g in zip(relpaths, labels, groups):
        pos, neg = out.setdefault(g, ([], []))
        (pos if y == 1 else neg).append((Path(rel).name, load_image(Path(root) / rel)))
    return out
