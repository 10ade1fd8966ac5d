"""Patient-grouped train/val/test splits: no patient's cells on both sides of a split."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict

import numpy as np

from edge.card import CLASS_NAMES

SPLITS = ("train", "val", "test")
_PATIENT = re.compile(r"^C\d+[A-Za-z]?P(\d+)")
_SLIDE = re.compile(r"^C(\d+)")


def patient_group(filename: str) -> str:
    """'C33P1thinF_…' → 'P1'; healthy slides without a patient ('C1_thinF_…') → 'S1'.

    Names outside the NIH scheme become their own group (no leakage possible, none known).
    """
    if m := _PATIENT.match(filename):
        return f"P{int(m.group(1))}"
    if m := _SLIDE.match(filename):
        return f"S{int(m.group(1))}"
    return f"F:{filename}"


def assign_groups(groups: list[str], labels: list[str], fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, str]:
    """Greedy, seeded assignment of whole groups to splits, balancing each class's share.

    Groups are visited in a seeded random order; each goes to the split whose per-class deficit
    (target count minus current count, relative to the target) is largest, weighted by the
    group's own class mix. Infected patients carry both classes, healthy slides only one.
    """
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError("split fractions must sum to 1")
    per_group: dict[str, Counter] = defaultdict(Counter)
    for g, y in zip(groups, labels):
        per_group[g][y] += 1
    totals = Counter(labels)
    target = {s: {c: f * totals[c] for c in totals} for s, f in zip(SPLITS, fractions)}
    current = {s: Counter() for s in SPLITS}
    order = sorted(per_group)
    np.random.default_rng(seed).shuffle(order)
    out = {}
    for g in order:
        mix = per_group[g]
        best = max((s for s, f in zip(SPLITS, fractions) if f > 0),
                   key=lambda s, mix=mix: sum(n * (target[s][c] - current[s][c]) / max(target[s][c], 1e-9)
                                              for c, n in mix.items()))
        out[g] = best
        current[best].update(mix)
    return out


def fold_splits(groups: list[str], labels: list[str], splits: list[str], fold: int, folds: int = 4,
                seed: int = 0) -> list[str]:
    """Cross-fitting by patient: the train and val patients cut into `folds` folds, stratified by class
    (scikit-learn's StratifiedGroupKFold); fold `fold` becomes val, the rest train, and test stays test.
    A measurement made on each fold's held-out patients with a model trained on the others covers every
    train/val patient, not the few that one validation split holds."""
    from sklearn.model_selection import StratifiedGroupKFold
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} is not one of 0..{folds - 1}")
    idx = np.array([i for i, s in enumerate(splits) if s in ("train", "val")])
    if len({groups[i] for i in idx}) < folds:
        raise ValueError(f"fewer than {folds} train/val patient groups to cut into folds")
    cut = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(
        idx, [labels[i] for i in idx], [groups[i] for i in idx])
    held = idx[list(cut)[fold][1]]
    out = ["train" if s in ("train", "val") else s for s in splits]
    for i in held:
        out[i] = "val"
    return out


def random_assign(n: int, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> list[str]:
    """Image-level random split: only to compare with published random-split numbers (it leaks)."""
    rng = np.random.default_rng(seed)
    cut = np.cumsum(np.array(fractions) * n).round().astype(int)
    idx = rng.permutation(n)
    out = [""] * n
    for i, j in enumerate(idx):
        out[j] = SPLITS[int(np.searchsorted(cut, i, side="right"))]
    return out


def split_hash(relpaths: list[str], splits: list[str]) -> str:
    h = hashlib.sha256()
    for p, s in sorted(zip(relpaths, splits)):
        h.update(f"{p},{s}\n".encode())
    return h.hexdigest()[:16]


def summarize(splits: list[str], labels: list[str], groups: list[str]) -> dict:
    """Images and groups per split and class: what the README and the closing note quote."""
    out = {}
    for s in SPLITS:
        idx = [i for i, x in enumerate(splits) if x == s]
        out[s] = {
            "images": len(idx),
            "groups": len({groups[i] for i in idx}),
            **{c: sum(1 for i in idx if labels[i] == c) for c in CLASS_NAMES},
            **{f"groups_with_{c}": len({groups[i] for i in idx if labels[i] == c}) for c in CLASS_NAMES},
        }
    return out


def split_json(kind: str, seed: int, fractions, relpaths, splits, labels, groups, **extra) -> str:
    """split.json's text; extra: fields added or replaced (a cross-fitting fold's note, fold and patients)."""
    return json.dumps(
        {
            "kind": kind,
            "note": "patient-grouped: no patient group in two splits"
            if kind == "patient"
            else "RANDOM image-level split: leaks patients across splits; only for comparison with published numbers",
            "seed": seed,
            "fractions": list(fractions),
            "hash": split_hash(relpaths, splits),
            "summary": summarize(splits, labels, groups),
            **extra,
        },
        indent=2,
    ) + "\n"
