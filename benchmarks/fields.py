"""Field mode measured: detection on the real NIH fields, counts on synthetic sessions of known
parasitemia, and speed per field. Results go to benchmarks/results/fields.{md,json}.

Synthetic sessions are built in two steps so that 600 sessions of 2,000 cells stay affordable on two
cores: (1) for each true parasitemia, fields composed at it from the test split's crops (one patient
group per field) go through the whole pipeline — detection, crops cut by the detector, classification —
and every ground-truth cell the detector found keeps its true label and the probability the classifier
gave its re-cut crop (train/fieldpool.py); (2) each session draws 2,000 counted cells from its level's
pool, infected and uninfected in the proportion the detector counts them at that parasitemia, and is
counted and corrected like a real one; its truth is the smear's parasitemia.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.latency import edge_infer_hook
from edge.card import atomic_write_text
from edge.detect import crop
from edge.field import FieldOptions, analyze, classify_crops
from edge.operating import describe, field_point, operating_point
from edge.images import load_image
from edge.parasitemia import estimate, field_rates, rogan_gladen
from edge.runtime import load_classifier
from train.fieldpool import CONDITIONS, VARIANTS, field_pool, found_cells, patient_crops
from train.fieldscore import GTPoint, contains, exif_orientation, read_point_set, score
from train.synthetic import SynthParams, load_crops, make_field



def real_fields(root: Path, model, opts: FieldOptions, log=print, crops: list | None = None) -> dict:
    """crops: if given, field mode's crop of every counted cell is appended to it (for every_model_on_real_crops)."""
    out, tot, tot_core = [], None, None
    session_pos = session_n = 0
    for img in sorted((root / "Img").glob("*.jpg")):
        t0 = time.perf_counter()
        rgb = load_image(img)
        t_dec = time.perf_counter() - t0
        res = analyze(rgb, str(img), model, opts)
        det = res.detection
        if crops is not None:
            crops += [crop(rgb, c) for c in det.cells if c.status == "ok"]
        pts = read_point_set(root / "GT" / f"{img.stem}.txt", exif_orientation(img))
        s = score(det.cells, pts, det.eyepiece, det.scale)
        r = max(1, int(det.diameter_px * det.scale / 2))
        core = cv2.erode(det.eyepiece.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
        s_core = score(det.cells, pts, core.astype(bool), det.scale)
        # every annotated red cell classified: the call on the detection that holds its point
        ok = [(c, call) for c, call in zip(det.cells, res.cells) if c.status == "ok"]
        called = [next((call.label for c, call in ok if contains(c, p.x, p.y)), "") for p in pts
                  if p.label != "White_Blood_Cell"]
        wbc = [p for p in pts if p.label == "White_Blood_Cell"]
        wbc_kept = sum(any(contains(c, p.x, p.y) for c, _ in ok) for p in wbc)
        row = {"field": img.name, **s.as_dict(), "precision_whole_cells": s_core.precision,
               "detections_whole_cells": s_core.detections, "wbc_gt": len(wbc), "wbc_counted_as_rbc": wbc_kept,
               "annotated_classified": sum(bool(c) for c in called),
               "annotated_called_parasitized": called.count("Parasitized"),
               "rbc_counted": res.rbc, "positive": res.positive, "quality": res.quality,
               "seconds": {"decode": round(t_dec, 3), **res.seconds}, "status": res.status}
        out.append(row)
        session_pos += res.positive
        session_n += res.rbc
        tot = s.__dict__.copy() if tot is None else {k: tot[k] + v for k, v in s.__dict__.items()}
        tot_core = (s_core.__dict__.copy() if tot_core is None
                    else {k: tot_core[k] + v for k, v in s_core.__dict__.items()})
        log(f"  {img.name}: recall {s.recall:.4f}, precision {s.precision:.4f} ({s_core.precision:.4f} whole cells), "
            f"{res.positive}/{res.rbc} positive, {row['seconds']}")
    e = estimate(session_pos, session_n, opts.counts, by_patient=opts.by_patient, spread=opts.spread, recut=opts.recut)
    return {"fields": out, "gt": tot["gt"], "found": tot["found"], "recall": tot["found"] / tot["gt"],
            "detections": tot["detections"], "precision": tot["correct"] / tot["detections"],
            "precision_whole_cells": tot_core["correct"] / tot_core["detections"],
            "annotated_classified": sum(r["annotated_classified"] for r in out),
            "annotated_called_parasitized": sum(r["annotated_called_parasitized"] for r in out),
            "session": e.as_dict()}


# the real photos as another lab's microscope might give them: a lower magnification or smaller sensor
# (cells from 113 px across down to 17), and at half size the stain shifts of screen_under_shift
SHRINK = (1.0, 0.6, 0.45, 0.35, 0.27, 0.2, 0.15)
RECOLOUR = (("hue -20", dict(hue=-20)), ("hue +20", dict(hue=20)), ("saturation x0.6", dict(sat=0.6)),
            ("saturation x1.5", dict(sat=1.5)), ("gamma 0.7", dict(gamma=0.7)), ("gamma 1.4", dict(gamma=1.4)))


def real_fields_shifted(photos: list[tuple[Path, Path]], model, opts: FieldOptions, shrink=SHRINK,
                        recolour=RECOLOUR, recolour_at: float = 0.5, log=print) -> list[dict]:
    """The annotated real photos (image, point-set file) shrunk and recoloured: detection scored against
    the annotation (its points scaled with the image), and the calls counted (every annotated cell is
    uninfected). Made shifts of one slide stand in for the fields of other labs, which are scored from
    outside: this says whether the detector's scale and colour rules hold across them."""
    conds = [(f"x{f:g} size", f, {}) for f in shrink] + [(name, recolour_at, kw) for name, kw in recolour]
    acc = {name: dict(gt=0, found=0, detections=0, correct=0, rbc=0, positive=0, counted=0, diameters=[])
           for name, _, _ in conds}
    size = {}
    for img, gt in photos:
        rgb = load_image(img)
        pts = read_point_set(gt, exif_orientation(img))
        for name, f, kw in conds:
            x = rgb if f == 1 else cv2.resize(rgb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
            if kw:
                x = shifted(x[None], **kw)[0]
            res = analyze(x, f"{img.name} {name}", model, opts, keep_positive_crops=False)
            det = res.detection
            sc = score(det.cells, [GTPoint(q.x * f, q.y * f, q.label) for q in pts], det.eyepiece, det.scale)
            a = acc[name]
            for k in ("gt", "found", "detections", "correct"):
                a[k] += getattr(sc, k)
            a["rbc"] += res.rbc
            a["positive"] += res.positive
            a["counted"] += res.status == "ok"
            a["diameters"].append(round(det.diameter_px, 1))
            size[name] = f"{x.shape[1]}x{x.shape[0]}"
    rows = []
    for name, f, _ in conds:
        a = acc[name]
        rows.append({"condition": name, "image": size[name], "fields": len(photos), "fields_counted": a["counted"],
                     "diameter_px": float(np.median(a["diameters"])), "recall": a["found"] / max(a["gt"], 1),
                     "precision": a["correct"] / max(a["detections"], 1), "rbc": a["rbc"], "positive": a["positive"]})
        log(f"  {name}: {rows[-1]}")
    return rows


def every_model_on_real_crops(crops: list[np.ndarray], model_paths: list[Path], log=print) -> list[dict]:
    """The crops field mode cuts from the real (all uninfected) fields, classified by each shipped model at
    its card threshold and its counting point: how many it calls Parasitized."""
    rows = []
    for path in model_paths:
        m = load_classifier(path)
        p = classify_crops(crops, m)
        ops = m.card.operating_points or {}
        row = {"model": path.name, "crops": len(crops), "card_threshold": m.card.threshold,
               "parasitized_at_card": int(np.sum(p >= m.card.threshold))}
        if "counting" in ops:
            row.update(counting_threshold=ops["counting"]["threshold"],
                       parasitized_at_counting=int(np.sum(p >= ops["counting"]["threshold"])))
        rows.append(row)
        log(f"  {path.name}: {row['parasitized_at_card']} of {len(crops)} crops Parasitized at the card threshold, "
            f"{row.get('parasitized_at_counting', '-')} at counting")
    return rows


# stain and camera shifts applied to the validation crops: what another lab's slides might do to them
SHIFTS = {"none": {}, "hue +8": dict(hue=8), "hue -8": dict(hue=-8), "saturation x0.6": dict(sat=0.6),
          "saturation x1.5": dict(sat=1.5), "gamma 0.7": dict(gamma=0.7), "gamma 1.4": dict(gamma=1.4),
          "blur 1.5 px": dict(blur=1.5), "half resolution": dict(scale=0.5),
          "exposure x0.9": dict(exposure=0.9), "exposure x0.8": dict(exposure=0.8)}


def shifted(x: np.ndarray, hue: float = 0, sat: float = 1.0, gamma: float = 1.0, blur: float = 0,
            scale: float = 1.0, exposure: float = 1.0) -> np.ndarray:
    """Crops (uint8 N×S×S×3, black background) recoloured, darkened (exposure: every channel × it, as
    a dimmer lamp or shorter exposure gives), blurred or seen at a lower resolution; the background
    stays black."""
    out = np.empty_like(x)
    for i, im in enumerate(x):
        v = im
        if hue or sat != 1:
            hsv = cv2.cvtColor(im, cv2.COLOR_RGB2HSV).astype(np.float32)
            hsv[..., 0] = (hsv[..., 0] + hue) % 180
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
            v = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
        if gamma != 1:
            v = (255 * (v / 255.0) ** gamma).astype(np.uint8)
        if exposure != 1:
            v = np.clip(v * exposure, 0, 255).astype(np.uint8)
        if blur:
            v = cv2.GaussianBlur(v, (0, 0), blur)
        if scale != 1:
            n = im.shape[0]
            v = cv2.resize(cv2.resize(v, (int(n * scale),) * 2, interpolation=cv2.INTER_AREA), (n, n))
        out[i] = np.where(im.max(axis=2, keepdims=True) > 0, v, 0)
    return out


def screen_under_shift(model, point, data_dir: Path, log=print) -> list[dict]:
    """A screened point against its deciding model alone, on the validation crops under each shift: how
    many of the model's own counting positives the screen still forwards, and both rules' rates."""
    from edge.operating import predict
    from train.data import load_prepared
    d = load_prepared(data_dir)
    idx = d.indices("val")
    x0, y = np.asarray(d.images[idx]), d.labels[idx]
    rows = []
    for name, kw in SHIFTS.items():
        x = shifted(x0, **kw)
        p_alone, p_screened = model.predict(x), predict(model, x, point.screen)
        alone, screened = p_alone >= point.threshold, p_screened >= point.threshold
        solo = rates(y, p_alone, point.threshold)
        rows.append({"shift": name, "kept": float(screened[alone].mean()) if alone.any() else None,
                     "sensitivity_alone": solo["sensitivity"], "specificity_alone": solo["specificity"],
                     **rates(y, p_screened, point.threshold)})
        log(f"  {name}: the screen keeps {rows[-1]['kept']:.3f} of the model's counting positives")
    return rows


def counted_share(pool: dict, pi: float) -> float:
    """Of a smear at `pi`, the share of the counted cells that is infected when the detector counts a share
    a of the infected cells and b of the uninfected: pi·a / (pi·a + (1 − pi)·b)."""
    a, b = pool["counted_infected"], pool["counted_uninfected"]
    return pi * a / (pi * a + (1 - pi) * b)


def _draw(rng, pos: np.ndarray, neg: np.ndarray, share: float, n_cells: int) -> np.ndarray:
    """One session's cells (with replacement): a binomial share of them from `pos`, the rest from `neg`."""
    n_inf = rng.binomial(n_cells, share)
    return np.concatenate([rng.choice(pos, n_inf), rng.choice(neg, n_cells - n_inf)])


def _scored(positive: int, n_cells: int, pi: float, opts: FieldOptions, seed: int,
            crops: bool = False) -> tuple[float, float, bool, float]:
    """A session's positive calls corrected as field mode corrects them, against the smear's true `pi`:
    (error, raw error, whether the interval covers pi, its width), in points. crops: the calls were read from
    the cells' own NIH crops, so the sensitivity is not scaled for field mode's re-cut."""
    e = estimate(positive, n_cells, opts.counts, draws=4000, seed=seed, by_patient=opts.by_patient, spread=opts.spread,
                 recut=(0, 0, 0) if crops else opts.recut)
    lo, hi = e.parasitemia_ci95
    return e.parasitemia_percent - 100 * pi, e.raw_percent - 100 * pi, lo <= 100 * pi <= hi, hi - lo


def simulate_sessions(pools: dict[float, dict], opts: FieldOptions, sessions: int = 200, n_cells: int = 2000,
                      seed: int = 0) -> list[dict]:
    """pools: true parasitemia → the field pool composed at that parasitemia. Each session draws its
    infected and uninfected cells from its own level's pool, so an uninfected cell has as many infected
    neighbours (whose parasites can reach into its crop) as it would in such a smear, and in the
    proportion the detector counts them (`counted_share`).
    Where the pool has the cells' own NIH crops classified, the same sessions are also read from those
    (`crops_bias_pp`): the bias left when the counted cells are read from their own crops, not re-cut."""
    rng = np.random.default_rng(seed)
    rows = []
    for pi, pool in pools.items():
        y = pool["labels"]
        readings = {"field": pool["probs"]}
        if "crop_probs" in pool:
            readings["crops"] = pool["crop_probs"]
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        share = counted_share(pool, pi)
        err, raw_err, cover, width = ({k: [] for k in readings} for _ in range(4))
        for _ in range(sessions):
            cells = _draw(rng, pos, neg, share, n_cells)
            mc_seed = int(rng.integers(1 << 31))
            for k, probs in readings.items():
                e, r, c, w = _scored(int((probs[cells] >= opts.threshold).sum()), n_cells, pi, opts, mc_seed,
                                     crops=k == "crops")
                err[k].append(e)
                raw_err[k].append(r)
                cover[k].append(c)
                width[k].append(w)
        floor = np.abs(rng.binomial(n_cells, pi, 100_000) / n_cells - pi).mean() * 100
        e, r = err["field"], raw_err["field"]
        rows.append({"parasitemia_percent": 100 * pi, "sessions": sessions, "cells": n_cells,
                     "bias_pp": float(np.mean(e)), "mae_pp": float(np.mean(np.abs(e))),
                     "binomial_floor_mae_pp": float(floor), "coverage_ci95": float(np.mean(cover["field"])),
                     "mean_ci95_width_pp": float(np.mean(width["field"])),
                     "raw_bias_pp": float(np.mean(r)), "raw_mae_pp": float(np.mean(np.abs(r))),
                     "crops_bias_pp": float(np.mean(err["crops"])) if "crops" in err else None,
                     "crops_coverage_ci95": float(np.mean(cover["crops"])) if "crops" in cover else None,
                     "bias_ci95_over_patients": (list(bias_over_patients(pool, pi, opts, n_cells))
                                                 if "groups" in pool else None),
                     "pool": pool_summary(pool, opts.threshold)})
    return rows


def single_patient_sessions(pools: dict[float, dict], opts: FieldOptions, sessions: int = 50, n_cells: int = 2000,
                            min_infected: int = 10, seed: int = 0) -> list[dict]:
    """Sessions of one patient each, as a smear is: all 2,000 cells drawn from one patient group's found
    cells (with replacement, in the share the detector counts each class), for each group with at least
    `min_infected` infected cells in the pool. The mixed sessions above average the patients' rates
    within a session; these ask whether the interval also covers one patient whose rates stray, which
    is what its between-patient spread is for."""
    rng = np.random.default_rng(seed)
    rows = []
    for pi, pool in pools.items():
        y, call, g = pool["labels"], pool["probs"] >= opts.threshold, pool["groups"]
        share = counted_share(pool, pi)
        per, cover_all = [], []
        for name in sorted(set(g.tolist())):
            pos, neg = call[(g == name) & (y == 1)], call[(g == name) & (y == 0)]
            if len(pos) < min_infected or not len(neg):
                continue
            err, cover = [], []
            for _ in range(sessions):
                k = int(_draw(rng, pos, neg, share, n_cells).sum())
                e, _, c, _ = _scored(k, n_cells, pi, opts, int(rng.integers(1 << 31)))
                err.append(e)
                cover.append(c)
            per.append({"group": name, "infected": int(len(pos)), "sensitivity": float(pos.mean()),
                        "specificity": float(1 - neg.mean()), "bias_pp": float(np.mean(err)),
                        "coverage_ci95": float(np.mean(cover))})
            cover_all += cover
        if not per:
            continue
        bias = [x["bias_pp"] for x in per]
        rows.append({"parasitemia_percent": 100 * pi, "patients": len(per), "sessions_per_patient": sessions,
                     "cells": n_cells, "coverage_ci95": float(np.mean(cover_all)),
                     "patients_covered_under_90": sum(x["coverage_ci95"] < 0.9 for x in per),
                     "bias_pp_min": float(min(bias)), "bias_pp_max": float(max(bias)), "per_patient": per})
    return rows


def field_sessions(pools: dict[float, dict], opts: FieldOptions, sessions: int = 200, n_cells: int = 2000,
                   seed: int = 0) -> list[dict]:
    """Sessions of whole fields: a level's counted fields drawn (with replacement) until `n_cells` red cells,
    their totals corrected as field mode corrects a session, scored against those fields' own truth. The
    cell-level sessions keep only detections that hold exactly one annotated cell; these count every
    detection, as field mode does, so the fragments, platelets and merged clumps they leave out show here."""
    rng = np.random.default_rng(seed)
    rows = []
    for pi, pool in pools.items():
        per = pool.get("per_field")
        if per is None or not len(per):
            continue
        err, raw_err, cover, width, fields = [], [], [], [], []
        for _ in range(sessions):
            total, n = np.zeros(4, int), 0
            while total[0] < n_cells:
                total += per[rng.integers(len(per))]
                n += 1
            rbc, positive, red, infected = (int(v) for v in total)
            e, r, c, w = _scored(positive, rbc, infected / red, opts, int(rng.integers(1 << 31)))
            err.append(e)
            raw_err.append(r)
            cover.append(c)
            width.append(w)
            fields.append(n)
        rows.append({"parasitemia_percent": 100 * pi, "sessions": sessions, "cells": n_cells,
                     "fields_in_pool": int(len(per)), "fields_per_session": float(np.mean(fields)),
                     "true_percent": float(100 * per[:, 3].sum() / per[:, 2].sum()),
                     "counted_per_true_red": float(per[:, 0].sum() / per[:, 2].sum()),
                     "bias_pp": float(np.mean(err)), "mae_pp": float(np.mean(np.abs(err))),
                     "coverage_ci95": float(np.mean(cover)), "mean_ci95_width_pp": float(np.mean(width)),
                     "raw_bias_pp": float(np.mean(raw_err))})
    return rows


def bias_over_patients(pool: dict, pi: float, opts: FieldOptions, n_cells: int = 2000, boots: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """95% interval of the corrected bias (points) when the pool's patients are drawn again (a cluster
    bootstrap): a pool holds a few hundred infected cells of some 16 patients, reused across its fields, and
    which patients they are moves the bias more than the sessions' own sampling does."""
    rng = np.random.default_rng(seed)
    se, sp = field_rates(opts.counts, opts.recut)
    y, call = pool["labels"] == 1, pool["probs"] >= opts.threshold
    ids, patient = np.unique(pool["groups"], return_inverse=True)

    def per_patient(m):
        return np.bincount(patient, weights=m, minlength=len(ids))
    inf, hit, unf, fpk = per_patient(y), per_patient(y & call), per_patient(~y), per_patient(~y & call)
    share = counted_share(pool, pi)
    bias = []
    for _ in range(boots):
        pick = rng.integers(len(ids), size=len(ids))
        q = share * hit[pick].sum() / max(1, inf[pick].sum()) + (1 - share) * fpk[pick].sum() / max(1, unf[pick].sum())
        est = np.clip(rogan_gladen(rng.binomial(n_cells, q, 200) / n_cells, se, sp), 0, 1)
        bias.append(100 * (est.mean() - pi))
    lo, hi = np.percentile(bias, [2.5, 97.5])
    return float(lo), float(hi)


def rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity of the calls at threshold (None for a class with no cells)."""
    return {"sensitivity": float(np.mean(p[y == 1] >= threshold)) if (y == 1).any() else None,
            "specificity": float(np.mean(p[y == 0] < threshold)) if (y == 0).any() else None}


def _fmt(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def pool_summary(pool: dict, threshold: float) -> dict:
    y, p = pool["labels"], pool["probs"]
    return {"fields": pool["fields"], "recall": pool["recall"], "precision": pool["precision"],
            "cells": int(len(y)), "infected": int(y.sum()), "counted_infected": pool["counted_infected"],
            "counted_uninfected": pool["counted_uninfected"], **rates(y, p, threshold),
            "crops": rates(y, pool["crop_probs"], threshold) if "crop_probs" in pool else None}


def pool_by_patient(pool: dict, threshold: float) -> list[dict]:
    """Per patient group of a pool: how many infected crops its fields were drawn from, how many infected
    cells they counted, and the sensitivity of field mode and of those cells' own NIH crops. Every group
    gets about as many infected cells, so a group with a handful of infected crops lays each many times."""
    y, g = pool["labels"] == 1, pool["groups"]
    rows = []
    for name in sorted(set(g[y].tolist())):
        m = y & (g == name)
        rows.append({"group": name, "infected_crops": pool["infected_crops"].get(name), "infected": int(m.sum()),
                     "sensitivity": float(np.mean(pool["probs"][m] >= threshold)),
                     "crops_sensitivity": float(np.mean(pool["crop_probs"][m] >= threshold))})
    return rows


def conditions_paired(data_dir: Path, crops_root: Path, model, opts: FieldOptions, split: str = "test",
                      parasitemia: float = 0.05, seed: int = 4000, log=print) -> list[dict]:
    """Each imaging condition of the pools on the same patients: per patient group one field per condition,
    all from one seed (the same cells; the condition's blur, scale or disc applied after), so the rows
    differ by the condition alone. The pools cycle conditions through patients, whose crops differ more
    than the conditions do, so they cannot say what a condition costs. The NIH crops of the same found
    cells, classified by the same rule, are each row's reference."""
    groups = sorted(patient_crops(data_dir, crops_root, split).items())
    rows = []
    for name, variant in zip(CONDITIONS, VARIANTS):
        y, p, nih, gt, found, truth_infected, rejected = [], [], [], 0, 0, 0, 0
        for k, (g, (pos, neg)) in enumerate(groups):
            source = dict(pos + neg)
            f = make_field(pos, neg, SynthParams(parasitemia=parasitemia, seed=seed + k, **variant))
            truth_infected += sum(t.label == "Parasitized" for t in f.red_cells)
            res = analyze(f.rgb, g, model, opts)
            rejected += res.status != "ok"
            s = score(res.detection.cells, [GTPoint(t.x, t.y, t.label) for t in f.truth])
            gt, found = gt + s.gt, found + s.found
            for t, _, call in found_cells(res, f.red_cells):
                y.append(int(t.label == "Parasitized"))
                p.append(call.prob_parasitized)
                nih.append(t.own_crop(source))
        y, p = np.array(y, int), np.array(p, float)
        q = classify_crops(nih, model, screen=opts.screen)
        rows.append({"condition": name, "fields": len(groups), "rejected": rejected, "truth_infected": truth_infected,
                     "recall": found / max(gt, 1), "cells": int(len(y)), "infected": int(y.sum()),
                     **rates(y, p, opts.threshold), "crops": rates(y, q, opts.threshold)})
        log(f"  {name}: {rows[-1]}")
    return rows


# on this shared 2-core VM one field's detection took 82–113 ms in runs of 5 rounds within an hour, 72–74 ms
# in runs of 15: a median of 15 rounds holds against a neighbour's burst better
SPEED_REPEATS = 15
CONTACT_BINS = [(0.0, 0.0), (0.0, 0.05), (0.05, 0.10), (0.10, 1.0)]  # share of the mask left to neighbours


def by_contact(pools: dict[float, dict], threshold: float) -> list[dict]:
    """The session pools together, split by how much of each cell's mask its crop left to touching
    neighbours (0: it touches none): what touching costs sensitivity and specificity."""
    y = np.concatenate([q["labels"] for q in pools.values()])
    p = np.concatenate([q["probs"] for q in pools.values()])
    sh = np.concatenate([q["shared"] for q in pools.values()])
    rows = []
    for lo, hi in CONTACT_BINS:
        m = sh == 0 if hi == 0 else (sh > lo) & (sh <= hi)
        rows.append({"shared_from": lo, "shared_to": hi, "cells": int(m.sum()),
                     "share_of_cells": float(m.mean()) if len(m) else 0.0, "infected": int(y[m].sum()),
                     **rates(y[m], p[m], threshold)})
    return rows


ENLARGED = (1.0, 1.3, 1.5, 1.8)  # infected cells' width × the crops': P. vivax and P. ovale enlarge them 1.5-2×


def enlarged_infected(data_dir: Path, crops_root: Path, model, opts: FieldOptions, split: str = "test",
                      factors=ENLARGED, parasitemia: float = 0.05, seed: int = 3000, log=print) -> list[dict]:
    """What field mode does with infected cells wider than the uninfected, as in P. vivax and P. ovale
    (the crops are P. falciparum, whose cells keep their size): the share of them counted, taken for
    white cells or platelets, or left out as clumps, and the counted ones' sensitivity. One sharp field
    per patient group and factor."""
    groups = sorted(patient_crops(data_dir, crops_root, split).items())
    rows = []
    for f in factors:
        status, calls, rejected = [], [], []
        for k, (g, (pos, neg)) in enumerate(groups):
            field = make_field(pos, neg, SynthParams(parasitemia=parasitemia, seed=seed + k, infected_scale=f))
            res = analyze(field.rgb, g, model, opts)
            if res.status != "ok":  # the quality gate's: none of its cells is counted
                rejected.append(f"{g}: {res.reason}")
                continue
            for t in field.red_cells:
                if t.label != "Parasitized":
                    continue
                hits = [(c, call) for c, call in zip(res.detection.cells, res.cells) if contains(c, t.x, t.y)]
                status.append("missed" if not hits else "several" if len(hits) > 1 else hits[0][0].status)
                if status[-1] == "ok":
                    calls.append(hits[0][1].prob_parasitized >= opts.threshold)
        st = np.array(status)
        rows.append({"infected_scale": f, "fields": len(groups), "rejected": rejected, "infected": len(st),
                     "counted": float(np.mean(st == "ok")), "white_cells": float(np.isin(st, ["wbc", "platelets"]).mean()),
                     "clumps": float(np.mean(st == "large")), "sensitivity": float(np.mean(calls)) if calls else None})
        log(f"  infected cells x{f}: {rows[-1]}")
    return rows


def speed(model, points: dict[str, FieldOptions], real_photo: Path, crops_root: Path, data_dir: Path,
          repeats: int = SPEED_REPEATS) -> dict:
    """Median ms per field for each operating point: a 1280×960 synthetic field of ~200 cells, and a
    5312×2988 photo with decoding. Points are timed in interleaved rounds, so a busy spell on a shared
    machine hits them alike."""
    from train.data import load_prepared
    d = load_prepared(data_dir)
    idx = d.indices("test")
    idx = np.concatenate([idx[d.labels[idx] == 1][:100], idx[d.labels[idx] == 0][:300]])
    groups = load_crops(crops_root, [d.relpaths[i] for i in idx], [int(d.labels[i]) for i in idx], ["one"] * len(idx))
    pos, neg = groups["one"]
    f = make_field(pos, neg, SynthParams(width=2560, height=1920, n_cells=320, scale=0.5, parasitemia=0.02, seed=7))
    out = {}
    for name, get in (("1280x960", lambda: f.rgb), ("5312x2988", lambda: load_image(real_photo))):
        for opts in points.values():
            _time_once(get, name, model, opts)  # warm-up
        times = {k: [] for k in points}
        for _ in range(repeats):
            for k, opts in points.items():
                times[k].append(_time_once(get, name, model, opts))
        out.update({f"{name} {k}" if len(points) > 1 else name: _stats(t) for k, t in times.items()})
    return out


def peak_memory(model_path: Path, point_name: str, photos: list[Path]) -> list[dict]:
    """Peak RSS of `edge-infer --field` (report, overlay and Grad-CAM included) on a 16 MP photo as taken, and
    on one of the same size whose cells are a third as wide (a 3×3 mosaic of the photos at 1/3): there
    detection works near full resolution, which is what a wide field at a lower magnification costs."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shrunk, sizes = [], []
        for p in photos:  # each decoded once
            rgb = load_image(p)
            sizes.append(rgb.shape[1::-1])
            shrunk.append(cv2.resize(rgb, None, fx=1 / 3, fy=1 / 3, interpolation=cv2.INTER_AREA))
        tiles = [shrunk[i % len(shrunk)] for i in range(9)]
        h, w = min(t.shape[0] for t in tiles), min(t.shape[1] for t in tiles)
        mosaic = np.vstack([np.hstack([t[:h, :w] for t in tiles[r:r + 3]]) for r in (0, 3, 6)])
        small = Path(tmp) / "mosaic.jpg"
        cv2.imwrite(str(small), mosaic[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        for name, photo, size in (("16 MP photo as taken", photos[0], sizes[0]),
                                  ("16 MP, cells a third as wide", small, mosaic.shape[1::-1])):
            rss = Path(tmp) / "rss"
            t = time.perf_counter()
            subprocess.run(edge_infer_hook(rss) + ["--field", str(photo), "--model", str(model_path), "--operating-point",
                                                   point_name, "--out", str(Path(tmp) / "out"), "-q"],
                           check=True, capture_output=True)
            rows.append({"image": name, "pixels": "x".join(map(str, size)),
                         "peak_rss_mb": float(rss.read_text()), "wall_s": time.perf_counter() - t})
    return rows


def _time_once(get, name: str, model, opts: FieldOptions) -> tuple:
    t0 = time.perf_counter()
    rgb = get()
    t1 = time.perf_counter()
    res = analyze(rgb, name, model, opts, keep_positive_crops=False)
    return t1 - t0, res.seconds["detect"], res.seconds["classify"], time.perf_counter() - t0, len(res.cells)


def _stats(times: list[tuple]) -> dict:
    a = np.median(np.array(times), axis=0)
    return {"decode_ms": 1000 * a[0], "detect_ms": 1000 * a[1], "classify_ms": 1000 * a[2],
            "total_ms": 1000 * a[3], "fields_per_s": 1 / a[3], "cells": int(a[4])}


def time_field(get, name: str, model, opts: FieldOptions, repeats: int = 5, warmup: bool = False) -> dict:
    """Median over `repeats` of getting a field (`get`: decode, or an image already in memory) and analysing
    it, in ms per stage, with fields/s and the number of detected regions."""
    if warmup:
        _time_once(get, name, model, opts)
    return _stats([_time_once(get, name, model, opts) for _ in range(repeats)])


def run(model_path: Path, data_dir: Path, crops_root: Path, fields_root: Path, out: Path, sessions: int = 200,
        levels=(0.005, 0.02, 0.05), fields_per_group: int = 3, point_name: str | None = None, split: str = "test",
        log=print) -> dict:
    """point_name: the card's operating point to count at (default: field mode's). A screened point is
    timed against its plain counting point in the same run. split: the patients the sessions' fields are
    composed from (test: held out from every choice; val: where choices are made)."""
    model = load_classifier(model_path)
    point = operating_point(model, point_name or field_point(model))
    opts = FieldOptions.at(point)
    from benchmarks.hardware import machine
    res = {"model": str(model_path), "operating_point": point.name, "threshold": point.threshold,
           "counts": point.counts, "patients": len(point.by_patient), "recut": list(point.recut),
           "recut_source": ((model.card.operating_points[point.name].get("field_spread") or {}).get("recut") or {}).get("source"),
           "point": describe(point),
           "screen": None if point.screen is None else point.screen.record(),
           "machine": machine()}
    log("real fields")
    real_crops = []
    res["real"] = real_fields(fields_root, model, opts, log, crops=real_crops)
    log("real fields shrunk and recoloured")
    photos = [(img, fields_root / "GT" / f"{img.stem}.txt") for img in sorted((fields_root / "Img").glob("*.jpg"))]
    res["real_shifted"] = real_fields_shifted(photos, model, opts, log=log)
    log("synthetic fields")
    res["split"] = split
    pools = {pi: field_pool(data_dir, crops_root, model, opts, split=split, parasitemia=pi,
                            fields_per_group=fields_per_group, log=log) for pi in levels}
    res["sessions"] = simulate_sessions(pools, opts, sessions=sessions)
    res["single_patient_sessions"] = single_patient_sessions(pools, opts)
    res["field_sessions"] = field_sessions(pools, opts, sessions=sessions)
    res["pools_by_contact"] = by_contact(pools, point.threshold)
    res["pool_by_patient"] = {"parasitemia_percent": 100 * max(levels),
                              "rows": pool_by_patient(pools[max(levels)], point.threshold)}
    log("imaging conditions on the same patients")
    res["conditions_paired"] = conditions_paired(data_dir, crops_root, model, opts, split=split, log=log)
    log("infected cells enlarged")
    res["enlarged_infected"] = enlarged_infected(data_dir, crops_root, model, opts, split=split, log=log)
    log("every shipped classifier on the real fields' crops")
    from edge.runtime import installed_classifiers
    shipped = [p for p, _ in installed_classifiers()]
    res["real_crops_all_models"] = every_model_on_real_crops(real_crops, shipped, log)
    if point.screen is not None:
        log("the screen under stain and camera shifts (validation crops)")
        res["screen_under_shift"] = screen_under_shift(model, point, data_dir, log)
    log("speed")
    timed = {point.name: opts}
    if point.screen is not None and point.name != "counting":
        timed["counting"] = FieldOptions.at(operating_point(model, "counting"))
    res["speed"] = speed(model, timed, sorted((fields_root / "Img").glob("*.jpg"))[0], crops_root, data_dir)
    log("peak memory")
    res["memory"] = peak_memory(model_path, point.name, sorted((fields_root / "Img").glob("*.jpg")))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fields.json", json.dumps(res, indent=1, default=float) + "\n")
    atomic_write_text(out / "fields.md", markdown(res))
    return res


def _shifted_md(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    out = ["## The real fields as another microscope or stain might give them", "",
           "The same 4 photos shrunk (a lower magnification or a smaller sensor) and, at half size, recoloured; "
           "detection scored against the annotation, its points scaled with the image. Every annotated cell is "
           "uninfected.", "",
           "| condition | image | cell diameter measured (px) | fields counted | recall | precision (in disc) | called Parasitized / red cells counted |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for x in rows:
        out.append(f"| {x['condition']} | {x['image']} | {x['diameter_px']:.1f} | {x['fields_counted']} of {x['fields']} | "
                   f"{x['recall']:.4f} | {x['precision']:.4f} | {x['positive']} / {x['rbc']} |")
    return out + [""]


def markdown(r: dict) -> str:
    re_, m = r["real"], r["machine"]
    s = r["real"]["session"]
    lines = [f"# Field mode: {Path(r['model']).name} at {r.get('point') or r['operating_point']}", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores.", "",
             "## Detection on the real fields (4 photos, 5312x2988, healthy slide C12)", "",
             "| field | GT red cells | recall | precision (in disc) | precision (whole cells) | counted | called Parasitized | decode ms | detect ms | classify ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in re_["fields"]:
        sec = f["seconds"]
        lines.append(f"| {f['field']} | {f['gt']} | {f['recall']:.4f} | {f['precision']:.4f} | "
                     f"{f['precision_whole_cells']:.4f} | {f['rbc_counted']} | {f['positive']} | "
                     f"{1000 * sec['decode']:.0f} | {1000 * sec['detect']:.0f} | {1000 * sec['classify']:.0f} |")
    lines += ["", f"All: recall **{re_['recall']:.4f}** ({re_['found']}/{re_['gt']}), precision "
              f"**{re_['precision']:.4f}** over {re_['detections']} detections in the disc, "
              f"{re_['precision_whole_cells']:.4f} over those whole inside it (the GT skips cells cut by the rim). "
              f"Annotated red cells classified: {re_['annotated_classified']}, called Parasitized: "
              f"{re_['annotated_called_parasitized']} (all are uninfected).", "",
              f"As one session: {s['positive_count']} of {s['rbc_count']} counted cells positive, raw "
              f"{s['raw_percent']:.2f}%, corrected **{s['parasitemia_percent']:.2f}%** "
              f"(95% interval {s['parasitemia_ci95'][0]:.2f}–{s['parasitemia_ci95'][1]:.2f}%).", "",
              *_shifted_md(r.get("real_shifted")),
              "## Synthetic sessions", "",
              f"Each level has its own pool: fields composed at that parasitemia from the {r.get('split', 'test')} split's crops "
              "(one patient group per field), run through detection and classification; sessions draw their "
              "counted cells from it, each class in the share the detector counted of it (a class it leaves out "
              "more often is under-counted), and are scored against the smear's parasitemia. The correction uses "
              f"the card's validation counts {r['counts']}"
              + (f" and their spread over {r['patients']} validation patients" if r.get("patients") else "")
              + (f"; its sensitivity scaled by {r['recut'][0]}/{r['recut'][1]} = {r['recut'][0] / r['recut'][1]:.3f}, "
                 f"field mode's calls over their own crops' of {r['recut'][2]} infected cells in synthetic fields "
                 f"({r.get('recut_source') or 'of the validation patients'})"
                 if r.get("recut") and r["recut"][1] else "") + ".", "",
              "| true parasitemia | sessions x cells | bias (pp) | bias, 95% interval over patients (pp) | MAE (pp) | binomial floor MAE (pp) | 95% CI coverage | mean CI width (pp) | raw bias (pp) | raw MAE (pp) | bias, the same cells read from their NIH crops (pp) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["sessions"]:
        ci = x.get("bias_ci95_over_patients")
        ci = f"{ci[0]:+.2f} to {ci[1]:+.2f}" if ci else "–"
        crops = x.get("crops_bias_pp")
        lines.append(f"| {x['parasitemia_percent']:.1f}% | {x['sessions']} x {x['cells']} | {x['bias_pp']:+.3f} | {ci} | "
                     f"{x['mae_pp']:.3f} | {x['binomial_floor_mae_pp']:.3f} | {x['coverage_ci95']:.1%} | "
                     f"{x['mean_ci95_width_pp']:.2f} | "
                     f"{x['raw_bias_pp']:+.3f} | {x['raw_mae_pp']:.3f} | {'–' if crops is None else f'{crops:+.3f}'} |")
    lines += ["", "| pool at | fields | detection recall | precision | cells | infected | infected / uninfected cells counted | sensitivity | specificity | the same cells' NIH crops: sensitivity / specificity |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["sessions"]:
        q = x["pool"]
        c = q.get("crops") or {"sensitivity": None, "specificity": None}
        lines.append(f"| {x['parasitemia_percent']:.1f}% | {q['fields']} | {q['recall']:.4f} | {q['precision']:.4f} | "
                     f"{q['cells']} | {q['infected']} | {q['counted_infected']:.3f} / {q['counted_uninfected']:.3f} | "
                     f"{_fmt(q['sensitivity'], 3)} | {_fmt(q['specificity'], 4)} | "
                     f"{_fmt(c['sensitivity'], 3)} / {_fmt(c['specificity'], 4)} |")
    if r.get("field_sessions"):
        lines += ["", "Sessions of whole fields, as field mode counts them: each level's counted fields drawn (with "
                  "replacement) until 2,000 red cells, every detection counted (the cell-level sessions above keep only "
                  "detections that hold exactly one annotated cell, and leave out fragments, platelets and merged "
                  "clumps), scored against those fields' own truth:", "",
                  "| pool at | fields in the pool (true parasitemia) | counted per true red cell | fields per session | bias (pp) | MAE (pp) | 95% CI coverage | mean CI width (pp) | raw bias (pp) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["field_sessions"]:
            lines.append(f"| {x['parasitemia_percent']:.1f}% | {x['fields_in_pool']} ({x['true_percent']:.2f}%) | "
                         f"{x['counted_per_true_red']:.3f} | {x['fields_per_session']:.1f} | {x['bias_pp']:+.3f} | "
                         f"{x['mae_pp']:.3f} | {x['coverage_ci95']:.1%} | {x['mean_ci95_width_pp']:.2f} | "
                         f"{x['raw_bias_pp']:+.3f} |")
    if r.get("single_patient_sessions"):
        lines += ["", "Sessions of one patient each (all 2,000 cells from one patient group's found cells, "
                  "50 per group with at least 10 infected cells in the pool): does the interval cover a patient whose "
                  "rates stray from the average?", "",
                  "| true parasitemia | patients | coverage over all their sessions | patients covered in under 90% of their sessions | patients' mean bias, lowest to highest (pp) |",
                  "|---:|---:|---:|---:|---|"]
        for x in r["single_patient_sessions"]:
            lines.append(f"| {x['parasitemia_percent']:.1f}% | {x['patients']} | {x['coverage_ci95']:.1%} | "
                         f"{x['patients_covered_under_90']} | {x['bias_pp_min']:+.2f} to {x['bias_pp_max']:+.2f} |")
    if r.get("pool_by_patient"):
        pb = r["pool_by_patient"]
        lines += ["", f"The {pb['parasitemia_percent']:.0f}% pool by patient group: every group's fields get about as "
                  "many infected cells, drawn (with replacement) from however many infected crops it has:", "",
                  "| patient group | infected crops | infected cells counted | sensitivity | their NIH crops' sensitivity |",
                  "|---|---:|---:|---:|---:|"]
        for x in pb["rows"]:
            lines.append(f"| {x['group']} | {x['infected_crops']} | {x['infected']} | {x['sensitivity']:.3f} | "
                         f"{x['crops_sensitivity']:.3f} |")
    if r.get("pools_by_contact"):
        lines += ["", "By how much of each cell's mask its crop left to touching neighbours (the overlap the split gave "
                  "them and a gap beside it; 0: the cell touches none):", "",
                  "| mask left to neighbours | cells | share of cells | infected | sensitivity | specificity |",
                  "|---|---:|---:|---:|---:|---:|"]
        for x in r["pools_by_contact"]:
            what = ("none (touches no cell)" if x["shared_to"] == 0 else
                    f"over {x['shared_from']:.0%}" if x["shared_to"] >= 1 else
                    f"{x['shared_from']:.0%}–{x['shared_to']:.0%}" if x["shared_from"] else f"under {x['shared_to']:.0%}")
            lines.append(f"| {what} | {x['cells']} | {x['share_of_cells']:.3f} | {x['infected']} | "
                         f"{_fmt(x['sensitivity'], 3)} | {_fmt(x['specificity'], 4)} |")
    if r.get("conditions_paired"):
        c0 = r["conditions_paired"][0]
        lines += ["", "## Imaging conditions, on the same patients", "",
                  f"One field per patient group and condition at 5%, all from one seed: the same cells, with the "
                  f"condition applied ({c0['fields']} fields per condition). The NIH crops of the same found cells, "
                  "classified by the same rule, are the reference. (The pools above cycle the conditions through "
                  "patients, whose crops differ more than the conditions do.)", "",
                  "| condition | fields rejected | detection recall | cells | infected | sensitivity | specificity | the same cells' NIH crops: sensitivity / specificity |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for x in r["conditions_paired"]:
            lines.append(f"| {x['condition']} | {x['rejected']} | {x['recall']:.4f} | {x['cells']} | {x['infected']} | "
                         f"{_fmt(x['sensitivity'], 3)} | {_fmt(x['specificity'], 4)} | "
                         f"{_fmt(x['crops']['sensitivity'], 3)} / {_fmt(x['crops']['specificity'], 4)} |")
    if r.get("enlarged_infected"):
        lines += ["", "## Infected cells larger than the uninfected", "",
                  "P. vivax and P. ovale enlarge the cells they infect (1.5-2x in late stages); the crops are "
                  "P. falciparum, whose cells keep their size. Sharp fields at 5%, one per patient group, with the "
                  "infected crops enlarged:", "",
                  "| infected cells' width | fields passing the gate | infected cells | counted | taken for white cells | left out as clumps | sensitivity of those counted |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["enlarged_infected"]:
            lines.append(f"| x{x['infected_scale']:.1f} | {x['fields'] - len(x['rejected'])} of {x['fields']} | {x['infected']} | {x['counted']:.3f} | "
                         f"{x['white_cells']:.3f} | {x['clumps']:.3f} | {_fmt(x['sensitivity'], 3)} |")
    if r.get("screen_under_shift"):
        lines += ["", "## The screen under stain and camera shifts (validation crops)", "",
                  f"Each shift applied to every validation crop; {r['operating_point']} against the deciding model "
                  "alone at the same threshold.", "",
                  "| shift | model's counting positives the screen keeps | sensitivity alone / screened | "
                  "specificity alone / screened |", "|---|---:|---:|---:|"]
        for x in r["screen_under_shift"]:
            lines.append(f"| {x['shift']} | {x['kept']:.3f} | {x['sensitivity_alone']:.3f} / {x['sensitivity']:.3f} | "
                         f"{x['specificity_alone']:.4f} / {x['specificity']:.4f} |")
    if r.get("real_crops_all_models"):
        lines += ["", "## Every shipped classifier on the real fields' crops (all uninfected)", "",
                  "| model | crops | called Parasitized at the card threshold | at the counting point |",
                  "|---|---:|---:|---:|"]
        for x in r["real_crops_all_models"]:
            lines.append(f"| {x['model']} | {x['crops']} | {x['parasitized_at_card']} (threshold "
                         f"{x['card_threshold']:.3f}) | {x.get('parasitized_at_counting', '–')} |")
    lines += ["", f"## Speed (median of {SPEED_REPEATS} in interleaved rounds, int8, this machine)", "",
              "| field | cells | decode ms | detect ms | classify ms | total ms | fields/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in r["speed"].items():
        lines.append(f"| {k} | {v['cells']} | {v['decode_ms']:.0f} | {v['detect_ms']:.0f} | {v['classify_ms']:.0f} | "
                     f"{v['total_ms']:.0f} | {v['fields_per_s']:.2f} |")
    if r.get("memory"):
        lines += ["", "## Peak memory (`edge-infer --field`, one photo, report and Grad-CAM included; target ≤ 400 MB)", "",
                  "| image | pixels | peak RSS MB | wall s (with start-up) |", "|---|---|---:|---:|"]
        lines += [f"| {x['image']} | {x['pixels']} | {x['peak_rss_mb']:.0f} | {x['wall_s']:.1f} |" for x in r["memory"]]
        if r.get("memory_note"):  # a table measured again on its own, and why
            lines += ["", f"({r['memory_note']}.)"]
    return "\n".join(lines) + "\n"
