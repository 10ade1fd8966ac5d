"""Field mode: detection on real and synthetic fields, the parasitemia estimator, the quality gate, and
`edge-infer --field` end to end on files and on a video through the camera code."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.detect import DetectParams, _bboxes, _fill_holes, _split_clumps, crop, detect, flat_border
from edge.field import FieldOptions, QualityParams, analyze, quality
from edge.images import load_image
from edge.metrics import operating_points, threshold_for_specificity
from edge.operating import field_point, operating_point
from edge.parasitemia import estimate
from edge.runtime import load_classifier
from tests.conftest import DEV_MANIFEST, ROOT, browser, needs_browser, run
from train.fieldscore import GTPoint, contains, exif_orientation, read_point_set, score
from train.synthetic import SynthParams, load_crops, make_field

FIELD = ROOT / "examples" / "field" / "IMG_20150614_124212.jpg"
FIELD_GT = FIELD.with_suffix(".txt")
NIH_FIELDS = ROOT.parent / "shared" / "data" / "nih_fields" / "239C12NThinF"
FIELD_MODEL = ROOT / "models" / "mobilenetv2" / "mobilenetv2_int8.tflite"
COUNTS = {"tp": 900, "fn": 100, "tn": 995, "fp": 5}


def infer(*args, **kw):
    return run(["-m", "edge.cli", *map(str, args)], **kw)


@pytest.fixture(scope="module")
def real_field():
    return load_image(FIELD)


@pytest.fixture(scope="module")
def real_detection(real_field):
    return detect(real_field)


def _patient_crops(patient: str, parasitized: int | None = None, uninfected: int | None = None):
    """One patient's real dev-set crops (the first of each class, or all), as (infected, uninfected): a field is
    one patient's slide."""
    import csv
    rows = [r for r in csv.DictReader(open(DEV_MANIFEST)) if r["patient"] == patient]
    rows = ([r for r in rows if r["label"] == "Parasitized"][:parasitized] +
            [r for r in rows if r["label"] == "Uninfected"][:uninfected])
    return load_crops(DEV_MANIFEST.parent, [r["relpath"] for r in rows],
                      [int(r["label"] == "Parasitized") for r in rows], [patient] * len(rows))[patient]


@pytest.fixture(scope="module")
def crops_by_group():
    """60 real crops of one patient (P20, both classes) from the dev set."""
    return _patient_crops("20", 30, 30)


def test_real_field_is_read_as_displayed_and_gt_rotated_with_it(real_field):
    assert exif_orientation(FIELD) == 8
    assert real_field.shape[:2] == (5312, 2988)  # stored 5312 wide, displayed upright
    pts = read_point_set(FIELD_GT, 8)
    assert all(0 <= p.x < 2988 and 0 <= p.y < 5312 for p in pts)


def test_real_field_detection_recall_and_precision(real_detection):
    pts = read_point_set(FIELD_GT, exif_orientation(FIELD))
    s = score(real_detection.cells, pts, real_detection.eyepiece, real_detection.scale)
    assert s.gt == 292
    assert s.recall >= 0.97, s.as_dict()
    assert s.precision >= 0.95, s.as_dict()  # the target; cells beside the rim no longer take its dark band
    assert 90 < real_detection.diameter_px < 130  # NIH crops of this slide are ~110-140 px


def test_cells_too_small_for_the_preview_are_measured_on_a_larger_one(real_field):
    # the real photo at 1/11 scale (cells ~10 px) tiled to 1936x1496: 3 px in a 600-px preview
    small = cv2.resize(real_field, None, fx=1 / 11, fy=1 / 11, interpolation=cv2.INTER_AREA)
    h, w = small.shape[:2]
    tile = small[h // 4:3 * h // 4, w // 4:3 * w // 4]
    one = detect(tile).diameter_px  # small enough to be measured at full resolution
    assert 8 < one < 13
    assert detect(np.tile(tile, (8, 11, 1))).diameter_px == pytest.approx(one, rel=0.15)


@pytest.mark.parametrize("zoom", [1.8, 3.0])
def test_cells_at_high_magnification_are_measured_whole_and_the_field_is_counted(real_field, zoom):
    # 1,800-px views of the photo's centre with cells ~200 and ~340 px across: the cell size follows the
    # zoom (once measured as the ring around each pale centre, ~90 px, which the focus gate then rejected)
    h, w = real_field.shape[:2]
    side = round(1800 / zoom)
    view = real_field[h // 2 - side // 2:h // 2 + side // 2, w // 2 - side // 2:w // 2 + side // 2]
    big = cv2.resize(view, (1800, 1800), interpolation=cv2.INTER_CUBIC)
    det = detect(big)
    assert det.diameter_px == pytest.approx(zoom * detect(view).diameter_px, rel=0.1)
    assert _quality_reason(big) == ""


def test_white_cell_with_a_nucleus_is_not_counted_as_a_red_cell():
    photo = NIH_FIELDS / "Img" / "IMG_20150614_125741.jpg"  # a neutrophil among ~300 red cells
    wbc = [p for p in read_point_set(NIH_FIELDS / "GT" / f"{photo.stem}.txt", exif_orientation(photo))
           if p.label == "White_Blood_Cell"]
    assert len(wbc) == 1
    rgb = load_image(photo)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 15) % 180  # another lab's stain: hue +15 of OpenCV's 180
    for im in (rgb, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)):
        det = detect(im)
        assert [c.status for c in det.cells if contains(c, wbc[0].x, wbc[0].y)] == ["wbc"]


def test_darkly_stained_infected_cells_are_counted_not_taken_for_white_cells(crops_by_group):
    pos, neg = crops_by_group
    dark = [(name, (c * 0.8).astype(np.uint8)) for name, c in pos]  # absorbing 20% more light throughout
    f = make_field(dark, neg, SynthParams(parasitemia=0.15, n_cells=250, seed=4))
    det = detect(f.rgb)
    status = [[c.status for c in det.cells if contains(c, t.x, t.y)] for t in f.red_cells
              if t.label == "Parasitized"]
    assert len(status) >= 25
    assert sum(s == ["ok"] for s in status) >= 0.9 * len(status)
    assert sum("wbc" in s or "platelets" in s for s in status) <= 0.1 * len(status)


def test_enlarged_infected_cells_are_counted_not_taken_for_white_cells(crops_by_group):
    # P. vivax and P. ovale enlarge the cells they infect; dark ones 1.5x as wide were taken for white
    # cells (they are dark enough, and now larger than a red cell), 9 of 21 here
    pos, neg = crops_by_group
    dark = [(name, (c * 0.8).astype(np.uint8)) for name, c in pos]
    f = make_field(dark, neg, SynthParams(parasitemia=0.15, n_cells=250, seed=5, infected_scale=1.5))
    det = detect(f.rgb)
    status = [[c.status for c in det.cells if contains(c, t.x, t.y)] for t in f.red_cells
              if t.label == "Parasitized"]
    assert len(status) >= 15
    assert not any("wbc" in s or "platelets" in s for s in status)
    assert sum(s == ["ok"] for s in status) >= 0.85 * len(status)


def test_a_round_region_twice_a_cell_wide_is_one_cell_and_an_elongated_one_a_clump():
    img = np.full((500, 900, 3), (225, 205, 215), np.uint8)
    for i in range(8):
        cv2.circle(img, (60 + 100 * i, 60), 40, (175, 110, 145), -1)
    cv2.circle(img, (150, 300), 72, (175, 110, 145), -1)  # 1.8x as wide: 3.2x the area
    cv2.ellipse(img, (600, 300), (120, 45), 0, 0, 360, (175, 110, 145), -1)  # 3.4x the area, unsplit
    det = detect(img, DetectParams(cell_diameter=80))
    by_row = sorted(det.cells, key=lambda c: (c.centre[1] > 200, c.centre[0]))
    assert [c.status for c in by_row] == ["ok"] * 8 + ["ok", "large"]


def _ring_of_cells(img, centre=(300, 300), n=5, ring=62, r=40):
    """n touching discs round a gap of background 0.39 of a disc's area: under the pale-centre fill's limit."""
    for k in range(n):
        x, y = centre[0] + ring * np.cos(2 * np.pi * k / n), centre[1] + ring * np.sin(2 * np.pi * k / n)
        cv2.circle(img, (round(x), round(y)), r, (175, 110, 145), -1)
    return img


