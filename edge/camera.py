"""Frames from a camera (index, device path, URL or GStreamer pipeline) or a video file.

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


@dataclass
class Source:
    spec: str | int
    is_file: bool

    def describe(self) -> str:
        return f"video {self.spec}" if self.is_file else f"camera {self.spec}"


def parse_camera(spec: str) -> Source:
    """'0' → index 0; '/dev/video2', 'rtsp://…' or a GStreamer pipeline ('… ! appsink') as given."""
    return Source(int(spec) if spec.isdigit() else spec, is_file=False)


def open_capture(src: Source) -> cv2.VideoCapture:
    if isinstance(src.spec, str) and "!" in src.spec:
        cap = cv2.VideoCapture(src.spec, cv2.CAP_GSTREAMER)  # e.g. a libcamera pipeline on a Pi
    else:
        cap = cv2.VideoCapture(src.spec)
    if not cap.isOpened():
        cap.release()
        raise CameraError(f"{src.describe()} could not be opened"
                          + ("" if src.is_file else " (not connected, busy, or no permission)"))
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
