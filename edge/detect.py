"""Find every red blood cell in a whole field photo (classical: OpenCV and NumPy, no model).

The scale comes from the image: a first pass on a small preview estimates the cell diameter from
the distance transform's peaks (a larger preview when cells are too small to measure on it), then
detection runs at a resolution where a cell is `DetectParams.work_diameter` pixels across, and boxes
and masks are mapped back to full resolution.

Steps at working resolution: the eyepiece disc (a bright disc on black, if any) bounds the field;
cells differ in colour from the locally estimated background (Otsu on the colour distance inside the
field; rings broken at pale centres closed, holes filled); touching cells are split by a seeded partition of the foreground, one seed per peak of the
distance transform (a region too large for one cell split again with only pale-centre-sized holes filled,
since a gap closed in by a ring of cells is filled too); each region is then accepted or rejected with a reason (cut by the image or
eyepiece edge, too small for a red cell: platelet or debris, too large: an unsplit clump, or a white
blood cell: mostly nucleus-dark stain, or a large region with much of it). What is cropped of a cell
stops short of a touching neighbour (Cell.crop_mask), or, for a model whose card asks for it, is completed
over the neighbour's region (DetectParams.complete_overlap); the detection itself is the split region.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

SATURATED = 250  # grey level: a pixel at or over it in every channel is clipped white, nothing to see in it


@dataclass(frozen=True)
class DetectParams:
    """Every detection parameter, in one place. Sizes are relative to the cell diameter."""
    cell_diameter: float | None = None  # px at full resolution; None: estimated from the image
    work_diameter: float = 30.0  # cell diameter (px) at the working resolution
    preview_side: int = 600  # longest side of the preview that estimates the scale
    preview_cell: float = 12.0  # px: cells smaller than this in the preview are measured again on a larger one
    preview_regrow: float = 1.5  # cells measured over this × the background window's cell size: measured again
    preview_max_side: int = 2400  # the larger preview's longest side at most
    # × the preview's area: holes filled before the cells are measured on it (pale centres; at high magnification
    # a cell's is large), and, where that makes the field one "cell" (below), the smaller limit: where cells
    # crowd, the gaps between them are holes too, and filling them all made one blob of the field (a synthetic
    # field of patient 116 whose cells overlap by 10-30% measured 730 px per 132-px cell and counted nothing)
    preview_fill: float = 0.02
    preview_fill_crowded: float = 0.002
    # where the larger fill measures over this × the smaller one, it filled the gaps between crowded cells, not
    # pale centres (at 1.8-3× magnification the two agree), and the smaller one's size is taken: dense synthetic
    # fields measured at up to twice their cell size merged their cells into clumps (one-to-one detections on
    # the test patients' dense fields 0.40 -> 0.56; benchmarks/results/preview_fill/)
    preview_fill_agree: float = 1.5
    min_diameter: float = 8.0  # below this many px per cell at full resolution nothing is found
    # a field holds at least this many cells across its shorter side: a larger "cell" is one object (a cell
    # crop, an inverted photo's eyepiece disc, a thin strip of noise), and measuring the scale on it is slow
    min_cells_across: float = 3.0
    eyepiece_dark: float = 0.22  # pixels darker than this share of the bright field are outside the eyepiece
    # grey levels: rows and columns at an edge that vary less than this in every channel, white or unlike the
    # photo beside them, are a frame or padding round it (a white one read as 37% saturated and a 518 px
    # "cell"), left outside like the eyepiece's black; a photo's own lines vary more (noise, vignetting)
    flat_border: int = 6
    # fill at the border (a photo turned with white or grey corners): regions touching the border, over
    # fill_share and under half of the image, filling over fill_solid of their convex hull, that are saturated
    # white, or flat grey (see border_fill) of another colour than the field's background. An overexposed
    # field's saturated background, or a denoised photo's flat one, is not solid (the cells are holes in it)
    # and stays field
    fill_share: float = 0.002
    fill_solid: float = 0.9
    min_area: float = 0.30  # × median cell area: smaller regions are platelets or debris
    max_area: float = 2.6  # × median cell area: larger regions are unsplit clumps, unless round (below)
    # A region up to round_max_area × the median area is one enlarged cell, not a clump, when the largest
    # circle inside it has over round_fill of its equivalent radius (a disc: 1; two cells that overlap by a
    # fifth: 0.73; synthetic clumps of 3-5 cells: 0.59-0.86, median 0.76). P. vivax and P. ovale enlarge the
    # cells they infect 1.5-2×; falciparum crops enlarged 1.8× in synthetic fields measure 0.76-0.94, median 0.87.
    round_max_area: float = 4.5
    round_fill: float = 0.85
    close_rings: float = 0.12  # × diameter: closing that mends rings broken at a pale centre
    fill_holes: float = 0.6  # × cell area: holes up to this size (pale centres) are filled
    # × cell area: a region too large for one cell that is not round is split again with only the holes up to
    # this size filled, as large as a pale centre gets (95th percentile 0.22-0.36 of the cell on the real and
    # synthetic fields): a gap of background closed in by a ring of touching cells was filled as if it were a
    # pale centre, and its seed took the cells round it into one clump
    clump_holes: float = 0.25
    # A hole the fill closes is a gap between touching cells, not a pale centre, when it is about as light as the
    # background (mean green within gap_pale of the way from the background's level to the cells') and fills under
    # gap_fill of its box (a gap between round cells is a concave triangle; a pale centre is round). Such gaps are
    # left open where the seeds are found, and the cells are still filled whole. Filled, they made cells that
    # overlap one mass whose distance transform peaked between them, and its seeds cut polygons across them. On
    # the validation patients' fields (benchmarks/results/gap_seeds/), one-to-one detections per cell: real photos
    # 0.977 -> 0.981, benchmark spacing 0.947 -> 0.972, crowded 0.720 -> 0.874, dense 0.553 -> 0.743. Without
    # the colour test, irregular pale centres were gaps too, and real cells were cut in two (precision 0.944).
    gap_fill: float = 0.6
    gap_pale: float = 0.25
    seed_spacing: float = 0.55  # × radius: distance-transform peaks closer than this merge into one seed
    seed_height: float = 0.45  # × radius: peaks lower than this seed no cell
    edge_margin: int = 2  # working px: a region this close to the image or eyepiece edge touches it
    # × diameter: the band inside the eyepiece disc's rim, where the field darkens into the black outside,
    # is left out before cells are found: by colour it is foreground, and cells beside it took a tail of it
    # (kept as whole, crops with a dark streak). 0.1 on the 4 real photos: recall 0.993 → 0.988, precision
    # in the disc 0.944 → 0.954; on 12 synthetic eyepiece fields 0.977 → 0.972 and 0.916 → 0.934.
    rim_halo: float = 0.1
    whole_at_edge: float = 0.9  # × median cell area: a region touching an edge but this large is whole enough
    # Stain, as depth below the cells' level in units of (background − cell level): a region whose
    # pixels are over stain_share deep-dark (below deep_level), or over wbc_dark_share dark (below
    # nucleus_level) with a core over wbc_deep_share deep-dark and larger than wbc_area, is a white cell,
    # or a platelet clump when smaller than platelet_area. Red cells of cell size with a dark parasite in
    # them stay red cells, and so do darkly stained ones: with 60% at 0.5 deep the rule took 7% of the
    # validation patients' infected cells (2% of the uninfected) in synthetic fields for white cells; with
    # 45% at 1.0, 1.7% (0.3%), and the real neutrophil still under a hue shift of the stain. Without the
    # deep core it took 13-17% of infected cells made 1.3-1.8x as wide (as P. vivax makes them) for white
    # cells, 2% with it: infected crops are 2% deep-dark at the median, 15% at the 95th percentile, the
    # real neutrophil 51%.
    nucleus_level: float = 0.5
    deep_level: float = 1.0
    wbc_dark_share: float = 0.35
    wbc_deep_share: float = 0.25
    stain_share: float = 0.45
    wbc_area: float = 1.3  # × median cell area
    platelet_area: float = 0.6  # × median cell area
    mask_dilate: float = 0.04  # × diameter: grow masks so the crop keeps the cell's rim
    # × diameter: what is cropped of a cell grows into background only, and stops this far short of a
    # touching neighbour's region. A crop that takes in a neighbour's edge takes in its parasite too: on synthetic
    # fields of the validation patients (counting-fast, 8,000 cells per level) specificity went 0.9895 /
    # 0.9877 / 0.9843 → 0.9912 / 0.9898 / 0.9880 at 0.5 / 2 / 5% parasitemia, sensitivity 0.810 / 0.839 /
    # 0.808 → 0.786 / 0.832 / 0.757; the sessions' corrected bias +0.59 / +0.72 / +0.59 → +0.37 / +0.47 /
    # −0.09 points (growing into background only, with no gap: +0.57 / +0.57 / +0.28). The detection
    # (Cell.mask, scored and drawn) is not changed.
    split_gap: float = 0.04
    # × diameter; 0: off (set per model by its card's field_crops). Where a cell touches neighbours and enough of
    # its rim is free (min_free_rim of it), an ellipse fitted to the free rim, grown by this much, gives the crop
    # back the part of the cell the split gave to a neighbour (where a parasite on the rim is); there the crop
    # keeps no gap. Clean synthetic fields of the validation patients at 5%, shipped MobileNetV2 at counting:
    # sensitivity / specificity 0.781 / 0.9915 → 0.858 / 0.9877 at 0.067 (the cells' own masks: 0.920 / 0.9915).
    # A model trained on such crops was measured and not shipped (benchmarks/results/candidates/mnv2_completed/).
    complete_overlap: float = 0.0
    min_free_rim: float = 0.35
    small_cell_px: float = 50.0  # warn when cells are smaller than this at full resolution (the classifier
    # needs the parasite's few pixels)


@dataclass
class Cell:
    box: tuple[int, int, int, int]  # x, y, w, h at full resolution
    mask: np.ndarray = field(repr=False)  # bool, h×w: the cell inside its box
    centre: tuple[float, float]  # x, y at full resolution
    area_px: float  # at full resolution
    roundness: float  # 4πA/P² at working resolution: 1 for a disc
    status: str = "ok"  # ok | cut | small | large | wbc | platelets
    # what is cropped, where it differs from `mask` (the detection): the mask short of touching neighbours
    # (DetectParams.split_gap), or completed over them (complete_overlap); bool, in crop_box (None: box)
    crop_mask: np.ndarray | None = field(default=None, repr=False)
    crop_box: tuple[int, int, int, int] | None = None
    # share of the mask within split_gap of a touching neighbour's region (0 when none touches): where a
    # parasite on the rim a neighbour touches is cut away, and field mode's sensitivity goes
    shared: float = 0.0


@dataclass
class Detection:
    cells: list[Cell]  # every region, accepted (status ok) or rejected with its reason
    diameter_px: float  # estimated (or given) cell diameter at full resolution
    scale: float  # working resolution / full resolution
    eyepiece: np.ndarray | None = field(default=None, repr=False)  # bool mask at working resolution
    work: np.ndarray | None = field(default=None, repr=False)  # the image at working resolution
    labels: np.ndarray | None = field(default=None, repr=False)  # the split regions at working resolution, 0 between cells
    threshold: float = 0.0  # the colour-distance cut between cells and background
    background_level: float = 0.0
    cell_level: float = 0.0
    note: str = ""  # why nothing was found, when nothing was

    @property
    def accepted(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "ok"]


def _shrink(img: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _flat_lines(lines: np.ndarray, tol: int, step: int = 16) -> int:
    """How many leading lines (lines × pixels × channels) are each of one flat colour, a block at a time
    after the first line alone (a photo's own first line varies: one line's cost)."""
    first = lines[0]
    if ((first.max(axis=0).astype(np.int16) - first.min(axis=0)) > tol).any():
        return 0
    for i in range(0, len(lines), step):
        block = lines[i:i + step]
        varies = np.flatnonzero(((block.max(axis=1).astype(np.int16) - block.min(axis=1)) > tol).any(axis=1))
        if varies.size:
            return i + int(varies[0])
    return len(lines)


def flat_border(rgb: np.ndarray, tol: int) -> tuple[int, int, int, int]:
    """The frame or padding round a photo: at each edge (top, bottom, left, right) the lines counted inward that
    are each one flat colour (every channel within tol), white or unlike the photo beside them. Flat lines of
    the field's own background (a noise-free image) are field. A photo without a frame costs one line a side."""
    H, W = rgb.shape[:2]
    top = _flat_lines(rgb, tol)
    if top == H:
        return H, 0, 0, 0
    bottom = _flat_lines(rgb[::-1], tol)
    inner = rgb[top:H - bottom]
    left = _flat_lines(inner.transpose(1, 0, 2), tol)
    if left == W:  # every column flat (stripes)
        return top, bottom, W, 0
    right = _flat_lines(inner[:, ::-1].transpose(1, 0, 2), tol)
    # A side's flat lines are a frame when white (nothing to see in them) or of another colour than the band of
    # b lines beside them, along the whole side (a band, not one line: a JPEG frame rings where it meets the
    # photo). The ringing lines, mostly of the frame's colour, are frame too: else cells at the photo's edge
    # touch them, not the frame, and are counted whole.
    b, ring = 64, 16
    sides = ((top, rgb[0, 0], rgb[top:top + b], lambda i: rgb[i, left:W - right]),
             (bottom, rgb[H - 1, 0], rgb[max(top, H - bottom - b):H - bottom],
              lambda i: rgb[H - 1 - i, left:W - right]),
             (left, inner[0, 0], rgb[:, left:left + b], lambda j: inner[:, j]),
             (right, inner[0, W - 1], rgb[:, max(left, W - right - b):W - right], lambda j: inner[:, W - 1 - j]))

    def off(a: np.ndarray, colour: np.ndarray) -> bool:  # a's median colour is not the frame's
        return bool(np.abs(np.median(a.reshape(-1, a.shape[-1]), axis=0) - colour).max() > 3 * tol)

    def frame(n: int, colour: np.ndarray, beside: np.ndarray, line, limit: int) -> int:
        if n == 0 or (colour.min() < SATURATED and not off(beside, colour)):
            return 0
        end = min(n + ring, limit)
        return next((i for i in range(n, end) if off(line(i), colour)), end)

    limits = (H - bottom, H - top, W - right, W - left)
    return tuple(frame(n, colour.astype(np.int16), beside, line, limit)
                 for (n, colour, beside, line), limit in zip(sides, limits))


