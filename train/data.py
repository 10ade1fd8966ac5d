"""Data ingestion: a Kaggle zip or any class-per-folder tree → manifest, split and decoded cache.

The cache is one uint8 array (N×S×S×3) at the model input size, memory-mappable, so training
never decodes an image per epoch. Everything is built in a staging folder and moved into place
at the end: an interrupted run leaves the previous output (or nothing), never half of one.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import stat
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from edge.card import CLASS_NAMES
from edge.images import ImageError, decode_image, is_image_path
from edge.preprocess import resize_rgb
from train import split as splitlib

KAGGLE_DATASET = "iarunava/cell-images-for-detecting-malaria"
IGNORED_NAMES = {"thumbs.db", ".ds_store", "desktop.ini"}
_CLASS_BY_LOWER = {c.lower(): c for c in CLASS_NAMES}


class DataError(RuntimeError):
    """A user-facing data problem with a one-line message."""


@dataclass
class Item:
    key: str  # Label/filename: the identity used for de-duplication and the manifest
    label: str
    member: str  # path inside the zip, or absolute file path


def _label_of(parts: tuple[str, ...]) -> str | None:
    for part in reversed(parts[:-1]):
        if part.lower() in _CLASS_BY_LOWER:
            return _CLASS_BY_LOWER[part.lower()]
    return None


def scan_source(src: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    """List the labelled images of a zip or folder; return (items, ignored[(path, why)]).

    Kaggle's zip holds every image twice (`cell_images/…` and `cell_images/cell_images/…`):
    the shallowest copy of each Label/filename wins.
    """
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise DataError(f"{src}: not a zip file or a folder")
        with zipfile.ZipFile(src) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
        entries = [(n, PurePosixPath(n).parts) for n in names]
    else:
        entries = [(str(p), p.relative_to(src).parts) for p in sorted(src.rglob("*")) if p.is_file()]
    items: dict[str, tuple[int, Item]] = {}
    ignored: list[tuple[str, str]] = []
    for member, parts in entries:
        name = parts[-1]
        if name.lower() in IGNORED_NAMES or "__MACOSX" in parts:
            continue
        label = _label_of(parts)
        if label is None:
            continue  # README, MANIFEST.csv and anything outside a class folder
        if not is_image_path(PurePosixPath(name)):
            ignored.append((member, "not an image file (extension)"))
            continue
        key = f"{label}/{name}"
        depth = len(parts)
        if key not in items or depth < items[key][0]:
            items[key] = (depth, Item(key, label, member))
    if not items:
        raise DataError(f"{src}: no images found in class folders named {' or '.join(CLASS_NAMES)}")
    return [it for _, it in sorted(items.values(), key=lambda t: t[1].key)], ignored


_zip: zipfile.ZipFile | None = None


def _init_worker(zip_path: str | None) -> None:
    global _zip
    _zip = zipfile.ZipFile(zip_path) if zip_path else None


def _decode_one(args: tuple[str, int]):
    member, size = args
    try:
        data = _zip.read(member) if _zip is not None else Path(member).read_bytes()
        rgb = decode_image(data, member)
    except ImageError as e:
        return member, None, str(e).split(": ", 1)[-1], 0, 0, ""
    except OSError as e:
        return member, None, f"cannot read ({e})", 0, 0, ""
    h, w = rgb.shape[:2]
    digest = hashlib.sha1(rgb.tobytes() + f"{w}x{h}".encode()).hexdigest()
    return member, resize_rgb(rgb, size), "", w, h, digest


@dataclass
class Prepared:
    root: Path
    images: np.ndarray  # memory-mapped N×S×S×3 uint8
    labels: np.ndarray  # int, 1 = Parasitized
    relpaths: list[str]
    groups: list[str]
    splits: np.ndarray  # str per image
    split_info: dict

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


MANIFEST_FIELDS = ["index", "relpath", "label", "group", "split", "sha1", "width", "height"]


def prepare(src: Path, out: Path, size: int = 128, seed: int = 0, split_kind: str = "patient",
            fractions=(0.7, 0.15, 0.15), workers: int | None = None, progress: bool = True) -> dict:
    """Scan, decode, de-duplicate, split and cache. Returns the report (also saved as report.json)."""
    t0 = time.time()
    src, out = Path(src), Path(out)
    items, ignored = scan_source(src)
    zip_path = str(src) if src.is_file() else None
    with staged(out) as staging:
        cache = np.lib.format.open_memmap(staging / f"cache_{size}.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(items), size, size, 3))
        by_member = {it.member: it for it in items}
        rows, skipped, dupes, seen = [], [], [], {}
        workers = workers or os.cpu_count() or 1
        with Pool(workers, initializer=_init_worker, initargs=(zip_path,)) as pool:
            results = pool.imap(_decode_one, [(it.member, size) for it in items], chunksize=64)
            for member, img, err, w, h, digest in tqdm(results, total=len(items), desc="decode", unit="img",
                                                       disable=not progress, mininterval=1.0):
                it = by_member[member]
                if img is None:
                    skipped.append((it.key, err))
                    continue
                if digest in seen:
                    dupes.append((it.key, seen[digest]))
                    continue
                seen[digest] = it.key
                cache[len(rows)] = img
                rows.append({"relpath": it.key, "label": it.label, "group": splitlib.patient_group(Path(it.key).name),
                             "sha1": digest, "width": w, "height": h})
        cache.flush()
        n = len(rows)
        del cache
        if n == 0:
            raise DataError(f"{src}: none of {len(items)} images could be decoded")
        _truncate_npy(staging / f"cache_{size}.npy", n, size)
        labels = [r["label"] for r in rows]
        groups = [r["group"] for r in rows]
        relpaths = [r["relpath"] for r in rows]
        if split_kind == "patient":
            assignment = splitlib.assign_groups(groups, labels, fractions, seed)
            splits = [assignment[g] for g in groups]
        elif split_kind == "random":
            splits = splitlib.random_assign(n, fractions, seed)
        else:
            raise DataError(f"unknown split kind {split_kind!r} (patient or random)")
        (staging / "manifest.csv").write_text(
            manifest_text([{"index": i, **r, "split": s} for i, (r, s) in enumerate(zip(rows, splits))]))
        (staging / "split.json").write_text(splitlib.split_json(split_kind, seed, fractions, relpaths, splits, labels, groups))
        report = {
            "source": str(src), "size": size, "images_found": len(items), "images_kept": n,
            "skipped": [{"file": k, "reason": r} for k, r in skipped],
            "ignored": [{"file": k, "reason": r} for k, r in ignored],
            "duplicates_dropped": [{"file": k, "same_as": d} for k, d in dupes],
            "split": json.loads((staging / "split.json").read_text()),
            "seconds": round(time.time() - t0, 1),
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_fold(prepared: Path, out: Path, fold: int, folds: int = 4, seed: int = 0) -> dict:
    """A prepared folder whose val split is fold `fold` of `prepared`'s train and val patients and whose
    train split is the other folds (`split.fold_splits`); test rows as they were. The decoded cache is
    linked, not copied. Returns the new split's summary."""
    prepared, out = Path(prepared), Path(out)
    d = load_prepared(prepared)
    with open(prepared / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [r["label"] for r in rows]
    try:
        splits = splitlib.fold_splits(d.groups, labels, list(d.splits), fold, folds, seed)
    except ValueError as e:
        raise DataError(f"{prepared}: {e}") from None
    cache = sorted(prepared.glob("cache_*.npy"))[0].resolve()
    with staged(out) as staging:
        try:
            os.link(cache, staging / cache.name)
        except OSError:  # another file system
            os.symlink(cache, staging / cache.name)
        (staging / "manifest.csv").write_text(manifest_text([{**r, "split": s} for r, s in zip(rows, splits)]))
        text = splitlib.split_json(
            "patient", seed, d.split_info.get("fractions", []), d.relpaths, splits, labels, d.groups,
            note=f"patient-grouped cross-fitting: fold {fold} of {folds} of the train and val patients of {prepared} "
                 "is val, the other folds train; test unchanged",
            fold=fold, folds=folds, source_hash=d.split_info.get("hash"),
            val_groups=sorted({g for g, s in zip(d.groups, splits) if s == "val"}))
        (staging / "split.json").write_text(text)
    return json.loads(text)["summary"]


def manifest_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


@contextmanager
def staged(out: Path):
    """A fresh sibling folder to write into, swapped in for `out` only if the block completes:
    an interrupted or failed run leaves the previous output as it was."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, out)


def _truncate_npy(path: Path, n: int, size: int) -> None:
    """Rewrite the .npy header for the first n rows after skips/duplicates, and cut the tail."""
    arr = np.load(path, mmap_mode="r")
    if arr.shape[0] == n:
        return
    offset = arr.offset
    del arr
    header_len = offset
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (n, size, size, 3)})
    header = buf.getvalue()
    header = header[:-1].ljust(header_len - 1) + b"\n" if len(header) <= header_len else header
    if len(header) != header_len:
        raise RuntimeError("npy header size changed")
    with open(path, "r+b") as f:
        f.write(header)
        f.truncate(header_len + n * size * size * 3)


def _swap_in(staging: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_prepared(root: str | Path) -> Prepared:
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.exists():
        raise DataError(f"{root}: no manifest.csv (run `malaria-edge data prepare SRC --out {root}` first)")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    caches = sorted(root.glob("cache_*.npy"))
    if not caches:
        raise DataError(f"{root}: no decoded cache (cache_<size>.npy)")
    images = np.load(caches[0], mmap_mode="r")
    if len(images) != len(rows):
        raise DataError(f"{root}: cache has {len(images)} images but the manifest {len(rows)}")
    return Prepared(
        root=root, images=images,
        labels=np.array([CLASS_NAMES.index(r["label"]) for r in rows], dtype=np.int64),
        relpaths=[r["relpath"] for r in rows], groups=[r["group"] for r in rows],
        splits=np.array([r["split"] for r in rows]),
        split_info=json.loads((root / "split.json").read_text()),
    )


def kaggle_credentials_present() -> bool:
    cfg = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    if cfg.exists() and cfg.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"warning: {cfg} is readable by other users; run: chmod 600 {cfg}")
    return bool(os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")) or cfg.exists()


def download_kaggle(dest: Path) -> Path:
    """Download the Kaggle zip into dest; returns the zip path. The key is never printed."""
    if not kaggle_credentials_present():
        raise DataError("no Kaggle credentials: put kaggle.json in ~/.kaggle/ or set KAGGLE_USERNAME and KAGGLE_KEY")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi  # imported late: it authenticates on import
        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(KAGGLE_DATASET, path=str(dest), unzip=False, quiet=False)
    except ImportError:
        raise DataError("the kaggle package is not installed: pip install 'malaria-edge[train]'") from None
    except Exception as e:  # network, auth, HTTP errors from the client all end the same way
        raise DataError(f"Kaggle download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    zips = sorted(dest.glob("*.zip"))
    if not zips:
        raise DataError(f"Kaggle download produced no zip in {dest}")
    return zips[0]
