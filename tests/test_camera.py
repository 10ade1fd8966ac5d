"""Live sources up to the hardware boundary: the Pi camera through a stand-in Picamera2 fed with real frames."""
import csv
import sys
import types

import cv2
import pytest

import edge.camera as camera
from edge.camera import CameraError, Source, frames, parse_camera
from edge.classifier import Classifier
from edge.images import load_image
from edge.options import RunOptions
from edge.preprocess import resize_rgb
from tests.conftest import ROOT

CELLS = sorted((ROOT / "examples" / "cells").rglob("*.png"))


class StandInPicamera2:
    """Picamera2's calls as malaria-edge makes them, serving real cell images as BGR ("RGB888") frames.
    Not the hardware: libcamera and a CSI camera are not on this machine."""
    calls: list = []

    def __init__(self):
        self.frames = [cv2.cvtColor(resize_rgb(load_image(p), 320), cv2.COLOR_RGB2BGR) for p in CELLS]
        self.started = False

    @staticmethod
    def global_camera_info():
        return [{"Model": "imx477", "Num": 0}]

    def create_video_configuration(self, main):
        StandInPicamera2.calls.append(("config", main))
        return {"main": main}

    def configure(self, cfg):
        pass

    def start(self):
        self.started = True

    def capture_array(self, name="main"):
        assert self.started and name == "main"
        if not self.frames:
            raise RuntimeError("camera disconnected")
        return self.frames.pop(0)

    def stop(self):
        self.started = False

    def close(self):
        StandInPicamera2.calls.append(("close",))


@pytest.fixture
def picamera2(monkeypatch):
    StandInPicamera2.calls = []
    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=StandInPicamera2))
    return StandInPicamera2


def test_stand_in_pi_camera_frames_reach_the_classifier_through_the_live_path(picamera2, tmp_path):
    from edge.live import run_live
    code = run_live(Source("picam", is_file=False), Classifier.load(),
                    RunOptions(out=tmp_path, interval=0, retries=0, retry_wait=0))
    assert code == 1  # the stand-in "disconnects" after its frames: reported as a lost camera
    [sdir] = tmp_path.glob("session-*")
    rows = list(csv.DictReader(open(sdir / "live_results.csv")))
    assert [r["label"] for r in rows] == [p.parent.name for p in CELLS]
    assert ("config", {"size": camera.PICAM_SIZE, "format": "RGB888"}) in picamera2.calls and ("close",) in picamera2.calls


def test_stand_in_pi_camera_is_chosen_automatically_on_a_pi(picamera2, monkeypatch):
    monkeypatch.setattr(camera, "is_raspberry_pi", lambda: True)
    assert parse_camera("auto").spec == "picam"
    monkeypatch.setattr(camera, "is_raspberry_pi", lambda: False)
    assert parse_camera("auto").spec == 0


def test_pi_camera_without_picamera2_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import fails
    with pytest.raises(CameraError, match="needs Picamera2: sudo apt install python3-picamera2"):
        list(frames(Source("picam", is_file=False), retries=3, retry_wait=0, log=lambda m: None))


def test_a_gstreamer_pipeline_without_gstreamer_says_so(monkeypatch):
    monkeypatch.setattr(camera, "has_gstreamer", lambda: False)
    with pytest.raises(CameraError, match="built without GStreamer"):
        list(frames(parse_camera("libcamerasrc ! videoconvert ! appsink"), retries=2, retry_wait=0, log=lambda m: None))