def border_fill(rgb: np.ndarray, p: DetectParams, high: np.ndarray) -> np.ndarray | None:
    """Fill that a photo turned or cut at a slant gets at its corners or sides: white, or a flat grey (every
    channel within flat_border grey levels over 3×3 pixels, the channels within twice that of each other) unlike
    the field's background, as DetectParams.fill_* define it; None when there is none. Grey fill darker than the
    background was foreground and split into a row of "cells"; the slide's own background, as flat in a denoised
    phone JPEG, is tinted and full of holes. high: the image's largest channel (_brightest)."""
    low = cv2.min(cv2.min(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    H, W = low.shape
    white = low >= SATURATED
    grey = ((high.astype(np.int16) - low) <= 2 * p.flat_border) & (high > p.eyepiece_dark * 255)  # black: outside
    if cv2.countNonZero((white | grey).astype(np.uint8)) < p.fill_share * H * W:
        return None
    k = np.ones((3, 3), np.uint8)
    flat = np.all([cv2.dilate(c, k).astype(np.int16) - cv2.erode(c, k) <= p.flat_border
                   for c in cv2.split(rgb)], axis=0)
    candidate = white | (grey & flat)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(candidate.astype(np.uint8), connectivity=8)
    fill = np.zeros((H, W), bool)
    background = None
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if not p.fill_share * H * W <= area <= 0.5 * H * W or not (x == 0 or y == 0 or x + w == W or y + h == H):
            continue
        region = lab[y:y + h, x:x + w] == i
        if area < p.fill_solid * max(1.0, cv2.contourArea(cv2.convexHull(cv2.findNonZero(region.astype(np.uint8))))):
            continue
        colour = np.median(rgb[y:y + h, x:x + w][region], axis=0)
        if colour.min() < SATURATED:  # grey: fill only where it is not the background's own colour
            if background is None:  # the field's background: the brightest tenth of what is no candidate
                rest = ~candidate
                background = (np.median(rgb[rest & (high >= _percentile_u8(high[rest], 90))], axis=0)
                              if rest.any() else colour)
            if np.abs(colour - background).max() <= 3 * p.flat_border:
                continue
        fill[y:y + h, x:x + w] |= region
    return fill if fill.any() else None


def eyepiece_mask(rgb: np.ndarray, p: DetectParams) -> np.ndarray:
    """The bright field of view: everything not dark, as one filled region (the whole image if no disc),
    less any fill at the image's border."""
    v = _brightest(rgb)
    fill = border_fill(rgb, p, v)
    field = _disc(v, p)
    return field if fill is None else field & ~fill


def _brightest(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's largest channel."""
    return cv2.max(cv2.max(rgb[..., 0], rgb[..., 1]), rgb[..., 2])  # NumPy's max over a 3-long axis is 10× slower


def _disc(v: np.ndarray, p: DetectParams) -> np.ndarray:
    """The bright field of view in v, each pixel's largest channel."""
    bright = _percentile_u8(v, 95)
    inside = (v > p.eyepiece_dark * bright).astype(np.uint8)
    if inside.mean() > 0.97:
        return np.ones(v.shape, bool)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inside, connectivity=8)
    if n <= 1:
        return np.zeros(v.shape, bool)
    big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    disc = (lab == big).astype(np.uint8)
    # close the disc's holes (dark stain, a white cell's nucleus) without leaking past its rim
    k = max(3, int(0.02 * max(v.shape)) | 1)
    disc = cv2.morphologyEx(disc, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return _fill_holes(disc.astype(bool), max_area=None)


def _percentile_u8(v: np.ndarray, q: float) -> float:
    """np.percentile(v, q) (linear interpolation) of a uint8 image, from its histogram: no sort."""
    cum = np.cumsum(np.bincount(v.ravel(), minlength=256))
    pos = q / 100 * (cum[-1] - 1)
    lo = int(np.searchsorted(cum, np.floor(pos), side="right"))
    hi = int(np.searchsorted(cum, np.ceil(pos), side="right"))
    return float(lo + (hi - lo) * (pos - np.floor(pos)))


def _fill_holes(mask: np.ndarray, max_area: float | None, holes_over: float | None = None,
                gaps: tuple[np.ndarray, float, float] | None = None):
    """Fill background regions enclosed by the mask (all, or those up to max_area pixels). With holes_over:
    also the filled holes larger than that, as (y0, x0, their mask in its box). With gaps = (green, light,
    box share): also the filled holes that are gaps between touching cells, not pale centres (mean green at
    least `light`, filling under that share of their box; DetectParams.gap_fill, gap_pale), as one mask or None
    where there are none: found here, while the holes' labels exist (a second labelling of a 16 MP field costs
    64 MB)."""
    inv = (~mask).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    del inv
    if n <= 1:  # no holes: the same shapes of answer as below
        if holes_over is None:
            return mask
        return (mask, []) if gaps is None else (mask, [], None)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = ~touches
    if max_area is not None:
        fill &= area <= max_area
    fill[0] = False
    filled = mask | fill[lab]
    if holes_over is None:
        return filled
    large = [(y[i], x[i], lab[y[i]:y[i] + bh[i], x[i]:x[i] + bw[i]] == i) for i in np.flatnonzero(fill & (area > holes_over))]
    if gaps is None:
        return filled, large
    green, light, share = gaps
    loose = fill & (area < share * bw * bh)
    if not loose.any():
        return filled, large, None
    at = loose[lab]
    ids = lab[at]
    mean = np.bincount(ids, weights=green[at], minlength=n) / np.maximum(area, 1)
    del at, ids
    gap = loose & (mean >= light)
    return filled, large, (gap[lab] if gap.any() else None)


def _otsu(values: np.ndarray) -> float:
    t, _ = cv2.threshold(values.reshape(-1, 1).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def estimate_diameter(fg: np.ndarray) -> float | None:
    """Median cell diameter (px) from the distance transform's regional maxima: each cell, isolated or in
    a clump, has one peak whose height is its radius."""
    dt = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    if dt.max() < 2:
        return None
    peaks = (dt == cv2.dilate(dt, np.ones((5, 5), np.uint8))) & (dt >= 2)
    vals = dt[peaks]
    if len(vals) == 0:
        return None
    vals = vals[vals >= 0.5 * np.percentile(vals, 90)]  # edge ripples make low, spurious peaks
    return float(2 * np.median(vals))


def _foreground(rgb: np.ndarray, inside: np.ndarray, d: float) -> tuple[np.ndarray, float, float, float]:
    """Cells differ in colour from the pale background between them (darker and more saturated under
    Giemsa and most stains; pale centres less so). The background is estimated locally — the brightest
    colour within a few cell diameters, smoothed — so uneven illumination and vignetting cancel; Otsu
    then cuts the RGB distance from it."""
    g = rgb[..., 1]
    vals = g[inside]
    if len(vals) < 100 or int(vals.max()) - int(vals.min()) < 10:
        return np.zeros_like(inside), 0.0, 0.0, 0.0
    k = max(3, int(2.5 * d) | 1)
    src = cv2.bitwise_and(rgb, rgb, mask=inside.view(np.uint8))  # np.where: 17× slower
    local = cv2.dilate(src, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    del src
    local = cv2.blur(local, (k, k))
    # |pixel − local| is exact in uint8, and each channel's square is added into one float32 plane: no
    # float copy of the three-channel image (0.5 GB of them at full resolution), 3× faster than squaring one
    dist = np.zeros(rgb.shape[:2], np.float32)
    for c in cv2.split(cv2.absdiff(rgb, local)):
        cv2.accumulateSquare(c, dist)
    dist = cv2.sqrt(dist, dst=dist)
    d_in = dist[inside]
    t = _otsu(np.clip(d_in, 0, 255, out=d_in))
    del d_in
    fg = (dist > t) & inside
    bg = inside & ~fg
    bg_level = _percentile_u8(g[bg], 50) if bg.any() else float(np.median(vals))
    cell_level = _percentile_u8(g[fg], 50) if fg.any() else bg_level
    return fg, t, bg_level, cell_level


def detect(rgb: np.ndarray, params: DetectParams = DetectParams()) -> Detection:
    """Every cell region in an RGB field, with full-resolution boxes and masks."""
    p = params
    H, W = rgb.shape[:2]
    top, bottom, left, right = flat_border(rgb, p.flat_border)
    if top == H or left == W:
        return Detection([], 0.0, 1.0, work=rgb,
                         note="no cells found (every row or column of the image is one flat colour)")
    sides = ([rgb[0, 0]] * (top > 0) + [rgb[-1, 0]] * (bottom > 0) + [rgb[top, 0]] * (left > 0)
             + [rgb[top, -1]] * (right > 0))
    if any(int(c.max()) > p.eyepiece_dark * 255 for c in sides):  # a bright frame: black, as outside an eyepiece
        framed, rgb = rgb, np.zeros_like(rgb)
        rgb[top:H - bottom, left:W - right] = framed[top:H - bottom, left:W - right]
    diameter = p.cell_diameter
    if diameter is None:
        diameter, d = _preview_diameter(rgb, p.preview_side, p)
        if not p.preview_cell <= d <= p.preview_side / 4 and max(H, W) > p.preview_side:
            # cells too small to measure in the preview (or none, or one blob found): measure on a larger one
            diameter, _ = _preview_diameter(rgb, p.preview_max_side, p)
    if not diameter or diameter < p.min_diameter:
        return Detection([], float(diameter or 0), 1.0, work=rgb, note="no cells found (nothing cell-sized in the image)")
    if diameter * p.min_cells_across > min(H, W):
        return Detection([], float(diameter), 1.0, work=rgb,
                         note=f"no cells found (a cell would be {diameter:.0f} px, over 1/{p.min_cells_across:g} of "
                              f"the image's {min(H, W)} px side: not a field of cells)")
    scale = min(1.0, p.work_diameter / diameter)
    work = _shrink(rgb, scale)
    disc = eyepiece_mask(work, p)
    det = Detection([], float(diameter), scale, disc, work)
    halo = round(p.rim_halo * p.work_diameter)
    inside = disc
    if halo and not disc.all():
        inside = cv2.erode(disc.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * halo + 1,) * 2),
                           borderType=cv2.BORDER_CONSTANT, borderValue=1).astype(bool)
    fg, det.threshold, det.background_level, det.cell_level = _foreground(work, inside, p.work_diameter)
    if not fg.any():
        det.note = "no cells found (no contrast between cells and background)"
        return det
    d = diameter * scale
    r = d / 2
    cell_area = np.pi * r * r
    k3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, k3)
    kc = max(3, int(p.close_rings * d) | 1)  # close rings broken at a pale centre, so filling finds them
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kc, kc))).astype(bool)
    light = det.background_level - p.gap_pale * (det.background_level - det.cell_level)
    fg, gaps, open_gaps = _fill_holes(fg, p.fill_holes * cell_area, holes_over=p.clump_holes * cell_area,
                                      gaps=(work[..., 1], light, p.gap_fill))
    seed_fg = None if open_gaps is None else np.greater(fg, open_gaps, out=open_gaps)  # fg & ~gaps, in place
    labels, n = _split(fg, r, p, seed_fg)
    del seed_fg, open_gaps
    labels, n, boxes = _split_clumps(labels, n, gaps, r, p)
    det.labels = labels
    if n == 0:
        det.note = "no cells found"
        return det
    det.cells = _regions(rgb, work, labels, n, inside, det, p, boxes)
    if not det.accepted:
        det.note = "no plausible red cells found (every region was rejected)"
    return det


