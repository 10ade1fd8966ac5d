"""What `edge-infer` hands its runners: one small frozen object, so no flag can land in another's place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunOptions:
    out: Path = Path("runs/infer")  # folder: overlays, live frames, session folders
    output: Path | None = None  # results file (.csv, .jsonl, .json)
    output_mode: str = "new"  # new | overwrite | resume (see edge.results.open_results)
    threshold: float = 0.5
    evidence: str = "label"  # Grad-CAM of the label shown, or "Parasitized" for every cell
    fmt: str = "table"  # terminal format
    batch: int = 64
    panel: bool = False
    quiet: bool = False
    interval: float = 1.0  # live: seconds between classified frames
    max_frames: int | None = None
    show: bool = False
    retries: int = 3
    retry_wait: float = 1.0
