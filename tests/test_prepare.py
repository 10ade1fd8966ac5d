"""`data prepare`: Kaggle's zip quirks, bad files skipped and reported, atomic output, manifest round-trip."""
import csv
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from edge.images import load_image
from edge.preprocess import resize_rgb
from train.data import DataError, load_prepared, prepare, scan_source
from tests.conftest import run


def _png_bytes(path):
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def kaggle_zip(cell_files, tmp_path):
    """The Kaggle layout: cell_images/{class}/*.png, a nested duplicate tree and Thumbs.db files."""
    z = tmp_path / "cell-images-for-detecting-malaria.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in cell_files[:12] + cell_files[-12:]:
            data = _png_bytes(p)
            name = p.with_suffix(".png").name
            zf.writestr(f"cell_images/{p.parent.name}/{name}", data)
            zf.writestr(f"cell_images/cell_images/{p.parent.name}/{name}", data)
        for cls in ("Parasitized", "Uninfected"):
            zf.writestr(f"cell_images/{cls}/Thumbs.db", b"\x00" * 100)
            zf.writestr(f"cell_images/cell_images/{cls}/Thumbs.db", b"\x00" * 100)
    return z


def test_kaggle_zip_quirks(kaggle_zip, tmp_path):
    items, ignored = scan_source(kaggle_zip)
    assert len(items) == 24  # nested duplicates collapse, Thumbs.db is not an image
    assert all(not it.member.startswith("cell_images/cell_images/") for it in items)
    rep = prepare(kaggle_zip, tmp_path / "out", workers=1, progress=False)
    assert rep["images_kept"] == 24 and not rep["skipped"]


def test_bad_files_are_skipped_and_reported(cells, cell_files, tmp_path):
    src = tmp_path / "src"
    for cls in ("Parasitized", "Uninfected"):
        (src / cls).mkdir(parents=True)
    good = [p for p in cell_files if p.parent.name == "Parasitized"][:4] + \
           [p for p in cell_files if p.parent.name == "Uninfected"][:4]
    for p in good:
        (src / p.parent.name / p.name).write_bytes(p.read_bytes())
    data = good[0].read_bytes()
    (src / "Parasitized" / "empty.png").write_bytes(b"")
    (src / "Parasitized" / "truncated.webp").write_bytes(data[: len(data) // 3])
    (src / "Uninfected" / "text.png").write_text("not an image")
    (src / "Uninfected" / "notes.txt").write_text("not an image either")
    (src / "Uninfected" / "copy_of_first.webp").write_bytes(good[4].read_bytes())  # exact duplicate
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    (src / "Uninfected" / "bomb.png").write_bytes(buf.getvalue())
    res = run(["-m", "malaria_edge", "data", "prepare", str(src), "--out", str(tmp_path / "out"), "--workers", "1",
               "--fractions", "0.5,0.25,0.25"])
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = {r["file"].split("/")[-1]: r["reason"] for r in rep["skipped"]}
    assert reasons["empty.png"] == "empty file"
    assert "truncated" in reasons["truncated.webp"] or "corrupt" in reasons["truncated.webp"]
    assert "not an image" in reasons["text.png"]
    assert "too large" in reasons["bomb.png"]
    assert [r["file"].split("/")[-1] for r in rep["ignored"]] == ["notes.txt"]
    assert len(rep["duplicates_dropped"]) == 1
    assert rep["images_kept"] == 8
    assert "skipped: 4" in res.stdout


def test_manifest_round_trip(prepared, cells):
    d = load_prepared(prepared)
    with open(prepared / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(d.images) == len(d.labels)
    r = rows[5]
    rgb = load_image(cells / r["relpath"])
    assert (int(r["width"]), int(r["height"])) == (rgb.shape[1], rgb.shape[0])
    assert np.array_equal(d.images[5], resize_rgb(rgb, 128))
    assert d.split_info["hash"] and set(d.splits) <= {"train", "val", "test"}


def test_interrupted_prepare_leaves_the_previous_output(cells, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(cells, out, workers=1, progress=False)
    before = (out / "manifest.csv").read_bytes()
    import train.split as s

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(s, "assign_groups", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(cells, out, workers=1, progress=False)
    assert (out / "manifest.csv").read_bytes() == before
    assert not (tmp_path / "out.partial").exists()


def test_source_without_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no images found"):
        scan_source(tmp_path / "x")
    res = run(["-m", "malaria_edge", "data", "prepare", str(tmp_path / "missing")])
    assert res.returncode == 1 and "no such file or folder" in res.stderr and "Traceback" not in res.stderr


def test_download_without_credentials_is_one_line(tmp_path):
    res = run(["-m", "malaria_edge", "data", "download", "--dest", str(tmp_path)],
              env={"HOME": str(tmp_path), "KAGGLE_USERNAME": "", "KAGGLE_KEY": "", "KAGGLE_CONFIG_DIR": str(tmp_path)})
    assert res.returncode == 1 and "no Kaggle credentials" in res.stderr and "Traceback" not in res.stderr


def test_a_fold_folder_links_the_cache_and_moves_only_the_split(prepared, tmp_path):
    from train.data import load_prepared, write_fold
    write_fold(prepared, tmp_path / "fold", 1, folds=2)
    a, b = load_prepared(prepared), load_prepared(tmp_path / "fold")
    assert np.array_equal(a.images, b.images) and a.relpaths == b.relpaths
    assert set(b.splits) <= {"train", "val", "test"} and (b.splits == "val").any()
    assert ((a.splits == "test") == (b.splits == "test")).all()
    val = {g for g, s in zip(b.groups, b.splits) if s == "val"}
    assert not val & {g for g, s in zip(b.groups, b.splits) if s == "train"}
    assert sorted(val) == json.loads((tmp_path / "fold" / "split.json").read_text())["val_groups"]