def _preview_diameter(rgb: np.ndarray, side: float, p: DetectParams) -> tuple[float | None, float]:
    """Cell diameter at full resolution (None if nothing cell-sized) and in the preview that measured it.
    The background is looked for within a window sized for small cells; cells measured much larger than
    that are measured again with a window their size, since inside a large cell the small window takes
    its pale centre for background and the ring around it for the cell (a field at 200 px per cell,
    1,800 px wide, measured 92 px)."""
    s = min(1.0, side / max(rgb.shape[:2]))
    pv = _shrink(rgb, s)
    inside = eyepiece_mask(pv, p)
    guess = max(8.0, 0.02 * max(pv.shape))

    def no_field(v: float) -> bool:  # a "cell" this wide leaves no field of cells in the preview
        return v * p.min_cells_across > min(pv.shape[:2])
    for _ in range(3):
        fg, *_ = _foreground(pv, inside, guess)
        filled, large = _fill_holes(fg, max_area=p.preview_fill * fg.size, holes_over=p.preview_fill_crowded * fg.size)
        d = estimate_diameter(filled)
        if d and large:  # measured again as the smaller fill leaves it: the gaps between crowded cells open
            for y0, x0, hole in large:
                filled[y0:y0 + hole.shape[0], x0:x0 + hole.shape[1]] &= ~hole
            small = estimate_diameter(filled)
            if small and not no_field(small) and (no_field(d) or d > p.preview_fill_agree * small):
                d = small
        if not d or d <= p.preview_regrow * guess or no_field(d):
            break
        guess = d
    return (d / s, d) if d else (None, 0.0)


