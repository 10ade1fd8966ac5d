"""The classifier where field mode works: on the crops its detector cuts from whole fields.

Synthetic fields are composed from one split's crops (one patient group per field), run through the
whole pipeline, and every ground-truth cell the detector found keeps its true label and the probability
its re-cut crop got: the benchmark's session pools (bench-fields, one per true parasitemia), and a way to
compare those rates with the validation crops' (the card's). Measured 2026-11-26 on the validation split
with the shipped MobileNetV2 int8 at the counting point: specificity 0.9965 in fields with no infected
cell (0.995 on the validation crops) but 0.9835 in fields at 10%, where an uninfected cell's crop can take
in the rim of an infected neighbour. That is why each session level gets a pool composed at its own
parasitemia, and why the card's validation counts, not rates from any one pool, stay the correction's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.field import FieldOptions, FieldResult, analyze, classify_crops
from train.fieldscore import GTPoint, contains, score
from train.synthetic import SynthParams, load_crops, make_field

# imaging conditions the pool cycles through: sharp, defocused, half scale, eyepiece disc, crowded
VARIANTS = [dict(), dict(blur=2.0), dict(scale=0.5), dict(eyepiece=True), dict(spacing=(0.75, 0.95))]
CONDITIONS = ["sharp", "defocused (blur 2 px)", "half scale", "eyepiece disc", "crowded"]
POOL_PARASITEMIA = 0.1  # enough infected cells to measure sensitivity; few infected neighbours per cell


def patient_crops(data_dir: Path, crops_root: Path, split: str) -> dict[str, tuple[list, list]]:
    """patient group → (its Parasitized crops, its Uninfected crops) for one split's groups that have both:
    the patients a synthetic field at a chosen parasitemia can be composed from (a field is one slide)."""
    from train.data import load_prepared
    d = load_prepared(data_dir)
    idx = d.indices(split)
    groups = load_crops(crops_root, [d.relpaths[i] for i in idx], [int(d.labels[i]) for i in idx],
                        [d.groups[i] for i in idx])
    return {g: (pos, neg) for g, (pos, neg) in groups.items() if pos and neg}


def pool_fields(groups: dict[str, tuple[list, list]], parasitemia: float, fields_per_group: int, seed: int):
    """(patient group, its field number, the field) for the pools' synthetic fields: fields_per_group per group at
    `parasitemia`, seeds seed, seed + 1, ... and the imaging conditions in turn."""
    k = 0
    for g, (pos, neg) in sorted(groups.items()):
        for j in range(fields_per_group):
            yield g, j, make_field(pos, neg, SynthParams(parasitemia=parasitemia, seed=seed + k,
                                                         **VARIANTS[k % len(VARIANTS)]))
            k += 1


def found_cells(res: FieldResult, truth: list) -> list[tuple]:
    """(truth cell, its detection, its call) for each truth cell inside exactly one classified detection."""
    ok = [(c, call) for c, call in zip(res.detection.cells, res.cells) if call.prob_parasitized is not None]
    out = []
    for t in truth:
        hits = [(c, call) for c, call in ok if contains(c, t.x, t.y)]
        if len(hits) == 1:
            out.append((t, *hits[0]))
    return out


def field_pool(data_dir: Path, crops_root: Path, model, opts: FieldOptions, split: str = "val",
               fields_per_group: int = 2, parasitemia: float = POOL_PARASITEMIA, seed: int = 1000,
               log=print) -> dict:
    """(true label, P(Parasitized), share of its mask left to touching neighbours, patient group) of every
    found cell of synthetic fields from one split's infected patients, made under the imaging conditions in
    turn, with detection recall and precision and the share of each class's cells counted. Each found cell's
    own NIH crop is classified by the same rule too (`crop_probs`): what the cell would read without field
    mode's re-cut, so that a bias can be told apart into the crops' and the re-cut's. `per_field` keeps each
    counted field's totals as field mode gave them, for sessions of whole fields (`benchmarks.fields`)."""
    labels, probs, crop_probs, shared, groups, n_gt, n_found, n_det, n_correct, k = [], [], [], [], [], 0, 0, 0, 0, 0
    gt_infected = gt_uninfected = 0
    per_field = []  # (red cells counted, called Parasitized, true red cells, true infected) of each field counted
    patients = patient_crops(data_dir, crops_root, split)
    infected_crops = {g: len(pos) for g, (pos, _) in sorted(patients.items())}
    sources = {g: dict(pos + neg) for g, (pos, neg) in patients.items()}
    for g, j, f in pool_fields(patients, parasitemia, fields_per_group, seed):
        k += 1
        res = analyze(f.rgb, f"synthetic {g} #{j}", model, opts)
        det = res.detection
        s = score(det.cells, [GTPoint(t.x, t.y, t.label) for t in f.truth])
        n_gt, n_found, n_det, n_correct = n_gt + s.gt, n_found + s.found, n_det + s.detections, n_correct + s.correct
        inf = sum(t.label == "Parasitized" for t in f.red_cells)
        gt_infected, gt_uninfected = gt_infected + inf, gt_uninfected + len(f.red_cells) - inf
        if res.status == "ok":
            per_field.append((res.rbc, res.positive, len(f.red_cells), inf))
        found = found_cells(res, f.red_cells)
        for t, cell, call in found:
            labels.append(int(t.label == "Parasitized"))
            probs.append(call.prob_parasitized)
            shared.append(cell.shared)
            groups.append(g)
        crop_probs.extend(classify_crops([t.own_crop(sources[g]) for t, _, _ in found], model, opts.batch, opts.screen))
    y = np.array(labels)
    log(f"  {split} field pool: {k} fields, detection recall {n_found / max(n_gt, 1):.4f}, "
        f"{len(y)} cells ({int(y.sum())} infected)")
    return {"split": split, "fields": k, "gt": n_gt, "recall": n_found / max(n_gt, 1),
            "precision": n_correct / max(n_det, 1), "parasitemia": parasitemia, "labels": y, "probs": np.array(probs),
            # the share of each class's cells counted (found in one classified detection): a class the
            # detector leaves out more often is under-counted before any classifier error
            "counted_infected": int(y.sum()) / max(gt_infected, 1),
            "counted_uninfected": int(len(y) - y.sum()) / max(gt_uninfected, 1),
            "shared": np.array(shared, float), "groups": np.array(groups), "crop_probs": np.array(crop_probs, float),
            "infected_crops": infected_crops,  # patient group -> its infected crops the fields draw from
            # whole fields as field mode counts them, with what the cell-level pool leaves out: detections that hold
            # no annotated cell (a fragment, a platelet) or several (a merged clump)
            "per_field": np.array(per_field, int).reshape(-1, 4)}


