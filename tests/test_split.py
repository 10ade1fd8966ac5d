"""Patient-grouped splits: no group on two sides, reproducible, balanced."""
import csv
from collections import Counter, defaultdict

import numpy as np
import pytest

from train.split import assign_groups, patient_group, random_assign, split_hash, summarize
from tests.conftest import DEV_MANIFEST


@pytest.mark.parametrize("name,group", [
    ("C33P1thinF_IMG_20150619_114756a_cell_179.png", "P1"),
    ("C37BP2_thinF_IMG_20150620_133111a_cell_87.png", "P2"),
    ("C100P61ThinF_IMG_20150918_144104_cell_162.webp", "P61"),
    ("C1_thinF_IMG_20150604_104722_cell_9.png", "S1"),
    ("C201ThinF_IMG_20151029_115225_cell_1.png", "S201"),
    ("random_name.png", "F:random_name.png"),
])
def test_patient_group_rule(name, group):
    assert patient_group(name) == group


@pytest.fixture(scope="module")
def dev_rows():
    if not DEV_MANIFEST.exists():
        pytest.skip(f"{DEV_MANIFEST} not present")
    with open(DEV_MANIFEST, newline="") as f:
        return list(csv.DictReader(f))


def test_grouping_matches_the_dev_manifest(dev_rows):
    for r in dev_rows:
        want = f"P{int(r['patient'])}" if r["patient"] else f"S{int(r['slide'])}"
        assert patient_group(r["relpath"].split("/")[-1]) == want, r["relpath"]


def _split_dev(rows, seed=0):
    groups = [patient_group(r["relpath"].split("/")[-1]) for r in rows]
    labels = [r["label"] for r in rows]
    a = assign_groups(groups, labels, seed=seed)
    return groups, labels, [a[g] for g in groups]


def test_no_group_in_two_splits(dev_rows):
    groups, _, splits = _split_dev(dev_rows)
    seen = defaultdict(set)
    for g, s in zip(groups, splits):
        seen[g].add(s)
    assert all(len(v) == 1 for v in seen.values())
    assert set(splits) == {"train", "val", "test"}


def test_split_is_deterministic_and_seeded(dev_rows):
    relpaths = [r["relpath"] for r in dev_rows]
    a, b, c = (_split_dev(dev_rows, seed)[2] for seed in (0, 0, 1))
    assert split_hash(relpaths, a) == split_hash(relpaths, b)
    assert split_hash(relpaths, a) != split_hash(relpaths, c)


def test_split_sizes_and_classes_are_balanced(dev_rows):
    groups, labels, splits = _split_dev(dev_rows)
    s = summarize(splits, labels, groups)
    n = len(dev_rows)
    for name, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(s[name]["images"] / n - frac) < 0.03, s[name]
        share = s[name]["Parasitized"] / s[name]["images"]
        assert 0.45 < share < 0.55, s[name]


def test_random_split_is_image_level():
    out = random_assign(1000, seed=0)
    c = Counter(out)
    assert c["train"] == 700 and c["val"] == 150 and c["test"] == 150


def test_small_sets_still_get_every_split():
    groups = [f"P{i // 3}" for i in range(60)]
    labels = ["Parasitized" if i % 2 else "Uninfected" for i in range(60)]
    a = assign_groups(groups, labels, seed=3)
    assert set(a.values()) == {"train", "val", "test"}
    assert np.isclose(sum(1 for g in groups if a[g] == "train") / 60, 0.7, atol=0.1)


def test_folds_hold_out_every_train_and_val_patient_once_and_leave_test_alone(dev_rows):
    from train.split import fold_splits
    groups, labels, splits = _split_dev(dev_rows)
    held = Counter()
    for k in range(4):
        f = fold_splits(groups, labels, splits, k, folds=4)
        assert [s for s in f if s == "test"] == [s for s in splits if s == "test"]
        assert all(a == "test" for a, b in zip(splits, f) if b == "test")
        seen = defaultdict(set)
        for g, s in zip(groups, f):
            seen[g].add(s)
        assert all(len(v) == 1 for v in seen.values())
        held.update({g for g, s in zip(groups, f) if s == "val"})
    train_val = {g for g, s in zip(groups, splits) if s != "test"}
    assert set(held) == train_val and set(held.values()) == {1}


def test_folds_spread_the_infected_patients(dev_rows):
    from train.split import fold_splits
    groups, labels, splits = _split_dev(dev_rows)
    infected = [len({g for g, s, y in zip(groups, fold_splits(groups, labels, splits, k), labels)
                     if s == "val" and y == "Parasitized"}) for k in range(4)]
    assert max(infected) - min(infected) <= 3, infected


def test_a_fold_outside_the_folds_is_an_error():
    from train.split import fold_splits
    with pytest.raises(ValueError, match="fold 4"):
        fold_splits(["P1", "P2"], ["Parasitized", "Uninfected"], ["train", "val"], 4, folds=4)