def test_a_ring_of_touching_cells_round_a_gap_is_found_as_its_cells_not_one_clump():
    img = np.full((500, 900, 3), (225, 205, 215), np.uint8)
    for i in range(6):
        cv2.circle(img, (60 + 100 * i, 60), 40, (175, 110, 145), -1)
    det = detect(_ring_of_cells(img), DetectParams(cell_diameter=80))
    ring = [c for c in det.cells if c.centre[1] > 150]
    assert [c.status for c in ring] == ["ok"] * 5
    assert sorted(round(np.hypot(c.centre[0] - 300, c.centre[1] - 300)) for c in ring) == pytest.approx([62] * 5, abs=6)


def test_a_clump_split_again_gives_the_boxes_centroids_and_areas_of_its_parts():
    img = _ring_of_cells(np.full((400, 400, 3), 255, np.uint8))
    cell = np.pi * 40 ** 2
    filled, gaps = _fill_holes(img[..., 1] < 200, 0.6 * cell, holes_over=0.25 * cell)
    assert len(gaps) == 1 and filled[300, 300]  # the gap was filled, as a pale centre is
    labels = filled.astype(np.int32)
    for i in range(4):  # single cells, so that the ring is larger than the typical region
        cv2.circle(labels, (40 + 90 * i, 40), 30, i + 2, -1)
    labels, n, (slices, centroids, areas) = _split_clumps(labels, 5, gaps, 40, DetectParams())
    assert n == 5 + 5 and labels[300, 300] == 0
    want_slices, want_centroids, want_areas = _bboxes(labels, n)
    assert slices == want_slices and list(areas) == list(want_areas)
    assert all(centroids[k] == pytest.approx(want_centroids[k]) for k in want_slices)


def test_a_crowded_field_whose_filled_gaps_make_one_blob_is_measured_at_its_cells_size():
    """Cells overlapping by 10-30%: with every gap between them filled as a pale centre, the field measured as
    one 730-px "cell" and nothing was counted."""
    f = _dense_field("116", 902)
    det = detect(f.rgb)
    assert det.diameter_px == pytest.approx(2 * np.median([t.r for t in f.truth]), rel=0.15)
    s = score(det.cells, [GTPoint(t.x, t.y, t.label) for t in f.truth])
    assert s.recall >= 0.6, s.as_dict()


def _dense_field(patient: str, seed: int, spacing=(0.7, 0.9), n_cells: int = 400):
    """Cells overlapping by 10-30% of their width (by default): thicker than the monolayer a microscopist reads."""
    pos, neg = _patient_crops(patient)
    return make_field(pos, neg, SynthParams(parasitemia=0.05, spacing=spacing, n_cells=n_cells, seed=seed))


def test_a_dense_field_whose_larger_hole_fill_doubles_its_cells_is_measured_at_their_size():
    """The 2% fill filled the gaps between the cells: 285 px per 126-px cell, every detection a clump of cells, and
    the field left out. The 0.2% fill measures the cells."""
    f = _dense_field("101", 900)
    det = detect(f.rgb)
    assert det.diameter_px == pytest.approx(2 * np.median([t.r for t in f.red_cells]), rel=0.15)
    assert quality(f.rgb, det, QualityParams())[0] == ""


def test_a_field_too_crowded_to_split_is_rejected_with_a_reason_that_says_so():
    """Cells overlapping by 30-50% of their width: the detector cannot part them, the field is left out, and the
    reason tells the microscopist to count where the cells lie side by side."""
    f = _dense_field("3", 910, spacing=(0.5, 0.7), n_cells=500)
    reason, m = quality(f.rgb, detect(f.rgb), QualityParams())
    assert reason.startswith("no plausible red cells") and m["overlapped"] > 0.9
    assert "too crowded? count where the cells lie side by side" in reason


