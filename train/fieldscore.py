"""Ground truth for whole fields and how detection is scored against it.

A ground-truth cell counts as found when its point lies inside exactly one accepted detection; a
detection is correct when it holds at least one ground-truth point. The real fields are annotated
only inside the eyepiece, so precision there is over the detections whose centre is inside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.detect import Cell


@dataclass
class GTPoint:
    x: float  # in the image as displayed (EXIF orientation applied)
    y: float
    label: str  # Uninfected | Parasitized | White_Blood_Cell


def read_point_set(path: Path, exif_orientation: int = 1) -> list[GTPoint]:
    """An NLM "Point Set" file (`N,W,H` then `id,label,comment,Point,1,x,y`), points moved from the stored
    pixel frame into the displayed one."""
    lines = Path(path).read_text().strip().splitlines()
    _, w, h = lines[0].split(",")[:3]
    W, H = int(w), int(h)
    pts = []
    for ln in lines[1:]:
        parts = ln.split(",")
        x, y = float(parts[-2]), float(parts[-1])
        pts.append(GTPoint(*_orient(x, y, W, H, exif_orientation), parts[1]))
    return pts


def _orient(x: float, y: float, W: int, H: int, o: int) -> tuple[float, float]:
    """Stored (x, y) → displayed, for the EXIF orientations a camera writes (1, 3, 6, 8)."""
    if o == 3:
        return W - 1 - x, H - 1 - y
    if o == 6:  # stored rotated 90° counter-clockwise: display rotates it clockwise
        return H - 1 - y, x
    if o == 8:  # display = stored rotated 90° counter-clockwise
        return y, W - 1 - x
    return x, y


def exif_orientation(path: Path) -> int:
    from PIL import Image
    with Image.open(path) as im:
        return int(im.getexif().get(0x0112, 1))


def contains(cell: Cell, x: float, y: float) -> bool:
    """Whether the point (full-resolution pixels) lies on the cell's mask."""
    bx, by, bw, bh = cell.box
    i, j = int(y) - by, int(x) - bx
    return 0 <= i < bh and 0 <= j < bw and bool(cell.mask[i, j])


@dataclass
class DetectionScore:
    gt: int
    found: int  # GT points inside exactly one detection
    in_two: int  # GT points inside two or more detections (a missed split)
    detections: int  # accepted detections counted for precision
    correct: int  # of those, holding at least one GT point
    merged: int  # detections holding two or more GT points

    @property
    def recall(self) -> float:
        return self.found / self.gt if self.gt else float("nan")

    @property
    def precision(self) -> float:
        return self.correct / self.detections if self.detections else float("nan")

    def as_dict(self) -> dict:
        return {**self.__dict__, "recall": self.recall, "precision": self.precision}


def score(cells: list[Cell], points: list[GTPoint], region: np.ndarray | None = None, scale: float = 1.0,
          labels: tuple[str, ...] = ("Uninfected", "Parasitized")) -> DetectionScore:
    """Score accepted cells against the GT points of red cells. `region` (a bool mask at `scale` of the
    image) limits the detections counted for precision to those centred inside it."""
    ok = [c for c in cells if c.status == "ok"]
    rbc = [p for p in points if p.label in labels]
    hits = np.zeros((len(rbc), len(ok)), bool)
    for j, c in enumerate(ok):
        bx, by, bw, bh = c.box
        for i, p in enumerate(rbc):
            if bx <= p.x < bx + bw and by <= p.y < by + bh:
                hits[i, j] = contains(c, p.x, p.y)
    per_gt = hits.sum(1)
    counted = np.ones(len(ok), bool)
    if region is not None:
        for j, c in enumerate(ok):
            yy = min(region.shape[0] - 1, int(c.centre[1] * scale))
            xx = min(region.shape[1] - 1, int(c.centre[0] * scale))
            counted[j] = region[yy, xx]
    per_det = hits.sum(0)[counted]
    return DetectionScore(len(rbc), int((per_gt == 1).sum()), int((per_gt > 1).sum()), int(counted.sum()),
                          int((per_det >= 1).sum()), int((per_det > 1).sum()))