def recut_counts(pools: list[dict], threshold: float) -> dict:
    """Of the pools' infected cells found: how many field mode called, and how many their own NIH crops were
    called by the same rule. Their ratio is the share of the sensitivity the re-cut keeps."""
    infected = np.concatenate([p["labels"] for p in pools]) == 1
    called = {k: int((np.concatenate([p[k] for p in pools])[infected] >= threshold).sum()) for k in ("probs", "crop_probs")}
    return {"field_called": called["probs"], "crops_called": called["crop_probs"], "infected": int(infected.sum())}


def field_spread(pools: list[dict], threshold: float) -> dict:
    """How far field mode's sensitivity and specificity differ between patients beyond the sampling of their
    cells (beta-binomial, method of moments), from pools of synthetic fields of the validation patients,
    each patient's cells counted over all the pools. Each patient group lays its few infected crops many
    times, so its cells are not independent and this errs wide: the interval it feeds errs conservative.
    With it, `recut`: how many of the pools' infected cells field mode called and how many their own NIH crops
    were called by the same rule (the sensitivity the re-cut keeps, which the correction scales by)."""
    from edge.metrics import operating_point
    from edge.parasitemia import patient_variances
    by_patient = operating_point(np.concatenate([p["labels"] for p in pools]),
                                 np.concatenate([p["probs"] for p in pools]), threshold,
                                 groups=np.concatenate([p["groups"] for p in pools]))["counts_by_patient"]
    var_se, var_sp = patient_variances(by_patient)
    return {"sensitivity_var": var_se, "specificity_var": var_sp, "patients": len(by_patient),
            "recut": recut_counts(pools, threshold),
            "infected": sum(b["tp"] + b["fn"] for b in by_patient),
            "uninfected": sum(b["tn"] + b["fp"] for b in by_patient),
            "parasitemia_levels": [p["parasitemia"] for p in pools], "fields": int(sum(p["fields"] for p in pools))}