def test_crops_are_cut_at_full_resolution_with_black_background(real_field, real_detection):
    cell = real_detection.accepted[len(real_detection.accepted) // 2]
    c = crop(real_field, cell)
    m = cell.mask if cell.crop_mask is None else cell.crop_mask
    bx, by, bw, bh = cv2.boundingRect(m.view(np.uint8))
    m = m[by:by + bh, bx:bx + bw]
    assert c.shape[:2] == (bh, bw) and 80 < max(c.shape[:2]) < 200
    assert (c[~m] == 0).all() and c[m].mean() > 60
    corners = np.array([c[0, 0], c[0, -1], c[-1, 0], c[-1, -1]])
    assert (corners == 0).all()


def test_a_crop_stops_short_of_a_touching_neighbour_and_keeps_its_rim_towards_background():
    img = np.full((300, 420, 3), (225, 205, 215), np.uint8)
    centres = ((150, 150), (228, 150), (340, 70))  # two overlapping cells and one alone
    for c in centres:
        cv2.circle(img, c, 40, (175, 110, 145), -1)
    det = detect(img, DetectParams(cell_diameter=80))
    assert [c.status for c in det.cells] == ["ok"] * 3
    left, right, alone = sorted(det.cells, key=lambda c: (c.centre[1] < 100, c.centre[0]))
    assert alone.crop_mask is None and (crop(img, alone) > 0).any(axis=2).sum() == alone.mask.sum()
    c = crop(img, left)
    bx, by, _, _ = cv2.boundingRect(left.crop_mask.view(np.uint8))
    x0, y0 = left.box[0] + bx, left.box[1] + by
    for row in range(142, 159):  # where the two overlap, split at x = 189
        xs = np.nonzero(c[row - y0].any(axis=1))[0] + x0
        assert xs.max() <= 189 - 0.04 * 80  # stops a gap of 0.04 × 80 px short of the neighbour
        assert xs.min() <= 110  # keeps its rim towards the background (its edge: x = 110)
    assert left.mask.sum() > left.crop_mask.sum() and np.nonzero(left.mask)[1].max() + left.box[0] >= 189


def test_complete_overlap_gives_a_crop_back_the_part_of_its_cell_the_split_gave_a_neighbour():
    img = np.full((300, 420, 3), (225, 205, 215), np.uint8)
    for c in ((150, 150), (215, 150)):  # overlapping 15 px deep, split at x = 182
        cv2.circle(img, c, 40, (175, 110, 145), -1)
    cv2.circle(img, (186, 150), 4, (90, 20, 90), -1)  # a parasite on the left cell's rim, past the split line (x 183)
    plain = detect(img, DetectParams(cell_diameter=80))
    done = detect(img, DetectParams(cell_diameter=80, complete_overlap=0.067))
    # the detection (what is scored and drawn) is the same either way
    assert [c.box for c in plain.cells] == [c.box for c in done.cells] and len(done.cells) == 2
    left, left_done = (min(d.cells, key=lambda c: c.centre[0]) for d in (plain, done))

    def reach(cell):  # rightmost column of the cropped cell, in the image's pixels
        x, y, w, h = cell.crop_box or cell.box
        return x + np.nonzero(cell.crop_mask.any(axis=0))[0].max()
    assert reach(left) <= 183 and reach(left_done) >= 190  # the parasite (x 182-190) is now in it

    def parasite(c):
        return int(((c[..., 1] < 40) & (c[..., 2] > 50)).sum())
    assert parasite(crop(img, left)) < 12 and parasite(crop(img, left_done)) >= 40
    assert left_done.shared == pytest.approx(left.shared)  # contact is measured as before


def test_a_cell_leaves_more_of_its_mask_to_a_neighbour_the_deeper_they_overlap():
    img = np.full((300, 560, 3), (225, 205, 215), np.uint8)
    for c in ((80, 150), (158, 150), (330, 150), (394, 150), (500, 60)):  # pairs 78 and 64 px apart, one alone
        cv2.circle(img, c, 40, (175, 110, 145), -1)
    det = detect(img, DetectParams(cell_diameter=80))
    assert [c.status for c in det.cells] == ["ok"] * 5
    shared = [c.shared for c in sorted(det.cells, key=lambda c: c.centre[0])]
    assert shared[4] == 0  # touches none
    # each of a pair leaves the same share; a 64 px pair leaves more (an overlap 16 px deep, not 2)
    assert shared[0] == pytest.approx(shared[1], abs=0.01) and shared[2] == pytest.approx(shared[3], abs=0.01)
    assert 0.01 < shared[0] < 0.05 and shared[2] > shared[0] + 0.015
    # the field's quality record says how many of its cells overlap a neighbour by more: the deeper pair
    assert quality(img, det, QualityParams())[1]["overlapped"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("variant", [dict(), dict(scale=0.5, blur=1.0), dict(eyepiece=True)])
def test_synthetic_field_detection_recall(crops_by_group, variant):
    pos, neg = crops_by_group
    f = make_field(pos, neg, SynthParams(width=1600, height=1200, n_cells=90, seed=3, **variant))
    det = detect(f.rgb)
    s = score(det.cells, [GTPoint(t.x, t.y, t.label) for t in f.truth])
    assert s.gt >= 30
    assert s.recall >= 0.93, s.as_dict()


def test_synthetic_field_truth_points_lie_on_their_cells(crops_by_group):
    pos, neg = crops_by_group
    f = make_field(pos, neg, SynthParams(width=1200, height=900, n_cells=40, spacing=(1.2, 1.5), seed=1,
                                         jpeg_quality=None, noise=0, vignette=0,
                                         background=(0, 255, 0), platelets=0))
    on_cell = [f.rgb[int(t.y), int(t.x), 1] < 200 for t in f.red_cells]  # no cell is pure green
    assert len(on_cell) > 15 and all(on_cell)


def test_synthetic_overlap_multiplies_transmittance_so_a_covered_parasite_stays_visible():
    from train.synthetic import _paste
    light = (200.0, 180.0, 210.0)
    canvas = np.tile(np.float32(light), (60, 60, 1))
    lower = np.tile(np.float32([150, 120, 170]), (30, 30, 1))
    lower[14:17, 20:23] = (90, 40, 110)  # the parasite, where the upper cell will cover it
    upper = np.tile(np.float32([160, 140, 180]), (30, 30, 1))
    full = np.ones((30, 30), bool)
    assert _paste(canvas, lower, full, 20, 30, light) and _paste(canvas, upper, full, 40, 30, light)
    overlap, parasite = canvas[30, 30], canvas[30, 26]
    expected = np.float32(light) * (lower[15, 15] / light) * (upper[15, 15] / light)
    assert np.allclose(overlap, expected, atol=1)  # darker than either cell alone
    assert (parasite < overlap - 20).all()


def test_synthetic_platelets_lie_in_the_gaps_and_leave_the_cells_unchanged(crops_by_group):
    pos, neg = crops_by_group
    kw = dict(width=1200, height=900, n_cells=60, seed=4, jpeg_quality=None, noise=0)
    bare = make_field(pos, neg, SynthParams(platelets=0, **kw))
    f = make_field(pos, neg, SynthParams(platelets=60, **kw))
    assert [(t.x, t.y) for t in f.truth] == [(t.x, t.y) for t in bare.truth]
    changed = np.abs(f.rgb.astype(int) - bare.rgb).max(axis=2) > 10
    assert changed.sum() > 500
    ys, xs = np.nonzero(changed)
    for t in f.truth:  # no platelet inside a cell's inner disc
        assert not ((xs - t.x) ** 2 + (ys - t.y) ** 2 < (0.8 * t.r) ** 2).any()


def test_estimator_corrects_with_rogan_gladen():
    e = estimate(100, 1000, {"tp": 90, "fn": 10, "tn": 95, "fp": 5})
    assert e.parasitemia_percent == pytest.approx(100 * (0.1 + 0.95 - 1) / (0.9 + 0.95 - 1))
    assert e.raw_percent == pytest.approx(10.0)
    lo, hi = e.parasitemia_ci95
    assert lo < e.parasitemia_percent < hi
    assert e.parasites_per_ul == pytest.approx(e.parasitemia_percent / 100 * 5e6)


def test_estimator_scales_sensitivity_by_what_field_modes_crops_keep_of_it():
    # field mode called 80 of 100 infected validation-field cells whose own crops were called 90 times: Se 0.9 * 8/9
    e = estimate(100, 1000, {"tp": 90, "fn": 10, "tn": 95, "fp": 5}, recut=(80, 90, 100))
    assert e.sensitivity == pytest.approx(0.9) and e.sensitivity_used == pytest.approx(0.8)
    assert e.parasitemia_percent == pytest.approx(100 * (0.1 + 0.95 - 1) / (0.8 + 0.95 - 1))
    lo, hi = e.parasitemia_ci95
    plain = estimate(100, 1000, {"tp": 90, "fn": 10, "tn": 95, "fp": 5})
    assert lo < e.parasitemia_percent < hi and hi - lo > plain.parasitemia_ci95[1] - plain.parasitemia_ci95[0]
    assert estimate(0, 2000, COUNTS, recut=(80, 90, 100)).parasitemia_ci95[1] == pytest.approx(100 * 3 / (2000 * 0.8))
    with pytest.raises(ValueError, match="re-cut counts"):
        estimate(100, 1000, COUNTS, recut=(120, 90, 100))


def test_estimator_with_no_positive_gives_rule_of_three_bound():
    e = estimate(0, 2000, COUNTS)
    assert e.parasitemia_percent == 0 and e.parasitemia_ci95[0] == 0
    assert e.parasitemia_ci95[1] == pytest.approx(100 * 3 / (2000 * 0.9))


def test_estimator_clamps_below_the_false_positive_rate():
    e = estimate(2, 2000, COUNTS)  # 0.1% positives, fewer than the 0.5% false-positive rate
    assert e.parasitemia_percent == 0 and e.parasitemia_ci95[0] == 0 and e.parasitemia_ci95[1] > 0


def test_estimator_interval_covers_the_truth_in_simulated_sessions():
    rng = np.random.default_rng(0)
    se, sp, pi, n = 0.85, 0.995, 0.02, 2000
    covered = []
    for _ in range(150):
        infected = rng.random(n) < pi
        # the classifier's rates are only known through a validation sample, as in the card
        tp = rng.binomial(1600, se)
        tn = rng.binomial(1600, sp)
        calls = np.where(infected, rng.random(n) < se, rng.random(n) > sp)
        e = estimate(int(calls.sum()), n, {"tp": tp, "fn": 1600 - tp, "tn": tn, "fp": 1600 - tn}, draws=3000)
        covered.append(e.parasitemia_ci95[0] <= 100 * pi <= e.parasitemia_ci95[1])
    assert np.mean(covered) >= 0.9


def test_confirmed_calls_are_corrected_for_the_missed_infected_cells_only():
    e = estimate(18, 2000, COUNTS, confirmed=True)  # a microscopist confirmed 18 calls: no false positive
    assert e.parasitemia_percent == pytest.approx(100 * 18 / (2000 * 0.9))
    lo, hi = e.parasitemia_ci95
    assert lo < e.parasitemia_percent < hi
    none = estimate(0, 2000, COUNTS, confirmed=True)
    assert none.parasitemia_ci95 == (0, pytest.approx(100 * 3 / (2000 * 0.9)))


def test_confirmed_interval_covers_the_truth_in_simulated_sessions():
    rng = np.random.default_rng(3)
    se, pi, n = 0.85, 0.01, 2000
    covered = []
    for _ in range(150):
        tp = rng.binomial(1600, se)
        found = rng.binomial(rng.binomial(n, pi), se)  # infected cells called, all confirmed
        lo, hi = estimate(int(found), n, {"tp": tp, "fn": 1600 - tp, "tn": 1590, "fp": 10}, draws=3000,
                          confirmed=True).parasitemia_ci95
        covered.append(lo <= 100 * pi <= hi)
    assert np.mean(covered) >= 0.9


def test_between_patient_variance_is_the_spread_sampling_does_not_explain():
    from edge.parasitemia import between_patient_variance
    assert between_patient_variance([80, 80, 80], [100, 100, 100]) == 0  # as alike as sampling allows
    # two patients at 0.6 and 1.0, 10,000 cells each: ((0.6 - 0.8)^2 + (1.0 - 0.8)^2) / (2 - 1), less a
    # sampling variance of 0.6 * 0.4 / 10,000 (and 0 at 1.0) that these counts make negligible
    assert between_patient_variance([6000, 10000], [10000, 10000]) == pytest.approx(0.08, rel=0.01)
    assert between_patient_variance([5], [10]) == 0  # one patient shows no spread


def _patients(se_by_patient, n_inf=120, n_un=150, sp=0.995):
    """Validation counts per patient at the given sensitivities (expected values, rounded)."""
    return [{"tp": round(n_inf * se), "fn": n_inf - round(n_inf * se), "tn": round(n_un * sp),
             "fp": n_un - round(n_un * sp)} for se in se_by_patient]


def _pooled(by_patient):
    return {k: sum(b[k] for b in by_patient) for k in ("tp", "fn", "tn", "fp")}


def test_estimator_interval_widens_with_the_spread_between_patients_and_keeps_the_estimate():
    alike, spread = _patients([0.8] * 10), _patients([0.65, 0.7, 0.75, 0.8, 0.8, 0.8, 0.85, 0.9, 0.95, 0.8])
    assert _pooled(alike) == _pooled(spread)
    a = estimate(80, 2000, _pooled(alike), by_patient=alike)
    b = estimate(80, 2000, _pooled(spread), by_patient=spread)
    assert a.parasitemia_percent == b.parasitemia_percent
    assert b.parasitemia_ci95[0] < a.parasitemia_ci95[0] and b.parasitemia_ci95[1] > a.parasitemia_ci95[1] + 0.2


def test_estimator_interval_covers_a_patient_whose_sensitivity_differs_from_the_average():
    rng = np.random.default_rng(2)
    by_patient = _patients([0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.8, 0.75, 0.85])
    counts = _pooled(by_patient)
    pi, n = 0.05, 2000
    covered, covered_pooled = [], []
    for _ in range(120):
        se = rng.choice([0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])  # this smear's patient
        infected = rng.random(n) < pi
        pos = int(np.where(infected, rng.random(n) < se, rng.random(n) > 0.995).sum())
        for out, kw in ((covered, {"by_patient": by_patient}), (covered_pooled, {})):
            lo, hi = estimate(pos, n, counts, draws=3000, **kw).parasitemia_ci95
            out.append(lo <= 100 * pi <= hi)
    assert np.mean(covered) >= 0.9
    assert np.mean(covered_pooled) < 0.9  # the pooled rates alone claim too much


def test_field_modes_spread_widens_the_interval_where_it_exceeds_the_crops_and_keeps_the_estimate():
    alike = _patients([0.8] * 10)  # the crops' rates agree between patients
    a = estimate(80, 2000, _pooled(alike), by_patient=alike)
    b = estimate(80, 2000, _pooled(alike), by_patient=alike, spread=(0.1 ** 2, 0.0))  # field mode's SD 0.1
    assert a.parasitemia_percent == b.parasitemia_percent
    assert b.parasitemia_ci95[0] < a.parasitemia_ci95[0] - 0.1 and b.parasitemia_ci95[1] > a.parasitemia_ci95[1] + 0.5
    # a spread narrower than the crops' own changes nothing
    spread = _patients([0.65, 0.7, 0.75, 0.8, 0.8, 0.8, 0.85, 0.9, 0.95, 0.8])
    c = estimate(80, 2000, _pooled(spread), by_patient=spread)
    assert estimate(80, 2000, _pooled(spread), by_patient=spread, spread=(1e-6, 0.0)).parasitemia_ci95 == c.parasitemia_ci95


def test_field_spread_is_the_patients_spread_of_field_modes_rates_beyond_sampling():
    from train.fieldpool import field_spread

    def pool(se_a, se_b, n=400):  # patients A and B, n infected and 10n uninfected each, 1% of those called
        y = np.array(([1] * n + [0] * 10 * n) * 2)
        p = np.zeros(len(y))
        for k, se in enumerate((se_a, se_b)):
            o = k * 11 * n
            p[o:o + round(se * n)] = 1
            p[o + n:o + n + n // 10] = 1
        crops = np.where(y == 1, 0.9, 0.0)  # their own crops: every infected cell called, no uninfected one
        return {"labels": y, "probs": p, "groups": np.array(["A"] * 11 * n + ["B"] * 11 * n), "parasitemia": 0.05,
                "fields": 1, "crop_probs": crops}
    alike, apart = field_spread([pool(0.8, 0.8)], 0.5), field_spread([pool(0.6, 1.0)], 0.5)
    assert alike["sensitivity_var"] == 0 and alike["specificity_var"] == 0 and alike["patients"] == 2
    # Se 0.6 and 1.0: their variance (n - 1 = 1) is 0.08, less what 400 cells each explain, 0.8 * 0.2 / 400
    assert apart["sensitivity_var"] == pytest.approx(0.08 - 0.0004, abs=1e-4) and apart["infected"] == 800
    # what the re-cut keeps: field mode called 240 + 400 of the 800 infected cells, their crops all 800
    assert apart["recut"] == {"field_called": 640, "crops_called": 800, "infected": 800}


def test_estimator_refuses_per_patient_counts_that_do_not_add_up():
    by_patient = _patients([0.8, 0.9])
    with pytest.raises(ValueError, match="do not add up"):
        estimate(10, 1000, {**_pooled(by_patient), "tp": 1}, by_patient=by_patient)


def test_estimator_rejects_impossible_counts():
    with pytest.raises(ValueError):
        estimate(5, 3, COUNTS)
    with pytest.raises(ValueError):
        estimate(1, 100, {"tp": 1, "fn": 9, "tn": 5, "fp": 5})  # Se + Sp <= 1


def test_counting_threshold_reaches_its_specificity():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    ops = operating_points(y, p)
    c = ops["counting"]
    assert c["specificity"] >= 0.995 and np.mean(p[y == 0] < c["threshold"]) >= 0.995
    assert c["counts"]["tn"] + c["counts"]["fp"] == int((y == 0).sum())
    assert "counts_by_patient" not in c  # no patients given
    by = operating_points(y, p, groups=np.arange(3000) % 7)["counting"]["counts_by_patient"]
    assert len(by) == 7 and {k: sum(b[k] for b in by) for k in c["counts"]} == c["counts"]
    assert ops["screening"]["sensitivity"] >= 0.97
    assert threshold_for_specificity(np.array([0, 0, 1]), np.array([0.2, 0.2, 0.9]), 1.0) > 0.2


def _quality_reason(rgb):
    return quality(rgb, detect(rgb), QualityParams())[0]


def test_quality_gate_passes_the_real_field(real_field):
    assert _quality_reason(real_field[::2, ::2]) == ""


def test_quality_gate_rejects_a_blurred_field(real_field):
    small = np.ascontiguousarray(real_field[::2, ::2])
    assert _quality_reason(cv2.GaussianBlur(small, (0, 0), 14)) != ""


def test_quality_gate_rejects_a_dark_field(real_field):
    small = np.ascontiguousarray(real_field[::2, ::2])
    assert _quality_reason((small * 0.2).astype(np.uint8)).startswith("too dark")


def test_quality_gate_rejects_an_overexposed_field_and_says_how_much_is_saturated(real_field):
    small = np.ascontiguousarray(real_field[::2, ::2])
    bright = np.clip(small.astype(np.float32) * 1.6, 0, 255).astype(np.uint8)
    det = detect(bright)
    reason, m = quality(bright, det, QualityParams())
    saturated = (det.work >= 250).all(axis=2)[det.eyepiece].mean()  # every channel at the top, inside the disc
    assert reason.startswith("overexposed") and m["clipped"] == pytest.approx(saturated, abs=1e-4) and saturated > 0.25
    assert quality(small, detect(small), QualityParams())[1]["clipped"] < 0.01


def test_region_boxes_centroids_and_areas_are_those_of_every_pixel_of_the_region():
    # boxes come from the regions' outlines only, sums a band of rows at a time (the last shape spans three bands)
    rng = np.random.default_rng(0)
    for h, w in [tuple(rng.integers(1, 30, 2)) for _ in range(50)] + [(300, 10_000)]:
        labels = (rng.integers(0, 5, (h, w)) * (rng.random((h, w)) < 0.7)).astype(np.int32)
        labels[h // 3:, w // 3:][:h // 3, :w // 3] = 7  # a solid block: interior pixels off the outline
        boxes, centres, areas = _bboxes(labels, int(labels.max()))
        assert set(boxes) == set(np.unique(labels[labels > 0]).tolist())
        assert areas.tolist() == np.bincount(labels.ravel()).tolist()
        for k in boxes:
            ys, xs = np.nonzero(labels == k)
            assert boxes[k] == (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
            assert centres[k] == pytest.approx((ys.mean(), xs.mean()))


def test_flat_border_counts_the_lines_of_one_colour_at_each_edge():
    inner = np.random.default_rng(0).integers(100, 200, (40, 60, 3)).astype(np.uint8)
    framed = cv2.copyMakeBorder(inner, 3, 5, 7, 2, cv2.BORDER_CONSTANT, value=(250, 251, 249))
    assert flat_border(framed, 6) == (3, 5, 7, 2)
    assert flat_border(inner, 6) == (0, 0, 0, 0)
    stripes = np.repeat(inner[:1], 40, axis=0)  # every column one colour
    assert flat_border(stripes, 6)[2] == 60
    clean = np.full((200, 300, 3), (225, 205, 215), np.uint8)  # noise-free: flat lines of its own background
    cv2.circle(clean, (150, 100), 40, (175, 110, 145), -1)
    assert flat_border(clean, 6) == (0, 0, 0, 0)


@pytest.mark.parametrize("colour,jpeg", [((255, 255, 255), False), ((240, 240, 240), False), ((255, 255, 255), True)],
                         ids=["white", "light grey", "white, saved as JPEG"])
def test_a_frame_round_the_photo_is_left_outside_and_the_field_counted_as_without_it(real_field, colour, jpeg):
    # a white frame read as 37% saturated ("overexposed") and made the photo one 518 px "cell"; a JPEG rings
    # for a few lines where the frame meets the photo
    small = np.ascontiguousarray(real_field[::2, ::2])
    framed = cv2.copyMakeBorder(small, 180, 180, 320, 320, cv2.BORDER_CONSTANT, value=colour)
    if jpeg:
        framed = cv2.imdecode(cv2.imencode(".jpg", framed, [cv2.IMWRITE_JPEG_QUALITY, 90])[1], cv2.IMREAD_COLOR)
    plain, det = detect(small), detect(framed)
    reason, m = quality(framed, det, QualityParams())
    assert reason == "" and m["clipped"] < 0.01
    assert len(det.accepted) == pytest.approx(len(plain.accepted), rel=0.03)
    assert det.diameter_px == pytest.approx(plain.diameter_px, rel=0.1)


@pytest.mark.parametrize("fill,jpeg", [(255, False), (128, True), (200, False)],
                         ids=["white", "grey, saved as JPEG", "light grey"])
def test_the_fill_at_the_corners_of_a_turned_photo_is_outside_the_field_as_black_is(real_field, fill, jpeg):
    # turned with white fill, the corners are no flat lines; cells they cut were counted whole (292 counted,
    # 21 cut, against 288 and 26 with black corners). Grey fill darker than the background was foreground, split
    # into a row of 3 "cells"
    small = np.ascontiguousarray(real_field[::2, ::2])
    h, w = small.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 12, 1.0)
    turned = cv2.warpAffine(small, turn, (w, h), borderValue=(fill,) * 3)
    if jpeg:
        turned = cv2.imdecode(cv2.imencode(".jpg", turned, [cv2.IMWRITE_JPEG_QUALITY, 85])[1], cv2.IMREAD_COLOR)
    filled, black = detect(turned), detect(cv2.warpAffine(small, turn, (w, h), borderValue=(0, 0, 0)))
    photo = cv2.warpAffine(np.ones((h, w), np.uint8), turn, (w, h), borderValue=0)
    assert not filled.eyepiece[:5, :5].any() and not filled.eyepiece[-5:, -5:].any()
    assert all(photo[int(c.box[1] + c.box[3] / 2), int(c.box[0] + c.box[2] / 2)] for c in filled.accepted)
    cut = [sum(c.status == "cut" for c in d.cells) for d in (filled, black)]
    assert abs(len(filled.accepted) - len(black.accepted)) <= 7 and abs(cut[0] - cut[1]) <= 2


@pytest.mark.parametrize("rgb", [np.zeros((960, 1280, 3), np.uint8), np.full((960, 1280, 3), 230, np.uint8),
                                 np.zeros((8, 8, 3), np.uint8)], ids=["black", "empty", "tiny"])
def test_fields_with_nothing_in_them_are_rejected_not_crashed(rgb):
    res = analyze(rgb, "x", load_classifier(FIELD_MODEL), FieldOptions(0.9, COUNTS))
    assert res.status == "rejected" and res.rbc == 0 and "no" in res.reason


def test_random_noise_is_not_a_field():
    noise = np.random.default_rng(0).integers(0, 255, (960, 1280, 3)).astype(np.uint8)
    res = analyze(noise, "noise", load_classifier(FIELD_MODEL), FieldOptions(0.9, COUNTS))
    assert res.status == "rejected"


@pytest.mark.parametrize("shape", [(4000, 17, 3), (30, 4000, 3)], ids=["tall", "wide"])
def test_a_thin_strip_of_noise_is_not_a_field(shape):
    # the old code counted 283 and 127 "red cells" in these: at 10-19 px per cell noise makes even blobs
    noise = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    res = analyze(noise, "strip", load_classifier(FIELD_MODEL), FieldOptions(0.9, COUNTS))
    assert res.status == "rejected" and res.rbc == 0 and "not a field of cells" in res.reason


def test_a_field_of_ragged_real_cells_passes_the_gate():
    # patient 47's crops have ragged outlines: its synthetic fields' median roundness is 0.60-0.65 (seeds 0-24),
    # and a gate at 0.6 left some of them out
    pos, neg = _patient_crops("47", 30, 60)
    f = make_field(pos, neg, SynthParams(parasitemia=0.02, seed=24))
    reason, m = quality(f.rgb, detect(f.rgb), QualityParams())
    assert m["roundness"] < 0.61 and reason == ""


@pytest.mark.parametrize("sigma", [2, 4, 8])
def test_blurred_noise_is_not_a_field_though_its_blobs_are_round(sigma):
    # stain-coloured blobs of blurred noise, as round as red cells (0.69-0.81) but of every size
    blobs = cv2.GaussianBlur(np.random.default_rng(0).normal(0, 1, (960, 1280)).astype(np.float32), (0, 0), sigma)
    rgb = np.clip(np.float32([220, 180, 200]) - 120 * sigma * blobs[..., None] * np.float32([0.5, 1.2, 0.8]), 0, 255)
    reason = _quality_reason(rgb.astype(np.uint8))
    assert reason.startswith("no plausible red cells (region sizes vary")


@pytest.fixture(scope="module")
def field_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fieldrun")
    res = infer("--field", FIELD, "--out", out, "--output", out / "cells.jsonl", "--target-cells", 200)
    return res, out


def test_the_reports_gallery_stays_light_enough_for_hundreds_of_calls(field_run):
    import re
    _, out = field_run
    cards = re.findall(r"<div class='cell'[^>]*><img src='([^']+)'", (_session(out) / "report.html").read_text())
    assert len(cards) == len(_positives(out)) >= 1
    # a severe infection counted to 2,000 cells makes some 400 calls: at 50 KB a card that is a 20 MB page
    assert max(len(c) for c in cards) < 50_000


def _positives(out):
    return [r for r in map(json.loads, (out / "cells.jsonl").read_text().splitlines()) if r["label"] == "Parasitized"]


def _session(out):
    (sdir,) = [d for d in out.iterdir() if d.is_dir()]
    return sdir


@pytest.fixture
def report_page(field_run):
    """The bundled photo's report.html open in a fresh headless browser (so with empty storage)."""
    driver = browser()
    try:
        driver.get((_session(field_run[1]) / "report.html").as_uri())
        yield driver
    finally:
        driver.quit()


@needs_browser
def test_the_reports_review_gives_the_parasitemia_of_the_confirmed_calls(field_run, report_page):
    from selenium.webdriver.common.by import By
    _, out = field_run
    s = json.loads((_session(out) / "session.json").read_text())
    pos = _positives(out)
    assert len(pos) >= 2  # the example photo: the healthy slide's cells the classifier calls
    op = json.loads(FIELD_MODEL.with_name(FIELD_MODEL.name + ".card.json").read_text())["operating_points"][
        s["operating_point"]]
    counts, rc = op["counts"], op["field_spread"]["recut"]
    driver = report_page
    cards = driver.find_elements(By.CSS_SELECTOR, ".cell")
    assert [int(c.get_attribute("data-cell")) for c in cards] == [r["cell"] for r in pos]
    assert driver.find_element(By.ID, "rv-result").text == ""  # nothing reviewed yet
    cards[0].find_element(By.CSS_SELECTOR, "input[value=confirmed]").click()
    for c in cards[1:]:
        c.find_element(By.CSS_SELECTOR, "input[value=rejected]").click()
    text = driver.find_element(By.ID, "rv-result").text
    # one cell over sensitivity: the validation one, times what field mode's crops keep of it
    pct = 100 / (s["rbc_count"] * counts["tp"] / (counts["tp"] + counts["fn"]) * rc["field_called"] / rc["crops_called"])
    assert text.startswith(f"Confirmed parasitemia {pct:.2f}% (95% interval ")
    per_ul = round(float(text.split("), ")[1].split(" parasites/µL")[0].replace(",", "")))
    assert per_ul == pytest.approx(pct / 100 * s["rbc_per_ul_assumed"], abs=0.01 / 100 * s["rbc_per_ul_assumed"])
    assert f"1 confirmed of {s['rbc_count']} red cells" in text and "not yet reviewed" not in text


@needs_browser
def test_the_reports_review_takes_c_and_r_keys_cell_by_cell(field_run, report_page):
    from selenium.webdriver.common.by import By
    n = len(_positives(field_run[1]))
    body = report_page.find_element(By.TAG_NAME, "body")
    body.send_keys("r")  # the first cell
    body.send_keys("c")  # the second
    decisions = [r.split(",")[-1] for r in report_page.execute_script("return reviewCsv()").splitlines()[1:]]
    assert decisions == ["rejected", "confirmed"] + [""] * (n - 2)
    assert report_page.find_element(By.ID, "rv-progress").text.startswith(f"2 of {n} positive calls reviewed")


@needs_browser
def test_the_reports_review_survives_a_reload_and_downloads_as_csv(field_run, report_page):
    from selenium.webdriver.common.by import By
    pos = _positives(field_run[1])
    driver = report_page
    driver.find_elements(By.CSS_SELECTOR, ".cell")[-1].find_element(By.CSS_SELECTOR, "input[value=rejected]").click()
    driver.refresh()
    assert driver.find_element(By.ID, "rv-progress").text.startswith(f"1 of {len(pos)} positive calls reviewed")
    rows = driver.execute_script("return reviewCsv()").splitlines()
    assert rows[0] == "field,cell,prob_parasitized,decision"
    assert [r.split(",")[1] for r in rows[1:]] == [str(r["cell"]) for r in pos]
    assert [r.split(",")[-1] for r in rows[1:]] == [""] * (len(pos) - 1) + ["rejected"]


def test_field_run_writes_rows_session_and_report(field_run):
    res, out = field_run
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (out / "cells.jsonl").read_text().splitlines()]
    assert {"path", "cell", "box", "image_width", "image_height", "label", "prob_parasitized", "status"} <= set(rows[0])
    assert all(r["image_width"] == 2988 and r["image_height"] == 5312 for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) > 250 and all(r["label"] in ("Parasitized", "Uninfected") for r in ok)
    assert all(0 <= r["box"][0] and r["box"][0] + r["box"][2] <= 2988 and r["box"][1] + r["box"][3] <= 5312 for r in rows)
    sdir = _session(out)
    s = json.loads((sdir / "session.json").read_text())
    assert s["rbc_count"] == len(ok) and s["target_reached"] is True
    assert s["positive_count"] == sum(r["label"] == "Parasitized" for r in ok)
    lo, hi = s["parasitemia_ci95"]
    assert lo <= s["parasitemia_percent"] <= hi and lo == 0  # a healthy slide: the interval includes 0
    html = (sdir / "report.html").read_text()
    assert "Parasitemia" in html and "data:image/jpeg;base64," in html and "not a diagnosis" in html
    # each field says how crowded it is, in session.json and in the report's field table
    share = s["fields"][0]["quality"]["overlapped"]
    assert 0 < share < 1 and f"<td>{100 * share:.0f}%</td>" in html
    # and what it left out, by reason, as the cell rows say
    left = {}
    for r in rows:
        if r["status"] != "ok":
            left[r["status"]] = left.get(r["status"], 0) + 1
    assert s["fields"][0]["left_out"] == left and left.get("cut", 0) > 0
    assert f"{left['cut']} cut by an edge" in html
    (ov,) = list((sdir / "overlays").glob("*.jpg"))
    assert cv2.imread(str(ov)).shape[1] <= 2048


def test_the_overlay_names_a_white_cell_so_a_reviewer_can_check_it(monkeypatch):
    import edge.report as report
    photo = NIH_FIELDS / "Img" / "IMG_20150614_125741.jpg"  # the neutrophil
    res = analyze(load_image(photo), photo.name, load_classifier(FIELD_MODEL), FieldOptions(0.9, COUNTS))
    (wbc,) = [c for c, call in zip(res.detection.cells, res.cells) if call.status == "wbc" and c.area_px >
              np.median([d.area_px for d in res.detection.accepted])]
    named = report.field_overlay(load_image(photo), res)
    monkeypatch.setattr(report, "LEFT_OUT_LABELS", {})
    unnamed = report.field_overlay(load_image(photo), res)
    s = min(1.0, report.MAX_WIDTH / res.width)
    band = named.shape[0] - round(res.height * s)
    x, y = int(wbc.box[0] * s), int(wbc.box[1] * s) + band
    differs = (named != unnamed).any(axis=2)
    assert differs[max(0, y - 30):y + 5, x:x + 150].sum() > 50  # the words, above the cell's box
    assert not differs[:band].any()  # and nothing else on the heading


def test_field_runs_never_overwrite_an_earlier_session(field_run, tmp_path):
    for _ in range(2):
        assert infer("--field", FIELD, "--out", tmp_path, "--target-cells", 10).returncode == 0
    assert len([d for d in tmp_path.iterdir() if d.name.startswith("session-")]) == 2


def test_a_write_the_disk_refuses_stops_the_session_in_one_line_and_keeps_what_was_written(tmp_path):
    """A full disk, as the OS reports it: every file over 200 kB is refused (RLIMIT_FSIZE makes the write fail with
    EFBIG where a full disk gives ENOSPC, through the same code). The overlay is the first file that large."""
    import csv
    import resource
    limit = 200_000

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = infer("--field", FIELD, "--out", tmp_path, "--output", tmp_path / "cells.csv", preexec_fn=small_disk)
    assert res.returncode == 1
    assert "cannot write results: File too large" in res.stderr and "Traceback" not in res.stderr
    rows = list(csv.DictReader((tmp_path / "cells.csv").open()))
    s = json.loads((_session(tmp_path) / "session.json").read_text())
    assert s["fields_counted"] == 1 and s["rbc_count"] == sum(r["status"] == "ok" for r in rows) > 250
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file left behind


def test_ctrl_c_ends_a_field_session_with_every_finished_field_saved(tmp_path):
    import csv
    import signal
    import subprocess
    import sys
    args = [sys.executable, "-m", "edge.cli", "--field", *[str(FIELD)] * 30, "--target-cells", "100000",
            "--out", str(tmp_path), "--output", str(tmp_path / "cells.csv")]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:  # the first field's line: it is counted and saved
        seen.append(line)
        if "red cells, " in line:
            p.send_signal(signal.SIGINT)
            break
    err = "".join(seen) + p.stderr.read()
    assert p.wait(timeout=120) == 130
    assert "interrupted: every finished field is saved" in err and "Traceback" not in err
    s = json.loads((_session(tmp_path) / "session.json").read_text())
    rows = list(csv.DictReader((tmp_path / "cells.csv").open()))
    assert 1 <= s["fields_counted"] < 30 and s["rbc_count"] == sum(r["status"] == "ok" for r in rows)
    assert "Parasitemia" in (_session(tmp_path) / "report.html").read_text()


def test_single_cell_given_to_field_mode_says_so(cell_files, tmp_path):
    res = infer("--field", cell_files[0], "--out", tmp_path)
    assert res.returncode == 1
    assert "single cell" in res.stderr


def test_field_given_without_field_flag_gets_an_error_row(tmp_path):
    res = infer(FIELD, "--format", "csv")
    assert res.returncode == 1
    assert "use --field" in res.stdout


def test_huge_image_is_a_clear_error(tmp_path):
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), np.zeros((8000, 7000), np.uint8))
    res = infer("--field", big, "--out", tmp_path)
    assert res.returncode == 1 and "too large" in res.stderr and "Traceback" not in res.stderr
    assert "save it smaller" in res.stderr  # and what to do about it


def test_a_session_of_only_unreadable_fields_fails_and_reports_no_rates(tmp_path):
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(Path(FIELD).read_bytes()[:20000])
    res = infer("--field", bad, "--out", tmp_path / "o")
    assert res.returncode == 1 and "truncated or corrupt" in res.stdout + res.stderr
    assert "parasitemia n/a" in res.stdout and "(raw n/a)" in res.stdout and "nan" not in res.stdout
    (sdir,) = list((tmp_path / "o").iterdir())
    html = (sdir / "report.html").read_text()
    assert "raw share n/a" in html and "review-data" not in html  # no red cell, nothing to review


def test_field_mode_needs_operating_points_in_the_card(exported, tmp_path):
    res = infer("--field", FIELD, "--model", exported / "tiny_int8.tflite", "--out", tmp_path)
    assert res.returncode == 1 and "operating point" in res.stderr and "Traceback" not in res.stderr


def test_field_from_a_video_file_through_the_camera_code_stops_at_target(real_field, tmp_path):
    small = cv2.cvtColor(np.ascontiguousarray(real_field[1200:3200:2, ::2]), cv2.COLOR_RGB2BGR)
    h, w = small.shape[:2]
    video = tmp_path / "smear.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (w, h))
    for _ in range(10):
        vw.write(small)
    vw.release()
    res = infer("--field", "--video", video, "--interval", 0, "--target-cells", 150, "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    (sdir,) = list((tmp_path / "o").iterdir())
    s = json.loads((sdir / "session.json").read_text())
    assert s["target_reached"] and 1 <= s["fields_counted"] < 10  # stopped at the target, not at the end
    assert len(list((sdir / "fields").glob("*.png"))) == s["fields_counted"]  # every accepted field kept


def test_video_that_yields_no_frames_fails(tmp_path):
    video = tmp_path / "empty.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 64))
    vw.release()
    res = infer("--field", "--video", video, "--out", tmp_path / "o")
    assert res.returncode == 1


def test_the_field_pool_keeps_each_found_cells_true_label_and_probability(exported, prepared):
    from tests.conftest import CELLS
    from train.data import load_prepared
    from train.fieldpool import field_pool
    m = load_classifier(exported / "tiny_int8.tflite")
    pool = field_pool(prepared, CELLS, m, FieldOptions(0.5, COUNTS), "val", fields_per_group=1, log=lambda *_: None)
    assert pool["fields"] >= 1 and pool["recall"] > 0.8
    assert len(pool["labels"]) == len(pool["probs"]) > 20 and set(pool["labels"]) <= {0, 1}
    assert pool["labels"].sum() >= 1 and np.all((pool["probs"] >= 0) & (pool["probs"] <= 1))
    assert 0 < pool["counted_infected"] <= 1 and 0.8 < pool["counted_uninfected"] <= 1
    # and how much of its mask it left to touching neighbours: some touch none, most touch one
    assert len(pool["shared"]) == len(pool["labels"]) and np.all((pool["shared"] >= 0) & (pool["shared"] < 0.5))
    assert 0 < np.mean(pool["shared"] == 0) < 0.9
    d = load_prepared(prepared)  # each cell's patient: one of the validation split's
    assert len(pool["groups"]) == len(pool["labels"]) and set(pool["groups"]) <= {d.groups[i] for i in d.indices("val")}
    # each found cell's own NIH crop, read by the same model: one probability per cell
    assert len(pool["crop_probs"]) == len(pool["labels"]) and np.all((pool["crop_probs"] >= 0) & (pool["crop_probs"] <= 1))
    assert set(pool["groups"]) <= set(pool["infected_crops"]) and min(pool["infected_crops"].values()) >= 1
    # each counted field's totals as field mode gave them: every detection counted, not only the found cells
    per = pool["per_field"]
    assert per.shape == (pool["fields"], 4) and per[:, 0].sum() >= len(pool["labels"])
    assert np.all(per[:, 1] <= per[:, 0]) and np.all(per[:, 3] <= per[:, 2]) and per[:, 3].sum() >= 1


def test_sessions_count_infected_cells_in_the_share_the_detector_finds_them():
    from benchmarks.fields import simulate_sessions
    from edge.field import FieldOptions
    # a perfect classifier, and a detector that counts half the infected cells and every uninfected one
    pool = {"labels": np.array([1] * 50 + [0] * 950), "probs": np.array([1.0] * 50 + [0.0] * 950),
            "counted_infected": 0.5, "counted_uninfected": 1.0, "fields": 1, "recall": 1.0, "precision": 1.0}
    perfect = {"tp": 1000, "fn": 0, "tn": 1000, "fp": 0}
    row = simulate_sessions({0.1: pool}, FieldOptions(0.5, perfect), sessions=50)[0]
    counted = 100 * 0.05 / (0.05 + 0.9)  # of a smear at 10%: 5 infected counted per 90 uninfected
    assert row["bias_pp"] == pytest.approx(counted - 10, abs=0.3)


def test_sessions_read_from_the_cells_own_crops_tell_the_re_cuts_bias_apart():
    from benchmarks.fields import simulate_sessions
    from edge.field import FieldOptions
    # field mode misses half the infected cells; their own crops are all read right
    y = np.array([1] * 100 + [0] * 900)
    pool = {"labels": y, "probs": np.array([1.0] * 50 + [0.0] * 950), "crop_probs": y.astype(float),
            "counted_infected": 1.0, "counted_uninfected": 1.0, "fields": 1, "recall": 1.0, "precision": 1.0}
    perfect = {"tp": 1000, "fn": 0, "tn": 1000, "fp": 0}
    row = simulate_sessions({0.1: pool}, FieldOptions(0.5, perfect), sessions=50)[0]
    assert row["crops_bias_pp"] == pytest.approx(0, abs=0.3) and row["bias_pp"] == pytest.approx(-5, abs=0.3)
    assert row["pool"]["crops"]["sensitivity"] == 1.0 and row["pool"]["sensitivity"] == 0.5


def test_sessions_of_whole_fields_count_every_detection_against_the_fields_own_truth():
    from benchmarks.fields import field_sessions
    from edge.field import FieldOptions
    perfect = {"tp": 1000, "fn": 0, "tn": 1000, "fp": 0}
    # fields of 200 red cells, 10 infected, each read right: no bias, whatever the level's nominal parasitemia
    exact = {"per_field": np.array([[200, 10, 200, 10]] * 5)}
    row = field_sessions({0.02: exact}, FieldOptions(0.5, perfect), sessions=20)[0]
    assert row["bias_pp"] == pytest.approx(0, abs=0.01) and row["true_percent"] == pytest.approx(5)
    assert row["fields_per_session"] == 10 and row["coverage_ci95"] == 1.0
    # 20 fragments a field counted as red cells (none called): 10 / 220 read, 10 / 200 true
    extra = {"per_field": np.array([[220, 10, 200, 10]] * 5)}
    row = field_sessions({0.05: extra}, FieldOptions(0.5, perfect), sessions=20)[0]
    assert row["raw_bias_pp"] == pytest.approx(100 * (10 / 220 - 10 / 200), abs=0.01)
    assert row["counted_per_true_red"] == pytest.approx(1.1) and row["fields_per_session"] == 10


def test_a_pool_by_patient_gives_each_groups_infected_crops_and_both_sensitivities():
    from benchmarks.fields import pool_by_patient
    pool = {"labels": np.array([1, 1, 0, 1, 1, 1]), "groups": np.array(["A", "A", "A", "B", "B", "B"]),
            "probs": np.array([0.9, 0.1, 0.9, 0.9, 0.9, 0.9]), "crop_probs": np.array([0.9, 0.9, 0.1, 0.1, 0.9, 0.9]),
            "infected_crops": {"A": 2, "B": 40}}
    rows = pool_by_patient(pool, 0.5)
    assert [(r["group"], r["infected_crops"], r["infected"]) for r in rows] == [("A", 2, 2), ("B", 40, 3)]
    assert (rows[0]["sensitivity"], rows[0]["crops_sensitivity"]) == (0.5, 1.0)
    assert rows[1]["sensitivity"] == 1.0 and rows[1]["crops_sensitivity"] == pytest.approx(2 / 3)


def _two_patient_pool(hits_a: int, hits_b: int) -> dict:
    # patients A and B, each 100 infected cells (hits_* of them called) and 1,000 uninfected (5 called)
    y = np.array(([1] * 100 + [0] * 1000) * 2)
    called = np.zeros(2200, bool)
    called[:hits_a] = called[1100:1100 + hits_b] = True
    called[100:105] = called[1200:1205] = True
    return {"labels": y, "probs": called.astype(float), "groups": np.array(["A"] * 1100 + ["B"] * 1100),
            "counted_infected": 1.0, "counted_uninfected": 1.0}


def test_the_bias_interval_over_patients_is_narrow_when_they_agree_and_wide_when_they_do_not():
    from benchmarks.fields import bias_over_patients
    from edge.field import FieldOptions
    opts = FieldOptions(0.5, {"tp": 800, "fn": 200, "tn": 995, "fp": 5})  # the card: Se 0.8, Sp 0.995
    lo, hi = bias_over_patients(_two_patient_pool(80, 80), 0.05, opts)  # both read as the card says
    assert -0.15 < lo < hi < 0.15
    # A finds every infected cell and B 60%: redrawn, the pool is A twice (+1.25 points: 5% read as 5% / 0.8),
    # B twice (-1.25) or one of each (0)
    lo, hi = bias_over_patients(_two_patient_pool(100, 60), 0.05, opts)
    assert lo == pytest.approx(-1.25, abs=0.2) and hi == pytest.approx(1.25, abs=0.2)


def test_single_patient_sessions_show_a_patient_whose_sensitivity_strays_from_the_card():
    from benchmarks.fields import single_patient_sessions
    from edge.field import FieldOptions
    opts = FieldOptions(0.5, {"tp": 800, "fn": 200, "tn": 995, "fp": 5})  # the card: Se 0.8, Sp 0.995
    # A reads as the card says; B finds 40% of its infected cells, and the card knows no spread between patients
    row = single_patient_sessions({0.05: _two_patient_pool(80, 40)}, opts, sessions=40)[0]
    a, b = row["per_patient"]
    assert (a["group"], b["group"], row["patients"]) == ("A", "B", 2)
    assert a["coverage_ci95"] > 0.8 and b["coverage_ci95"] < 0.2 and row["patients_covered_under_90"] == 1
    # B's 5% reads as (0.05 * 0.4 + 0.95 * 0.005 - 0.005) / 0.795 = 2.5%
    assert row["bias_pp_min"] == pytest.approx(-2.5, abs=0.4) and row["bias_pp_max"] == pytest.approx(0, abs=0.4)


def test_imaging_conditions_are_compared_on_the_same_cells(exported, prepared):
    from benchmarks.fields import conditions_paired
    from tests.conftest import CELLS
    from train.fieldpool import CONDITIONS
    m = load_classifier(exported / "tiny_int8.tflite")
    rows = conditions_paired(prepared, CELLS, m, FieldOptions(0.5, COUNTS), split="val", log=lambda *_: None)
    assert [r["condition"] for r in rows] == CONDITIONS
    # sharp, defocused and half scale lay the same cells: blur and scale come after
    assert rows[0]["truth_infected"] == rows[1]["truth_infected"] == rows[2]["truth_infected"] > 0
    sharp = rows[0]
    assert sharp["recall"] > 0.8 and sharp["cells"] > 20 and sharp["infected"] >= 1
    # the reference is the same found cells' own crops: one probability per counted cell
    assert sharp["crops"]["sensitivity"] is not None and 0 <= sharp["crops"]["specificity"] <= 1


def test_pools_split_by_contact_put_each_cell_in_one_bin():
    from benchmarks.fields import by_contact
    pools = {0.01: {"labels": np.array([1, 0, 1, 0]), "probs": np.array([0.9, 0.1, 0.2, 0.8]),
                    "shared": np.array([0.0, 0.0, 0.03, 0.3])},
             0.05: {"labels": np.array([1]), "probs": np.array([0.7]), "shared": np.array([0.05])}}
    rows = by_contact(pools, threshold=0.5)
    assert [r["cells"] for r in rows] == [2, 2, 0, 1] and sum(r["share_of_cells"] for r in rows) == pytest.approx(1)
    assert rows[0]["sensitivity"] == 1.0 and rows[0]["specificity"] == 1.0  # the two cells touching none
    assert rows[1]["sensitivity"] == 0.5 and rows[1]["specificity"] is None  # 0.03 and 0.05 (its upper edge)
    assert rows[3]["specificity"] == 0.0 and rows[3]["infected"] == 0


def test_the_real_photo_shrunk_and_recoloured_is_scored_against_its_scaled_annotation():
    from benchmarks.fields import real_fields_shifted
    m = load_classifier(FIELD_MODEL)
    opts = FieldOptions.at(operating_point(m, field_point(m)))
    rows = real_fields_shifted([(FIELD, FIELD_GT)], m, opts, shrink=(0.3,), recolour=(("hue +20", dict(hue=20)),),
                               log=lambda *_: None)
    assert [r["condition"] for r in rows] == ["x0.3 size", "hue +20"]
    small, hue = rows
    assert small["image"] == "896x1594" and hue["image"] == "1494x2656"  # the photo is 2988x5312 as displayed
    # its cells are ~113 px across as taken: the detector measures the shrunk ones, and still finds them
    assert 0.3 * 113 * 0.85 < small["diameter_px"] < 0.3 * 113 * 1.15
    assert small["fields_counted"] == hue["fields_counted"] == 1
    assert small["recall"] > 0.95 and hue["recall"] > 0.95 and small["precision"] > 0.9


def test_peak_memory_runs_edge_infer_on_the_photo_and_on_a_mosaic_of_it_with_cells_a_third_as_wide():
    from benchmarks.fields import peak_memory
    rows = peak_memory(FIELD_MODEL, "counting-fast", [FIELD])
    assert [r["image"] for r in rows] == ["16 MP photo as taken", "16 MP, cells a third as wide"]
    assert rows[0]["pixels"] == "2988x5312" and rows[1]["pixels"] == "2988x5313"  # 3 × 996 wide, 3 × 1771 high
    assert all(r["peak_rss_mb"] > 48 for r in rows)  # more than the decoded photo itself


def test_every_model_check_classifies_the_same_real_crops_with_each_model():
    from benchmarks.fields import every_model_on_real_crops
    from edge.detect import crop
    rgb = load_image(FIELD)
    crops = [crop(rgb, c) for c in detect(rgb).cells if c.status == "ok"]
    models = [FIELD_MODEL, ROOT / "models" / "cnn" / "cnn_int8.tflite"]
    rows = every_model_on_real_crops(crops, models, log=lambda *_: None)
    assert [r["model"] for r in rows] == [m.name for m in models] and all(r["crops"] == len(crops) > 200 for r in rows)
    assert all(0 <= r["parasitized_at_counting"] <= r["parasitized_at_card"] for r in rows)


def test_synthetic_truth_says_where_each_cell_was_laid(crops_by_group):
    from train.synthetic import cell_mask
    pos, neg = crops_by_group
    f = make_field(pos[:1], neg[:1], SynthParams(width=600, height=600, n_cells=1, parasitemia=1.0, wbc=0, platelets=0,
                                                  vignette=0, noise=0, jpeg_quality=None, seed=3))
    (t,) = f.truth
    src = dict(pos)[t.source]

    def diff(turns):
        nih = np.rot90(src, turns)
        inner = cv2.erode(cell_mask(np.ascontiguousarray(nih)).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        (x, y), (h, w) = t.corner, nih.shape[:2]
        if y + h > 600 or x + w > 600:
            return 255.0
        return float(np.abs(f.rgb[y:y + h, x:x + w].astype(float) - nih)[inner].mean())

    assert diff(t.turns) < 8 < min(diff(k) for k in range(4) if k != t.turns)


def test_synthetic_infected_cells_can_be_laid_wider_than_the_crops(crops_by_group):
    pos, neg = crops_by_group

    def radius(parasitemia, scale):
        p = SynthParams(width=600, height=600, n_cells=1, parasitemia=parasitemia, wbc=0, platelets=0, seed=2,
                        infected_scale=scale)
        (t,) = make_field(pos[:1], neg[:1], p).truth
        return t.r
    assert radius(1.0, 1.5) == pytest.approx(1.5 * radius(1.0, 1.0), rel=0.03)
    assert radius(0.0, 1.5) == radius(0.0, 1.0)  # uninfected cells keep their size


def test_crowding_counts_touching_regions_and_their_shared_rim():
    from benchmarks.recut import crowding
    from edge.detect import Detection
    lab = np.zeros((40, 60), np.int32)
    lab[5:15, 5:15], lab[5:15, 15:25], lab[25:35, 40:50] = 1, 2, 3  # 1 and 2 share a side; 3 stands alone
    c = crowding([Detection([], 10.0, 1.0, labels=lab)])
    assert c["regions"] == 3 and c["touching"] == pytest.approx(2 / 3)
    assert c["median_shared_rim"] == pytest.approx(10 / 36)  # 1's rim: 36 px, of which its side by 2: 10 px


def test_a_session_keeps_counts_not_the_pixels_of_each_field(tmp_path):
    from edge.fieldrun import file_items, run_session
    from edge.operating import operating_point
    m = load_classifier(FIELD_MODEL)
    session, sdir, code = run_session(file_items([FIELD]), m, None, FieldOptions.at(operating_point(m, "counting")),
                                      tmp_path, None, log=lambda *_: None)
    (res,) = session.fields
    assert code == 0 and res.rbc > 250 and res.detection is None and not res.crops
    assert "data:image/jpeg;base64," in (sdir / "report.html").read_text()


def test_quality_gate_rejects_a_grayscale_field(real_field):
    grey = np.repeat(cv2.cvtColor(real_field, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    reason, m = quality(grey, detect(grey), QualityParams())
    assert "no stain colour" in reason and m["colour"] == 0
    assert quality(real_field, detect(real_field), QualityParams())[1]["colour"] > 50


def test_quality_gate_counts_a_pale_stain_and_a_grey_picture_saved_as_colour_jpeg_is_still_grey(real_field):
    hsv = cv2.cvtColor(real_field, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = (hsv[..., 1] * 0.1).astype(np.uint8)  # a tenth of the saturation: most of the field near grey
    pale = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    chroma = pale.max(axis=2).astype(int) - pale.min(axis=2)
    assert np.median(chroma) < 8  # what the gate once took for a grayscale image
    reason, m = quality(pale, detect(pale), QualityParams())
    assert "stain colour" not in reason and m["colour"] >= 3
    grey = np.repeat(cv2.cvtColor(real_field, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    ok, jpg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90])  # 3-channel JPEG of a grey picture
    grey_jpeg = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert "no stain colour" in quality(grey_jpeg, detect(grey_jpeg), QualityParams())[0]
