"""Where field mode's crops differ from the NIH crops the classifier learnt from.

1. Synthetic fields of the validation patients (no vignetting, noise or JPEG, so only the cutting
   differs): each found cell classified four ways — its NIH crop; its own mask cut from the composed
   field (what the neighbours' overlap changes); its own mask inside the detector's box; field mode's
   crop (the detector's box and mask) — with the counting point's sensitivity and specificity.
2. The real slide: the dev set's crops of slide C12 found in the four real photos (masked template
   matching), against the detector's cell at the same place: box size, mask IoU and area.
3. Crowding on both: the share of split regions that touch another, and of their rim that is shared.
4. The re-cut in a real field's geometry: validation crops laid into the real photos in place of real cells
   of their size (as cut, and restained to the slide's colour), among the slide's own touching cells; field
   mode's calls of them against their own crops' (the share of sensitivity the correction scales by is
   measured on synthetic fields: does it hold among real neighbours?).

    python -m benchmarks.recut → benchmarks/results/recut.{md,json}
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from edge.card import atomic_write_text
from edge.detect import Detection, detect
from edge.field import FieldOptions, analyze, classify_crops
from edge.images import load_image
from edge.operating import field_point, operating_point
from edge.preprocess import resize_rgb
from edge.runtime import default_model, load_classifier
from train.fieldpool import found_cells, patient_crops
from train.fieldscore import contains
from train.synthetic import SynthParams, _paste, cell_mask, make_field, smear_colour

CLEAN = dict(vignette=0, noise=0, jpeg_quality=None, wbc=0, platelets=0)
WAYS = ("nih_crop", "own_mask_in_field", "own_mask_in_detector_box", "field_mode")


def four_ways(model, groups: dict[str, tuple[list, list]], fields_per_group: int = 2, parasitemia: float = 0.05,
              seed: int = 7000, log=print) -> dict:
    """groups: the validation patients' crops (train.fieldpool.patient_crops)."""
    point = operating_point(model, "counting")
    opts = FieldOptions.at(point)
    y, probs, outside, k = [], {w: [] for w in WAYS}, [], 0
    for _, (pos, neg) in sorted(groups.items()):
        source = dict(pos + neg)
        for _ in range(fields_per_group):
            f = make_field(pos, neg, SynthParams(parasitemia=parasitemia, seed=seed + k, **CLEAN))
            k += 1
            res = analyze(f.rgb, "synthetic", model, opts)
            H, W = f.rgb.shape[:2]
            crops = {w: [] for w in WAYS}
            for t, c, call in found_cells(res, f.red_cells):
                nih = t.own_crop(source)
                mask = cell_mask(nih)
                (x0, y0), (h, w) = t.corner, mask.shape
                own = np.zeros((H, W), bool)
                own[y0:y0 + h, x0:x0 + w] = mask
                bx, by, bw, bh = c.box
                in_box = own[by:by + bh, bx:bx + bw]
                crops["nih_crop"].append(nih)
                crops["own_mask_in_field"].append(np.where(mask[..., None], f.rgb[y0:y0 + h, x0:x0 + w], 0))
                crops["own_mask_in_detector_box"].append(np.where(in_box[..., None], f.rgb[by:by + bh, bx:bx + bw], 0))
                probs["field_mode"].append(call.prob_parasitized)
                outside.append(1 - in_box.sum() / mask.sum())
                y.append(int(t.label == "Parasitized"))
            for way in WAYS[:3]:
                if crops[way]:
                    probs[way] += model.predict(np.stack([resize_rgb(np.ascontiguousarray(c), model.size)
                                                          for c in crops[way]])).tolist()
    y, outside = np.array(y), np.array(outside)
    log(f"  {k} synthetic validation fields, {len(y)} cells ({int(y.sum())} infected)")

    def rates(sel):
        return {w: {"sensitivity": float(np.mean(np.array(probs[w])[sel & (y == 1)] >= point.threshold)),
                    "specificity": float(np.mean(np.array(probs[w])[sel & (y == 0)] < point.threshold))} for w in WAYS}

    cut = outside >= 0.02
    return {"fields": k, "cells": int(len(y)), "infected": int(y.sum()), "threshold": point.threshold,
            "all": rates(np.ones(len(y), bool)), "cut_by_box": {"share": float(cut.mean()), **rates(cut)},
            "whole_in_box": rates(~cut)}


