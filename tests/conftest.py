"""Shared, session-scoped fixtures built from the real cell images in tests/fixtures/cells.

A tiny prepared set, a tiny trained CNN and its exports are made once per session and reused, so
each test stays fast and still runs on real data and real artifacts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "tests" / "fixtures" / "cells"
DEV_MANIFEST = ROOT.parent / "shared" / "data" / "nih_malaria_dev" / "MANIFEST.csv"


needs_browser = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")) and os.environ.get("CI") != "true",
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")


def browser(height: int = 1000):
    """Headless Debian Chromium through Selenium, as the app and report tests drive it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size=1400,{height}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


@pytest.fixture(scope="session")
def cells() -> Path:
    return CELLS


@pytest.fixture(scope="session")
def cell_files() -> list[Path]:
    return sorted(CELLS.rglob("*.webp"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    from train.data import prepare
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(CELLS, out, size=128, seed=0, workers=1, progress=False, fractions=(0.6, 0.2, 0.2))
    return out


@pytest.fixture(scope="session")
def tiny_model(prepared, tmp_path_factory) -> Path:
    """A custom CNN trained one epoch on the fixture cells, finalized with its card."""
    from train.data import load_prepared
    from train.report import finalize
    from train.train import TrainConfig, train
    out = tmp_path_factory.mktemp("run") / "tiny"
    data = load_prepared(prepared)
    cfg = TrainConfig(recipe="cnn", epochs=1, batch=16, verbose=0)
    model, info = train(data, cfg, out)
    finalize(model, out, data, cfg, info)
    return out / "model.keras"


@pytest.fixture(scope="session")
def exported(tiny_model, prepared, tmp_path_factory) -> Path:
    """Every format of the tiny model, with cards, explainers and the parity report."""
    from export.pipeline import export_data, export_model
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(tiny_model, out, export_data(prepared, calib_n=16), name="tiny", log=lambda *_: None)
    return out


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command-line entry point in a fresh interpreter (the way users run it)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **kw.pop("env", {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=kw.pop("cwd", ROOT),
                          timeout=kw.pop("timeout", 300), **kw)
