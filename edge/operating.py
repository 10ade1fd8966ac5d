"""Named operating points from a model card: a threshold with its validation confusion counts (what the
parasitemia correction reads), and for a screened point the smaller model that clears most cells first.

A screened point ("counting-fast") runs a fast screen on every cell; only cells the screen gives
P ≥ forward_at reach the card's own model, which decides at the point's threshold; the rest are
Uninfected. Its counts were measured for that whole rule (`malaria-edge evaluate --screen`), so the
correction stays honest; the screen's sha256 is in the card, so a retrained screen is refused, not trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.parasitemia import check_adds_up, check_recut
from edge.runtime import Loaded, ModelError, load_classifier

FAST = "counting-fast"  # the screened counting point; field mode's default where the card has it


@dataclass(frozen=True)
class Screen:
    model: Loaded
    forward_at: float  # cells with screen P >= forward_at go on to the deciding model

    def record(self) -> dict:
        """What session.json and the benchmarks keep of it."""
        return {"model": self.model.path.name, "forward_at": self.forward_at}


@dataclass(frozen=True)
class OperatingPoint:
    name: str
    threshold: float
    counts: dict  # validation confusion counts {tp, fn, tn, fp} of the whole rule
    screen: Screen | None = None
    by_patient: tuple = ()  # the same counts per validation patient, where the card has them
    # the least between-patient variance of (Se, Sp) the interval draws with: field mode's, measured on
    # synthetic fields of the validation patients (`malaria-edge evaluate --field-spread`), where the card has it
    spread: tuple[float, float] = (0.0, 0.0)
    complete_overlap: float = 0.0  # the card's field_crops: how field mode cuts cells for this model
    # (field mode's calls, their own crops' calls, infected cells) on synthetic fields (field_spread's recut, with
    # its source): what the re-cut keeps of the sensitivity; (0, 0, 0) where the card has none
    recut: tuple[int, int, int] = (0, 0, 0)


def field_point(model: Loaded) -> str:
    """Field mode's default: the screened counting point where the card has one (same rule, faster), else counting."""
    return FAST if FAST in (model.card.operating_points or {}) else "counting"


def operating_point(model: Loaded, name: str, threads: int | None = None) -> OperatingPoint:
    """A named operating point of the model card, with its screen loaded and checked when it has one."""
    ops = model.card.operating_points or {}
    if name not in ops:
        have = ", ".join(ops) or "none"
        raise ModelError(f"{model.path.name}: its card has no '{name}' operating point (has: {have}); "
                         f"add them with: malaria-edge evaluate {model.path} --operating-points --update-card")
    op = ops[name]
    thr = float(op["threshold"])
    spec = op.get("screen")
    by_patient = tuple(dict(c) for c in op.get("counts_by_patient", ()))
    try:
        check_adds_up(op["counts"], by_patient)
    except ValueError:
        raise ModelError(f"{model.path.name}: the '{name}' point's per-patient counts do not add up to its counts; "
                         f"re-run: malaria-edge evaluate {model.path} --operating-points --update-card") from None
    fs = op.get("field_spread") or {}
    spread = (float(fs.get("sensitivity_var", 0.0)), float(fs.get("specificity_var", 0.0)))
    if not all(0 <= v < 0.25 for v in spread):  # a rate's variance is at most 0.25
        raise ModelError(f"{model.path.name}: the '{name}' point's field_spread {spread} is not a pair of variances "
                         f"of rates; re-run: malaria-edge evaluate {model.path} --field-spread --update-card")
    rc = fs.get("recut") or {}
    try:
        recut = check_recut(rc.get(k, 0) for k in ("field_called", "crops_called", "infected"))
    except (TypeError, ValueError, AttributeError):
        raise ModelError(f"{model.path.name}: the '{name}' point's field_spread recut {rc!r} is not field mode's and "
                         f"the crops' calls of its infected cells; re-run: malaria-edge evaluate {model.path} "
                         "--field-spread --update-card") from None
    try:
        overlap = float((model.card.field_crops or {}).get("complete_overlap", 0.0))
    except (TypeError, ValueError, AttributeError):
        overlap = -1.0
    if not 0 <= overlap < 0.5:
        raise ModelError(f"{model.path.name}: its card's field_crops {model.card.field_crops!r} is not "
                         "{'complete_overlap': a share of a cell diameter in [0, 0.5)}")
    return OperatingPoint(name, thr, dict(op["counts"]), load_screen(model, spec, thr, threads) if spec else None,
                          by_patient, spread, overlap, recut)


def load_screen(model: Loaded, spec: dict, threshold: float, threads: int | None = None) -> Screen:
    path = (model.path.parent / spec["model"]).resolve()
    if not path.exists():
        raise ModelError(f"{model.path.name}: the screen model {spec['model']} its card names is missing")
    screen = load_classifier(path, threads)
    if screen.card.artifact_sha256 != spec["sha256"]:
        raise ModelError(f"{path.name}: not the screen model {model.path.name}'s card measured its counts with "
                         f"(sha256 differs); re-run: malaria-edge evaluate {model.path} --operating-points "
                         f"--screen {path} --update-card")
    if screen.size != model.size:
        raise ModelError(f"{path.name}: screen input {screen.size} px differs from {model.path.name}'s {model.size} px")
    fwd = float(spec["forward_at"])
    if not 0 < fwd <= threshold:
        raise ModelError(f"{model.path.name}: screen forward_at {fwd} must be in (0, threshold {threshold}]")
    return Screen(screen, fwd)


def predict(model: Loaded, x: np.ndarray, screen: Screen | None = None) -> np.ndarray:
    """P(Parasitized) per image: the model's; under a screen, the screen's for the cells it clears (all below
    forward_at ≤ the threshold, so Uninfected) and the model's for the cells it forwards."""
    if screen is None:
        return model.predict(x)
    p = screen.model.predict(x)
    fwd = np.flatnonzero(p >= screen.forward_at)
    if len(fwd):
        p[fwd] = model.predict(x[fwd])
    return p


def describe(point: OperatingPoint) -> str:
    s = f"the {point.name} operating point (threshold {point.threshold:.4f})"
    if point.screen:
        s += (f", screened by {Path(point.screen.model.path).name} (cells it gives P < {point.screen.forward_at:.3f} "
              "are Uninfected)")
    return s