def real_slide(fields_root: Path, crops_root: Path, min_match: float = 0.95, log=print) -> dict:
    """Each dev-set crop of this slide found in its photo (the crops are in the stored frame: one quarter
    turn from the displayed one), against the detector's cell that overlaps it most."""
    rows, dets = [], []
    for img in sorted((fields_root / "Img").glob("*.jpg")):
        rgb = load_image(img)
        det = detect(rgb)
        dets.append(det)
        G = rgb[..., 1]
        g = cv2.resize(G, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        for p in sorted(crops_root.glob(f"*/*{img.stem}_cell_*")):
            ck = np.ascontiguousarray(np.rot90(load_image(p), 1))
            m = cell_mask(ck)
            h, w = m.shape
            mk = cv2.erode(m.astype(np.uint8) * 255, np.ones((3, 3), np.uint8))
            t = cv2.resize(ck[..., 1], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
            r = cv2.matchTemplate(g, t, cv2.TM_CCOEFF_NORMED, mask=cv2.resize(mk, t.shape[::-1], interpolation=cv2.INTER_NEAREST))
            r[~np.isfinite(r)] = -1
            _, _, _, (x, y) = cv2.minMaxLoc(r)
            x0, y0 = max(0, 2 * x - 6), max(0, 2 * y - 6)
            r = cv2.matchTemplate(G[y0:y0 + h + 12, x0:x0 + w + 12], ck[..., 1], cv2.TM_CCOEFF_NORMED, mask=mk)
            r[~np.isfinite(r)] = -1
            _, score, _, (dx, dy) = cv2.minMaxLoc(r)
            if score < min_match:
                continue
            x, y = x0 + dx, y0 + dy
            best = max(((_iou(c, m, x, y), c) for c in det.cells), key=lambda v: v[0], default=(0.0, None))
            if best[1] is None:
                continue
            c = best[1]
            rows.append({"crop": p.name, "match": score, "box_w_ratio": c.box[2] / w, "box_h_ratio": c.box[3] / h,
                         "iou": best[0], "area_ratio": float(c.mask.sum() / m.sum()), "status": c.status})
    log(f"  {len(rows)} dev-set crops found in the real photos")
    med = {k: float(np.median([r[k] for r in rows])) for k in ("box_w_ratio", "box_h_ratio", "iou", "area_ratio")}
    return {"matched": len(rows), "median": med, "crowding": crowding(dets), "rows": rows}


def _iou(c, m: np.ndarray, x: int, y: int) -> float:
    bx, by, bw, bh = c.box
    X0, Y0, X1, Y1 = min(bx, x), min(by, y), max(bx + bw, x + m.shape[1]), max(by + bh, y + m.shape[0])
    a = np.zeros((Y1 - Y0, X1 - X0), bool)
    b = a.copy()
    a[by - Y0:by - Y0 + bh, bx - X0:bx - X0 + bw] = c.mask
    b[y - Y0:y - Y0 + m.shape[0], x - X0:x - X0 + m.shape[1]] = m
    return float((a & b).sum() / max(1, (a | b).sum()))


def crowding(dets: list[Detection]) -> dict:
    """Share of split regions touching another, and the median share of a region's rim shared with one."""
    k3 = np.ones((3, 3), np.uint8)
    shares = []
    for det in dets:
        lab = det.labels
        inner = lab > 0
        big = np.float32(1 << 20)
        hi = cv2.dilate(lab.astype(np.float32), k3)
        lo = cv2.erode(np.where(inner, lab, big).astype(np.float32), k3)
        shared = inner & (((hi != lab) & (hi > 0)) | ((lo != lab) & (lo < big)))  # next to another region
        rim = shared | (inner & (cv2.erode(inner.view(np.uint8), k3) == 0))  # or next to background
        n = int(lab.max()) + 1
        ids = np.unique(lab[inner])
        shares.append(np.bincount(lab[shared], minlength=n)[ids] / np.maximum(np.bincount(lab[rim], minlength=n)[ids], 1))
    s = np.concatenate(shares) if shares else np.zeros(0)
    return {"regions": int(len(s)), "touching": float(np.mean(s > 0)), "median_shared_rim": float(np.median(s))}


def synthetic_crowding(groups: dict[str, tuple[list, list]], fields: int = 8, seed: int = 9000) -> dict:
    return crowding([detect(make_field(pos, neg, SynthParams(parasitemia=0.05, seed=seed + j)).rgb)
                     for j, (pos, neg) in enumerate(list(groups.values())[:fields])])


def _absorbance(px: np.ndarray, light) -> np.ndarray:
    return -np.log(np.clip(px.astype(np.float32) / np.maximum(np.asarray(light, np.float32), 1), 1e-3, 1))


def real_geometry(model, groups: dict[str, tuple[list, list]], fields_root: Path, restain: bool, rounds: int = 4,
                  per_photo: int = 40, seed: int = 0) -> dict:
    """Half infected, half uninfected validation crops, each laid (Beer-Lambert, as synthetic fields lay them) in
    place of a real cell of about its area, which is first set to the local background colour; the slide's
    other cells stay as photographed. restain: each crop's per-channel absorbance scaled so its median cell
    matches the slide's (else it keeps its own slide's colour, which the detector sees as unlike its
    neighbours). Field mode's calls of the laid cells (found inside exactly one counted cell) against the same
    rule on their own crops (restained, when they are)."""
    point = operating_point(model, field_point(model))
    opts = FieldOptions.at(point)
    # (label, crop, its slide's light, its cell's area): each slide's light and each crop's area measured once
    lights = [smear_colour(neg or pos) for pos, neg in groups.values()]
    pool = [(y, c, light, int(cell_mask(c).sum())) for (pos, neg), light in zip(groups.values(), lights)
            for y, cs in ((1, pos), (0, neg)) for _, c in cs]
    rng = np.random.default_rng(seed)
    photos = [load_image(p) for p in sorted((fields_root / "Img").glob("*.jpg"))]
    rows = []
    for im in photos:
        det = detect(im)
        H, W = im.shape[:2]
        taken = np.zeros((H, W), bool)
        for c in det.cells:
            x, y, w, h = c.box
            taken[y:y + h, x:x + w] |= c.mask
        disc = cv2.resize(det.eyepiece.view(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
        slide_a = np.median(_absorbance(im[taken], np.median(im[disc & ~taken], axis=0)), axis=0)
        ok = [c for c in det.cells if c.status == "ok"]
        for _ in range(rounds):
            canvas, laid = im.astype(np.float32), []
            for j, ci in enumerate(rng.choice(len(ok), min(per_photo, len(ok)), replace=False)):
                c, want = ok[ci], int(j % 2 == 0)
                x, y, w, h = c.box
                for _ in range(200):  # a crop of about the cell's area, so that it fills the real cell's place
                    label, cr, light, area = pool[rng.integers(len(pool))]
                    if label == want and 0.85 <= area / c.mask.sum() <= 1.15:
                        break
                else:
                    continue
                X0, Y0, X1, Y1 = max(0, x - w), max(0, y - h), min(W, x + 2 * w), min(H, y + 2 * h)
                bg = np.median(canvas[Y0:Y1, X0:X1][~taken[Y0:Y1, X0:X1]], axis=0)
                hole = np.zeros((H, W), np.uint8)
                hole[y:y + h, x:x + w] = c.mask
                canvas[cv2.dilate(hole, np.ones((7, 7), np.uint8)).astype(bool)] = bg
                cr = np.ascontiguousarray(np.rot90(cr, int(rng.integers(4))))
                m = cell_mask(cr)
                if restain:
                    a = _absorbance(cr, light)
                    cr = np.where(m[..., None], np.clip(bg * np.exp(-a * slide_a / np.maximum(np.median(a[m], axis=0), 1e-3)),
                                                        0, 255), 0).astype(np.uint8)
                    light = bg
                if _paste(canvas, cr, m, *c.centre, light):  # its transmittance, over this slide's light
                    laid.append((c.centre, label, cr))
            res = analyze(np.clip(canvas, 0, 255).astype(np.uint8), "laid", model, opts)
            counted = [(cc, call) for cc, call in zip(res.detection.cells, res.cells) if call.prob_parasitized is not None]
            own = classify_crops([cr for _, _, cr in laid], model, opts.batch, opts.screen)
            for ((cx, cy), label, _), p_own in zip(laid, own):
                hits = [(cc, call) for cc, call in counted if contains(cc, cx, cy)]
                rows.append((label, float(p_own), hits[0][1].prob_parasitized if len(hits) == 1 else None,
                             hits[0][0].shared if len(hits) == 1 else None))
    y = np.array([r[0] for r in rows])
    found = np.array([r[2] is not None for r in rows])
    own = np.array([r[1] for r in rows]) >= point.threshold
    field = np.array([r[2] or 0.0 for r in rows]) >= point.threshold
    inf, un = found & (y == 1), found & (y == 0)
    return {"restained": restain, "laid": len(rows), "found": float(found.mean()), "infected": int(inf.sum()),
            "uninfected": int(un.sum()), "threshold": point.threshold, "point": point.name,
            "crops_sensitivity": float(own[inf].mean()), "field_sensitivity": float(field[inf].mean()),
            "kept": float(field[inf].sum() / max(1, own[inf].sum())),
            "crops_false_positive": float(own[un].mean()), "field_false_positive": float(field[un].mean()),
            "touching": float(np.mean([r[3] > 0 for r in rows if r[3] is not None]))}


def markdown(r: dict) -> str:
    a = r["four_ways"]
    names = {"nih_crop": "the NIH crop", "own_mask_in_field": "its own mask, cut from the field",
             "own_mask_in_detector_box": "its own mask in the detector's box", "field_mode": "field mode's crop"}
    lines = ["# Where field mode's crops differ from the NIH crops", "",
             f"## The same cells cut four ways (synthetic fields of the validation patients, no vignetting, noise or "
             f"JPEG; {a['fields']} fields, {a['cells']} cells, {a['infected']} infected; {Path(r['model']).name} at "
             f"counting, threshold {a['threshold']:.4f})", "",
             f"| cut | sensitivity | specificity | sensitivity, cells with ≥ 2% outside the detector's box "
             f"({a['cut_by_box']['share']:.0%}) | sensitivity, the rest |", "|---|---:|---:|---:|---:|"]
    for w in WAYS:
        lines.append(f"| {names[w]} | {a['all'][w]['sensitivity']:.3f} | {a['all'][w]['specificity']:.4f} | "
                     f"{a['cut_by_box'][w]['sensitivity']:.3f} | {a['whole_in_box'][w]['sensitivity']:.3f} |")
    s, c = r["real_slide"], r["real_slide"]["crowding"]
    m, sc = s["median"], r["synthetic_crowding"]
    lines += ["", "## The real slide", "",
              f"{s['matched']} dev-set crops of slide C12 found in its 4 photos (masked template matching, correlation "
              f"≥ 0.95), against the detector's cell there (medians): box width {m['box_w_ratio']:.2f} and height "
              f"{m['box_h_ratio']:.2f} of the crop's, mask IoU {m['iou']:.2f}, mask area {m['area_ratio']:.2f} of the "
              "crop's.", "", "## Crowding (split regions at working resolution)", "",
              "| fields | regions | touching another | median share of the rim shared |", "|---|---:|---:|---:|",
              f"| real (4 photos) | {c['regions']} | {c['touching']:.2f} | {c['median_shared_rim']:.2f} |",
              f"| synthetic, default spacing (8 validation fields) | {sc['regions']} | {sc['touching']:.2f} | "
              f"{sc['median_shared_rim']:.2f} |"]
    if r.get("real_geometry"):
        g0 = r["real_geometry"][0]
        lines += ["", f"## The re-cut among real neighbours ({g0['point']}, threshold {g0['threshold']:.4f})", "",
                  "Validation crops laid into the 4 real photos in place of real cells of about their area (half "
                  "infected), among the slide's own cells; field mode's calls of those it counts, against the same "
                  "rule on their own crops. Restained: each crop's absorbance scaled to the slide's median cell.", "",
                  "| crops | laid | counted | infected | their crops' sensitivity | field mode's | kept | uninfected | "
                  "their crops' false positives | field mode's | touching a neighbour |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g in r["real_geometry"]:
            lines.append(f"| {'restained' if g['restained'] else 'as cut'} | {g['laid']} | {g['found']:.1%} | "
                         f"{g['infected']} | {g['crops_sensitivity']:.3f} | {g['field_sensitivity']:.3f} | "
                         f"**{g['kept']:.3f}** | {g['uninfected']} | {g['crops_false_positive']:.3f} | "
                         f"{g['field_false_positive']:.3f} | {g['touching']:.2f} |")
    return "\n".join(lines) + "\n"


def run(model_path: Path, data_dir: Path, crops_root: Path, fields_root: Path, out: Path, log=print) -> dict:
    model = load_classifier(model_path)
    from benchmarks.hardware import machine
    groups = patient_crops(data_dir, crops_root, "val")  # read once, for both synthetic measurements
    log("the same cells cut four ways")
    res = {"model": str(model_path), "machine": machine(), "four_ways": four_ways(model, groups, log=log)}
    log("the real slide")
    res["real_slide"] = real_slide(fields_root, crops_root, log=log)
    res["synthetic_crowding"] = synthetic_crowding(groups)
    log("the re-cut among real neighbours")
    res["real_geometry"] = [real_geometry(model, groups, fields_root, restain) for restain in (False, True)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recut.json", json.dumps(res, indent=1, default=float) + "\n")
    atomic_write_text(out / "recut.md", markdown(res))
    return res


if __name__ == "__main__":
    r = run(default_model("field"), Path("data/prepared"), Path("../shared/data/nih_malaria_dev"),
            Path("../shared/data/nih_fields/239C12NThinF"), Path("benchmarks/results"))
    print(markdown(r))
