"""The accuracy parity gate: each artifact, run through the edge runtime, against the float Keras model."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge import metrics as M
from edge.card import atomic_write_text
from edge.runtime import ModelError, load


@dataclass
class Gate:
    max_delta_pp: float = 1.0  # fail when accuracy drops by more than this many points
    min_agreement_pct: float = 99.0  # fail when fewer labels agree with the float model, at any threshold judged
    # At each threshold, images whose float P(Parasitized) lies within ±band of it are not judged: an int8
    # output moves P in steps of 1/256, so a label that close to the cut-off is a coin toss for any export.
    band: float = 0.01


@dataclass
class Row:
    format: str
    file: str
    status: str  # pass | FAIL | error
    size_mb: float
    reason: str = ""
    ms_per_img: float = float("nan")
    metrics: dict = field(default_factory=dict)


def run_artifact(path: Path, images: np.ndarray, batch: int = 64, threads: int | None = None) -> tuple[np.ndarray, float]:
    """P(Parasitized) for every image through the edge runtime, and the ms per image it took."""
    m = load(path, threads)
    m.predict(images[:1])  # warm-up
    t0 = time.perf_counter()
    p = np.concatenate([m.predict(images[i:i + batch]) for i in range(0, len(images), batch)])
    return p, 1000 * (time.perf_counter() - t0) / len(images)


def thresholds_of(card) -> dict[str, float]:
    """The thresholds a card uses, by name: its default and each operating point. The gate judges all."""
    out = {"card": float(card.threshold)}
    out.update({name: float(op["threshold"]) for name, op in (card.operating_points or {}).items()})
    return out


def agreement(p_ref: np.ndarray, p_new: np.ndarray, threshold: float, band: float) -> dict:
    """Label agreement at one threshold over the images not within ±band of it."""
    judged = np.abs(p_ref - threshold) >= band
    n = int(judged.sum())
    agree = float(np.mean((p_new[judged] >= threshold) == (p_ref[judged] >= threshold))) if n else 1.0
    return {"threshold": threshold, "agreement_pct": 100 * agree, "judged": n, "near": int(len(p_ref) - n)}


def check(label: str, path: Path, y: np.ndarray, p_ref: np.ndarray, images: np.ndarray, gate: Gate,
          thresholds: dict[str, float] | float = 0.5) -> Row:
    """Accuracy at the card's threshold (the first) must not drop by more than the gate allows, and labels
    must agree with the float model at every threshold the card uses (`thresholds_of`)."""
    thresholds = {"card": thresholds} if isinstance(thresholds, (int, float)) else thresholds
    size = path.stat().st_size / 1e6 if path.exists() else 0.0
    try:
        p, ms = run_artifact(path, images)
    except ModelError as e:
        return Row(label, path.name, "error", size, str(e))
    if not np.all(np.isfinite(p)):
        return Row(label, path.name, "FAIL", size, "non-finite outputs", ms)
    m = M.parity(y, p_ref, p, next(iter(thresholds.values())))
    m["agreement"] = {name: agreement(np.asarray(p_ref, float), np.asarray(p, float), t, gate.band)
                      for name, t in thresholds.items()}
    m["agreement_pct"] = min(a["agreement_pct"] for a in m["agreement"].values())
    reasons = []
    if m["delta_accuracy_pp"] < -gate.max_delta_pp:
        reasons.append(f"accuracy dropped {-m['delta_accuracy_pp']:.2f} pp > {gate.max_delta_pp}")
    for name, a in m["agreement"].items():
        if a["agreement_pct"] < gate.min_agreement_pct:
            reasons.append(f"agreement {a['agreement_pct']:.2f}% < {gate.min_agreement_pct}% at the {name} "
                           f"threshold {a['threshold']:.4f}")
    return Row(label, path.name, "FAIL" if reasons else "pass", size, "; ".join(reasons), ms, m)


def markdown(rows: list[Row], title: str, ref: dict, gate: Gate | None = None, thresholds: dict | None = None) -> str:
    gate = gate or Gate()
    judged = ", ".join(f"{k} {v:.4f}" for k, v in thresholds.items()) if thresholds else \
        "each artifact's card threshold and operating points, listed per artifact in parity.json"
    lines = [f"### {title}", "",
             f"Float Keras reference: accuracy {ref['accuracy']:.4f}, AUC {ref['auc']:.4f} on {ref['n']} images.", "",
             f"Gate: accuracy at the card threshold may drop by at most {gate.max_delta_pp} pp; labels must agree with "
             f"the float model on at least {gate.min_agreement_pct}% of images at every threshold the card uses "
             f"({judged}), not judging images whose float P lies within ±{gate.band} of that threshold. "
             "Agreement % below is the lowest of those.", "",
             "| Format | Status | Size MB | Accuracy | AUC | Δacc pp | Agreement % | max \\|Δp\\| | ms/img |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r.metrics
        if m:
            lines.append(f"| {r.format} | {r.status} | {r.size_mb:.2f} | {m['accuracy']:.4f} | {m['auc']:.4f} | "
                         f"{m['delta_accuracy_pp']:+.2f} | {m['agreement_pct']:.2f} | {m['max_abs_dprob']:.4f} | {r.ms_per_img:.3f} |")
        else:
            lines.append(f"| {r.format} | {r.status} | {r.size_mb:.2f} | – | – | – | – | – | – |")
    bad = [r for r in rows if r.status != "pass"]
    if bad:
        lines += [""] + [f"- **{r.format}** {r.status}: {r.reason}" for r in bad]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, rows: list[Row], title: str, ref: dict, gate: Gate, extra: dict | None = None,
                 thresholds: dict | None = None) -> None:
    md = markdown(rows, title, ref, gate, thresholds)
    for kind, c in (extra or {}).get("explainer_vs_gradienttape", {}).items():
        md += (f"\nGrad-CAM explainer ({kind}) vs tf.GradientTape on {c['images']} images ({c['per_class']} per class), "
               f"maps of both classes: max |Δheat map| {c['max_abs_diff']:.1e}, max |Δp| {c['prob_max_abs_diff']:.1e}\n")
    atomic_write_text(out_dir / "parity.md", md)
    atomic_write_text(out_dir / "parity.json", json.dumps(
        {"title": title, "reference": ref, "gate": asdict(gate), "thresholds": thresholds or {},
         "rows": [asdict(r) for r in rows], **(extra or {})},
        indent=2, default=float) + "\n")