def _split(fg: np.ndarray, r: float, p: DetectParams, seed_fg: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """One label per cell: seeds at distance-transform peaks; each foreground pixel goes to its nearest
    seed within its own connected component (touching round cells split along their neck). seed_fg: the
    part of fg the seeds are found in (fg less the gaps between cells that the hole fill closed)."""
    fg8 = np.ascontiguousarray(fg).view(np.uint8)  # 0/1 without a copy: 16 MB less on a 16 MP field
    seed8 = fg8 if seed_fg is None else seed_fg.view(np.uint8)
    dt = cv2.distanceTransform(seed8, cv2.DIST_L2, 5)
    k = max(3, int(2 * p.seed_spacing * r) | 1)
    top = cv2.dilate(dt, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    peaks = dt >= np.subtract(top, 1e-3, out=top)
    del top
    peaks &= dt >= p.seed_height * r
    # merge plateau pixels and near peaks into one seed
    m = max(3, int(p.seed_spacing * r) | 1)
    seeds = cv2.dilate(peaks.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (m, m))) & seed8
    del peaks, seed8
    nseed, seed_lab = cv2.connectedComponents(seeds, connectivity=8)
    if nseed <= 1:
        return np.zeros(fg.shape, np.int32), 0
    # each whole-image array is let go once what is needed of it at the seeds is read, and the components
    # are labelled only after the nearest seeds (a field at full resolution holds 45 MB in each)
    ys, xs = np.nonzero(seeds)
    seed_ids, depth = seed_lab[ys, xs], dt[ys, xs]
    del seed_lab, dt
    nearest = cv2.distanceTransformWithLabels((seeds == 0).view(np.uint8), cv2.DIST_L2, 5,
                                              labelType=cv2.DIST_LABEL_CCOMP)[1]
    remap = np.zeros(int(nearest.max()) + 1, np.int32)  # nearest's labels → seed labels, read at the seeds
    remap[nearest[ys, xs]] = seed_ids
    lab = remap[nearest]
    del nearest
    cc = cv2.connectedComponents(fg8, connectivity=8)[1]
    del fg8
    # the component each seed belongs to: that of its deepest pixel (a seed may straddle two)
    seed_cc = np.zeros(nseed, np.int32)
    best = np.full(nseed, -1.0)
    np.maximum.at(best, seed_ids, depth)
    at = depth == best[seed_ids]
    seed_cc[seed_ids[at]] = cc[ys[at], xs[at]]
    keep = seed_cc[lab] == cc
    del cc
    keep &= fg
    lab[~keep] = 0
    return lab, nseed - 1


def _typical_area(areas: np.ndarray, present: np.ndarray) -> float:
    """The typical cell's area: the median of the regions that are neither tiny nor huge."""
    a = areas[present]
    return float(np.median(a[(a > 0.3 * np.median(a)) & (a < 3 * np.median(a))])) if len(a) else 1.0


def _is_clump(region: np.ndarray, area: float, med: float, p: DetectParams) -> bool:
    """Too large for one cell, and not round enough to be one enlarged cell."""
    return area > p.max_area * med and (area > p.round_max_area * med or _fill(region) < p.round_fill)


def _split_clumps(labels: np.ndarray, n: int, gaps: list, r: float, p: DetectParams) -> tuple[np.ndarray, int, tuple]:
    """Each clump split again with the filled holes larger than a pale centre (gaps: _fill_holes' holes_over,
    DetectParams.clump_holes) opened again, its parts given new labels; a clump that does not part stays
    as it was. Returns the labels, their number and their _bboxes."""
    slices, centroids, areas = _bboxes(labels, n)
    present = np.nonzero(areas[1:])[0] + 1
    if len(present) == 0:
        return labels, n, (slices, centroids, areas)
    med = _typical_area(areas, present)
    new_areas = [areas]
    gy0, gx0 = np.array([g[0] for g in gaps], int), np.array([g[1] for g in gaps], int)
    gy1, gx1 = gy0 + [g[2].shape[0] for g in gaps], gx0 + [g[2].shape[1] for g in gaps]
    for k in present[areas[present] > p.max_area * med]:
        y0, y1, x0, x1 = slices[k]
        region = labels[y0:y1, x0:x1] == k
        if not _is_clump(region, areas[k], med, p):
            continue
        sub = region.copy()
        for i in np.flatnonzero((gy0 < y1) & (gy1 > y0) & (gx0 < x1) & (gx1 > x0)):  # the gaps in its box
            a0, b0, a1, b1 = max(gy0[i], y0), max(gx0[i], x0), min(gy1[i], y1), min(gx1[i], x1)
            sub[a0 - y0:a1 - y0, b0 - x0:b1 - x0] &= ~gaps[i][2][a0 - gy0[i]:a1 - gy0[i], b0 - gx0[i]:b1 - gx0[i]]
        parts, m = _split(np.pad(sub, 1), r, p)
        if m < 2:
            continue
        parts = parts[1:-1, 1:-1]
        win = labels[y0:y1, x0:x1]
        win[region] = 0
        win[parts > 0] = parts[parts > 0] + n
        part_slices, part_centroids, part_areas = _bboxes(parts, m)
        for j, (a0, a1, b0, b1) in part_slices.items():
            slices[n + j] = (a0 + y0, a1 + y0, b0 + x0, b1 + x0)
            centroids[n + j] = (part_centroids[j][0] + y0, part_centroids[j][1] + x0)
        del slices[k], centroids[k]
        areas[0] += areas[k] - part_areas[1:].sum()  # what the parts leave of the clump is background now
        areas[k] = 0
        new_areas.append(part_areas[1:])
        n += m
    return labels, n, (slices, centroids, np.concatenate(new_areas))


def _regions(rgb, work, labels, n, inside, det: Detection, p: DetectParams, boxes: tuple) -> list[Cell]:
    """boxes: the labels' _bboxes."""
    H, W = rgb.shape[:2]
    h, w = labels.shape
    s = det.scale
    slices, centroids, areas = boxes
    present = np.nonzero(areas[1:])[0] + 1
    if len(present) == 0:
        return []
    med = _typical_area(areas, present)
    outside = ~inside
    edge = np.zeros((h, w), bool)
    e = p.edge_margin
    edge[:e, :] = edge[-e:, :] = edge[:, :e] = edge[:, -e:] = True
    if outside.any():
        edge |= cv2.dilate(outside.astype(np.uint8), np.ones((2 * e + 1, 2 * e + 1), np.uint8)).astype(bool)
    cut_ids = set(np.unique(labels[edge]).tolist()) - {0}
    green = work[..., 1]
    dark_t = det.cell_level - p.nucleus_level * (det.background_level - det.cell_level)
    dark = np.bincount(labels[green < dark_t], minlength=n + 1)
    deep_t = det.cell_level - p.deep_level * (det.background_level - det.cell_level)
    deep = np.bincount(labels[green < deep_t], minlength=n + 1)
    grow = max(0, round(p.mask_dilate * det.diameter_px))
    gap = max(0, round(p.split_gap * det.diameter_px))
    k_grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2)
    k_gap = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2)
    cells = []
    for k in present:
        y0, y1, x0, x1 = slices[k]
        sub = labels[y0:y1, x0:x1] == k
        cy, cx = (centroids[k][0] + 0.5) / s, (centroids[k][1] + 0.5) / s
        status = "ok"
        if k in cut_ids and areas[k] < p.whole_at_edge * med:
            status = "cut"
        elif areas[k] < p.min_area * med:
            status = "small"
        elif deep[k] > p.stain_share * areas[k] or (dark[k] > p.wbc_dark_share * areas[k] and
                                                      deep[k] > p.wbc_deep_share * areas[k] and
                                                      areas[k] > p.wbc_area * med):
            status = "wbc" if areas[k] > p.platelet_area * med else "platelets"
        elif _is_clump(sub, areas[k], med, p):
            status = "large"
        # full-resolution box and mask: the working-res labels (1 px padding, 0 beyond the image) resized up
        X0, Y0 = max(0, int((x0 - 1) / s)), max(0, int((y0 - 1) / s))
        X1, Y1 = min(W, int(np.ceil((x1 + 1) / s))), min(H, int(np.ceil((y1 + 1) / s)))
        wy0, wx0 = max(0, y0 - 1), max(0, x0 - 1)
        win = np.zeros((y1 - y0 + 2, x1 - x0 + 2), labels.dtype)
        lab = labels[wy0:y1 + 1, wx0:x1 + 1]
        win[wy0 - y0 + 1:wy0 - y0 + 1 + lab.shape[0], wx0 - x0 + 1:wx0 - x0 + 1 + lab.shape[1]] = lab

        def up(a):
            return _to_full(a, (x0 - 1, y0 - 1), (X0, Y0, X1, Y1), s)
        full = up(win == k)
        if grow and status == "ok":
            full = cv2.dilate(full.view(np.uint8), k_grow, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        cut_mask, shared = None, 0.0
        near = (win != 0) & (win != k)
        if status == "ok" and near.any():
            # what is classified: the mask without the neighbours' regions and a gap beside them
            nb = up(near)
            if gap:
                nb = cv2.dilate(nb.view(np.uint8), k_gap).astype(bool)
            cut_mask = full & ~nb
            shared = 1.0 - float(cut_mask.sum()) / max(1, int(full.sum()))
        bx0, by0, bw, bh = cv2.boundingRect(full.view(np.uint8))
        if bw == 0:
            continue
        bx1, by1 = bx0 + bw, by0 + bh
        box = (X0 + bx0, Y0 + by0, bw, bh)
        crop_box, crop_mask = None, None if cut_mask is None else cut_mask[by0:by1, bx0:bx1]
        if cut_mask is not None and p.complete_overlap > 0:
            done = _completed(labels, k, (y0, y1, x0, x1), det, p, rgb.shape[:2], grow, k_grow)
            if done is not None:
                crop_box, crop_mask = done
        cs, _ = cv2.findContours(sub.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        perim = sum(cv2.arcLength(c, True) for c in cs)
        round_ = float(min(1.0, 4 * np.pi * areas[k] / perim ** 2)) if perim else 0.0
        cells.append(Cell(box, full[by0:by1, bx0:bx1], (float(cx), float(cy)), float(areas[k] / s / s), round_,
                          status, crop_mask, crop_box, shared))
    return cells


def _completed(labels: np.ndarray, k: int, bounds, det: Detection, p: DetectParams, full_shape, grow: int, k_grow):
    """(crop box, crop mask) at full resolution for a cell that touches neighbours: its region plus the part of
    the neighbours' regions inside an ellipse fitted to its free rim (the part of the cell the split gave
    away), or None when too little of its rim is free to fit one or the fit is not a cell's size."""
    s, d = det.scale, det.diameter_px * det.scale
    h, w = labels.shape
    e = int(np.ceil(0.6 * d))
    y0, y1, x0, x1 = bounds
    y0, y1, x0, x1 = max(0, y0 - e), min(h, y1 + e), max(0, x0 - e), min(w, x1 + e)
    win = labels[y0:y1, x0:x1]
    own = (win == k).view(np.uint8)
    nbr = (win != 0) & (win != k)
    k3 = np.ones((3, 3), np.uint8)
    rim = own.astype(bool) & ~cv2.erode(own, k3, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    free = rim & cv2.dilate((win == 0).view(np.uint8), k3).astype(bool)
    n_free = int(free.sum())
    if n_free < 8 or n_free < p.min_free_rim * rim.sum():
        return None
    ys, xs = np.nonzero(free)
    (ex, ey), (ea, eb), ang = cv2.fitEllipse(np.c_[xs, ys].astype(np.float32))
    if not (0.5 * d < min(ea, eb) and max(ea, eb) < 1.6 * d):
        return None
    pad = 2 * p.complete_overlap * d
    disc = np.zeros(win.shape, np.uint8)
    cv2.ellipse(disc, ((float(ex), float(ey)), (float(ea + pad), float(eb + pad)), float(ang)), 1, -1)
    disc = disc.astype(bool)
    H, W = full_shape
    X0, Y0 = int(x0 / s), int(y0 / s)

    def up(a):
        return _to_full(a, (x0, y0), (X0, Y0, min(W, int(np.ceil(x1 / s))), min(H, int(np.ceil(y1 / s)))), s)
    m = up(own)
    if grow:
        m = cv2.dilate(m.view(np.uint8), k_grow).astype(bool)
    m = (m | up(disc & nbr)) & ~up(nbr & ~disc)
    bx, by, bw, bh = cv2.boundingRect(m.view(np.uint8))
    if bw == 0:
        return None
    return (X0 + bx, Y0 + by, bw, bh), m[by:by + bh, bx:bx + bw]


def _to_full(a: np.ndarray, origin: tuple[int, int], box: tuple[int, int, int, int], s: float) -> np.ndarray:
    """A working-resolution window (its top-left pixel at `origin`, x, y) resampled onto the full-resolution
    box (X0, Y0, X1, Y1), as a bool mask: one mapping for the detection's masks and the crops'."""
    (wx, wy), (X0, Y0, X1, Y1) = origin, box
    M = np.float32([[s, 0, X0 * s - wx], [0, s, Y0 * s - wy]])
    return cv2.warpAffine(a.astype(np.float32), M, (X1 - X0, Y1 - Y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.5


def _fill(mask: np.ndarray) -> float:
    """Radius of the largest circle inside a region over its equivalent radius: 1 for a disc, lower for a
    clump, whose widest point is one cell's."""
    dt = cv2.distanceTransform(np.pad(mask, 1).view(np.uint8), cv2.DIST_L2, 5)
    return float(dt.max() / np.sqrt(mask.sum() / np.pi))


def _bboxes(labels: np.ndarray, n: int) -> tuple[dict[int, tuple[int, int, int, int]], dict[int, tuple[float, float]],
                                                  np.ndarray]:
    """(y0, y1, x0, x1) and centroid (y, x) of each label, and every label's area (pixels). A region's box is its
    outline's, so the minima and maxima (slow, unbuffered) are taken over outline pixels only; the areas and
    centroids are sums over every pixel, a band of rows at a time (np.bincount copies the labels to int64 and
    takes float64 weights: 0.3 GB at full resolution for the whole image)."""
    h, w = labels.shape
    cnt, sy, sx = np.zeros(n + 1, np.int64), np.zeros(n + 1), np.zeros(n + 1)
    band = max(1, (1 << 20) // max(w, 1))
    xs_band = np.tile(np.arange(w, dtype=np.float64), band)
    for r0 in range(0, h, band):
        rows = labels[r0:r0 + band].ravel()
        cnt += np.bincount(rows, minlength=n + 1)
        # sums of integers: exact in float64 whatever the order
        sy += np.bincount(rows, weights=np.repeat(np.arange(r0, r0 + len(rows) // w, dtype=np.float64), w),
                          minlength=n + 1)
        sx += np.bincount(rows, weights=xs_band[:len(rows)], minlength=n + 1)
    areas = cnt.copy()
    cnt[0] = 0
    present = np.flatnonzero(cnt)
    if len(present) == 0:
        return {}, {}, areas
    outline = np.zeros((h, w), bool)
    outline[0], outline[-1], outline[:, 0], outline[:, -1] = True, True, True, True
    step = labels[1:] != labels[:-1]
    outline[1:] |= step
    outline[:-1] |= step
    step = labels[:, 1:] != labels[:, :-1]
    outline[:, 1:] |= step
    outline[:, :-1] |= step
    del step
    outline &= labels != 0
    ys, xs = np.nonzero(outline)
    ids = labels[ys, xs]
    y0 = np.full(n + 1, 1 << 30)
    x0 = np.full(n + 1, 1 << 30)
    y1 = np.full(n + 1, -1)
    x1 = np.full(n + 1, -1)
    np.minimum.at(y0, ids, ys)
    np.minimum.at(x0, ids, xs)
    np.maximum.at(y1, ids, ys)
    np.maximum.at(x1, ids, xs)
    div = np.maximum(cnt, 1)
    my, mx = sy / div, sx / div
    boxes = {int(k): (int(y0[k]), int(y1[k]) + 1, int(x0[k]), int(x1[k]) + 1) for k in present}
    return boxes, {int(k): (float(my[k]), float(mx[k])) for k in present}, areas


def crop(rgb: np.ndarray, cell: Cell) -> np.ndarray:
    """The cell at full resolution in its tight box, background set to black (as the NIH crops are)."""
    x, y, w, h = cell.box if cell.crop_box is None else cell.crop_box
    m = cell.mask if cell.crop_mask is None else cell.crop_mask
    bx, by, bw, bh = cv2.boundingRect(m.view(np.uint8))
    if bw == 0:  # nothing left short of the neighbours: the detection as it is
        (x, y, w, h), m = cell.box, cell.mask
        bx, by, bw, bh = 0, 0, w, h
    c = rgb[y + by:y + by + bh, x + bx:x + bx + bw].copy()
    c[~m[by:by + bh, bx:bx + bw]] = 0
    return c
