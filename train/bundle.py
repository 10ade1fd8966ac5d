"""Carry a prepared set to another machine (a rented GPU) in one small file, and rebuild it there.

The decoded cache is ~1 GB; a bundle holds the chosen splits as WebP (lossy at `quality`, or
lossless) plus the manifest rows and split.json, so the patient split and its hash travel unchanged.
Lossy WebP at quality 95 is ~2.7 kB a cell (43 dB PSNR); lossless is ~3× larger.
"""
from __future__ import annotations

import csv
import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from train.data import DataError, load_prepared, manifest_text, staged


def pack(prepared: Path, out: Path, splits=("train", "val"), quality: int | None = 95, workers: int = 4) -> dict:
    """Write the images of `splits` into a zip at `out`; quality None means lossless."""
    d = load_prepared(prepared)
    unknown = set(splits) - set(np.unique(d.splits))
    if unknown:
        raise DataError(f"{prepared}: no split named {', '.join(sorted(unknown))}")
    with open(Path(prepared) / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] in splits]
    opts = dict(format="WEBP", lossless=True, method=1) if quality is None else dict(format="WEBP", quality=quality, method=4)

    def encode(r):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(d.images[int(r["index"])])).save(buf, **opts)
        return buf.getvalue()

    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z, ThreadPoolExecutor(workers) as ex:
        for i, blob in enumerate(ex.map(encode, rows)):
            z.writestr(f"images/{i}.webp", blob)
        z.writestr("manifest.csv", manifest_text([{**r, "index": str(i)} for i, r in enumerate(rows)]))
        z.writestr("split.json", (Path(prepared) / "split.json").read_text())
        info = {"splits": list(splits), "images": len(rows), "size": int(d.images.shape[1]),
                "encoding": "webp lossless" if quality is None else f"webp quality {quality}"}
        z.writestr("bundle.json", json.dumps(info, indent=2))
    tmp.replace(out)
    return {**info, "bytes": out.stat().st_size}


def unpack(bundle: Path, out: Path, workers: int = 8) -> dict:
    """Rebuild a prepared folder (manifest.csv, split.json, cache_<size>.npy) from a bundle;
    a bad bundle leaves `out` as it was."""
    try:
        with zipfile.ZipFile(bundle) as z:
            info = json.loads(z.read("bundle.json"))
            manifest, split = z.read("manifest.csv").decode(), z.read("split.json")
            blobs = [z.read(f"images/{i}.webp") for i in range(info["images"])]
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise DataError(f"{bundle}: not a bundle made by `data pack` ({type(e).__name__}: {e})") from None
    n, size = info["images"], info["size"]
    with staged(out) as staging:
        cache = np.lib.format.open_memmap(staging / f"cache_{size}.npy", mode="w+", dtype=np.uint8,
                                          shape=(n, size, size, 3))

        def decode(i):
            try:
                cache[i] = np.asarray(Image.open(io.BytesIO(blobs[i])).convert("RGB"))
            except Exception as e:  # any decoder error is a damaged bundle
                raise DataError(f"{bundle}: image {i} is damaged ({type(e).__name__})") from None

        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(decode, range(n)))
        cache.flush()
        del cache
        (staging / "manifest.csv").write_text(manifest)
        (staging / "split.json").write_bytes(split)
        (staging / "bundle.json").write_text(json.dumps(info, indent=2))
    return info

