"""`data pack` / `data unpack`: a prepared set travels as one small file with its split unchanged."""
import csv

import numpy as np
import pytest

from train.bundle import pack, unpack
from train.data import DataError, load_prepared
from tests.conftest import run


def _rows(root):
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_lossless_bundle_rebuilds_the_same_split_and_pixels(prepared, tmp_path):
    info = pack(prepared, tmp_path / "b.zip", splits=("train", "val"), quality=None)
    unpack(tmp_path / "b.zip", tmp_path / "out")
    src, got = load_prepared(prepared), load_prepared(tmp_path / "out")
    keep = [r for r in _rows(prepared) if r["split"] in ("train", "val")]
    assert info["images"] == len(keep) == len(got.relpaths) and "test" not in set(got.splits)
    assert [r["relpath"] for r in keep] == got.relpaths and [r["group"] for r in keep] == got.groups
    assert (tmp_path / "out" / "split.json").read_bytes() == (prepared / "split.json").read_bytes()
    assert np.array_equal(np.asarray(got.images), np.asarray(src.images[[int(r["index"]) for r in keep]]))


def test_lossy_bundle_is_smaller_and_close(prepared, tmp_path):
    lossless = pack(prepared, tmp_path / "a.zip", splits=("train",), quality=None)
    lossy = pack(prepared, tmp_path / "b.zip", splits=("train",), quality=95)
    unpack(tmp_path / "b.zip", tmp_path / "out")
    a = np.asarray(load_prepared(prepared).images[load_prepared(prepared).indices("train")], dtype=np.float64)
    b = np.asarray(load_prepared(tmp_path / "out").images, dtype=np.float64)
    psnr = 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))
    assert lossy["bytes"] < lossless["bytes"] / 2 and psnr > 38


def test_packing_an_unknown_split_is_an_error(prepared, tmp_path):
    with pytest.raises(DataError, match="no split named tset"):
        pack(prepared, tmp_path / "b.zip", splits=("train", "tset"))
    assert not (tmp_path / "b.zip").exists()


def test_unpacking_a_non_bundle_is_one_line_and_keeps_the_old_output(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    res = run(["-m", "malaria_edge", "data", "unpack", str(tmp_path / "junk.zip"), "--out", str(tmp_path / "out")])
    assert res.returncode == 1 and "not a bundle" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "out" / "keep.txt").exists()


def test_a_damaged_image_in_a_bundle_is_a_clear_error(prepared, tmp_path):
    import zipfile
    pack(prepared, tmp_path / "b.zip", splits=("val",), quality=None)
    with zipfile.ZipFile(tmp_path / "b.zip") as src, zipfile.ZipFile(tmp_path / "bad.zip", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 3] if item.filename == "images/0.webp" else data)
    with pytest.raises(DataError, match="image 0 is damaged"):
        unpack(tmp_path / "bad.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
