"""Frames from a camera (index, device path, URL, GStreamer pipeline, or the Pi's CSI camera) or a video file.

A video file goes through the same `cv2.VideoCapture` code as a camera, which is how the live
path is tested without one. A camera that fails to open, or stops delivering frames (unplugged,
busy), is retried a bounded number of times, then the run ends with a clear message.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np


class CameraError(RuntimeError):
    pass


class CameraSetupError(CameraError):
    """What no reconnect can fix (a missing library, an OpenCV without GStreamer): reported at once."""


@dataclass
class Source:
    spec: str | int
    is_file: bool

    def describe(self) -> str:
        return f"video {self.spec}" if self.is_file else f"camera {self.spec}"


PICAM = "picam"
PICAM_SIZE = (2028, 1520)  # the HQ camera's 2×2-binned mode: full field of view, fast readout


def parse_camera(spec: str) -> Source:
    """'auto' → the Pi's CSI camera on a Pi that has one, else index 0; 'picam' → the CSI camera;
    '0' → index 0; '/dev/video2', 'rtsp://…' or a GStreamer pipeline ('… ! appsink') as given."""
    if spec == "auto":
        spec = PICAM if is_raspberry_pi() and picamera2_cameras() else "0"
    return Source(int(spec) if spec.isdigit() else spec, is_file=False)


def is_raspberry_pi() -> bool:
    try:
        with open("/proc/device-tree/model") as f:
            return "Raspberry Pi" in f.read()
    except OSError:
        return False


def picamera2_cameras() -> list:
    """The cameras libcamera sees, or [] when Picamera2 is not installed (it comes from apt, not pip)."""
    try:
        from picamera2 import Picamera2
        return list(Picamera2.global_camera_info())
    except Exception:  # ImportError, or libcamera failing to start
        return []


class PicameraCapture:
    """The Pi's CSI camera through Picamera2 (libcamera, which OpenCV's pip wheels cannot open), behind
    the part of cv2.VideoCapture's interface that `frames` uses: isOpened, read, get, release."""

    def __init__(self, size: tuple[int, int] = PICAM_SIZE):
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise CameraSetupError("the Pi camera needs Picamera2: sudo apt install python3-picamera2, in a venv made "
                              "with --system-site-packages") from None
        self.cam = None
        try:
            cam = Picamera2()
            # "RGB888" is libcamera's name for bytes in B, G, R order: OpenCV's BGR, no conversion
            cam.configure(cam.create_video_configuration(main={"size": size, "format": "RGB888"}))
            cam.start()
            self.cam = cam
        except Exception as e:  # no camera attached, or busy: Picamera2 raises IndexError or RuntimeError
            self.reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__

    def isOpened(self) -> bool:  # noqa: N802 (cv2.VideoCapture's name)
        return self.cam is not None

    def read(self) -> tuple[bool, np.ndarray | None]:
        try:
            return True, self.cam.capture_array("main")
        except Exception:
            return False, None

    def get(self, prop) -> float:
        return 0.0

    def release(self) -> None:
        if self.cam is not None:
            try:
                self.cam.stop()
                self.cam.close()
            finally:
                self.cam = None


def has_gstreamer() -> bool:
    line = next((ln for ln in cv2.getBuildInformation().splitlines() if "GStreamer:" in ln), "")
    return "YES" in line


def open_capture(src: Source):
    if src.spec == PICAM:
        cap = PicameraCapture()
    elif isinstance(src.spec, str) and "!" in src.spec:
        if not has_gstreamer():
            raise CameraSetupError("this OpenCV was built without GStreamer, so it cannot open a pipeline (pip wheels "
                              "never have it): use --camera picam for the Pi camera, or Debian's python3-opencv")
        cap = cv2.VideoCapture(src.spec, cv2.CAP_GSTREAMER)  # e.g. a libcamera pipeline on a Pi
    else:
        cap = cv2.VideoCapture(src.spec)
    if not cap.isOpened():
        why = getattr(cap, "reason", "") or ("" if src.is_file else "not connected, busy, or no permission")
        cap.release()
        raise CameraError(f"{src.describe()} could not be opened" + (f" ({why})" if why else ""))
    return cap


def frames(src: Source, retries: int = 3, retry_wait: float = 1.0, log=print) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame number, seconds, BGR frame) until the video ends or the camera is gone for good.

    Seconds are video time for a file (so intervals mean the same at any decode speed) and wall
    time for a camera.
    """
    cap, attempt = None, 0
    n, fps, t0 = 0, 0.0, time.monotonic()
    try:
        while True:
            if cap is None:
                try:
                    cap = open_capture(src)
                    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
                except CameraSetupError:
                    raise
                except CameraError:
                    if src.is_file or attempt >= retries:
                        raise
                    attempt += 1
                    log(f"{src.describe()} unavailable; retry {attempt}/{retries} in {retry_wait:g} s")
                    time.sleep(retry_wait)
                    continue
            ok, frame = cap.read()
            if ok and frame is not None:
                attempt = 0
                yield n, (n / fps if src.is_file else time.monotonic() - t0), frame
                n += 1
                continue
            if src.is_file:
                return  # end of the video
            cap.release()
            cap = None
            if attempt >= retries:
                raise CameraError(f"{src.describe()} stopped delivering frames after {n} frames (unplugged?)")
            attempt += 1
            log(f"{src.describe()} lost; reconnect {attempt}/{retries} in {retry_wait:g} s")
            time.sleep(retry_wait)
    finally:
        if cap is not None:
            cap.release()


def has_gui() -> bool:
    """True when OpenCV was built with a GUI backend and a display is there (headless wheels: never)."""
    import os
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        cv2.namedWindow("malaria-edge")
        cv2.destroyWindow("malaria-edge")
        return True
    except cv2.error:
        return False
