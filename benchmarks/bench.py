"""`malaria-edge bench MODEL_DIR`: every artifact of a model side by side, in one run.

Accuracy comes from the export parity code (same numbers as the gate); latency from one process
per artifact (benchmarks/latency.py); speed ratios are against the Keras baseline measured in the
same run. Writes Markdown, CSV, JSON and a PNG plot to the results folder.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.card import atomic_write_text, card_path, read_card
from benchmarks import hardware
from benchmarks.latency import edge_infer_hook

ROOT = Path(__file__).resolve().parents[1]


def artifacts(model_dir: Path) -> tuple[Path, list[Path]]:
    kerases = sorted(model_dir.glob("*.keras"))
    if not kerases:
        raise FileNotFoundError(f"{model_dir}: no .keras model (the float baseline) in it")
    arts = [p for p in sorted(model_dir.glob("*.tflite")) + sorted(model_dir.glob("*.onnx"))
            if read_card(p).role == "classifier"]
    return kerases[0], arts


def label_of(path: Path) -> str:
    if path.suffix == ".keras":
        return "keras"
    c = read_card(path)
    return f"{c.format}-{c.variant}"


def run_latency(path: Path, threads: int, batches: str, runs: int, budget_s: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.latency", str(path), "--threads", str(threads), "--batches", batches,
           "--runs", str(runs), "--budget-s", str(budget_s)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end(model: Path, files: list[Path]) -> dict:
    """edge-infer on a folder (decode → preprocess → inference → CSV), and its cold start on one image."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cells"
        folder.mkdir()
        for i, f in enumerate(files):
            os.symlink(f.resolve(), folder / f"{i:05d}{f.suffix}")
        rss_file = Path(tmp) / "rss"
        cmd = edge_infer_hook(rss_file) + ["--model", str(model), "-q"]  # edge-infer, with its own peak RSS
        cold = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(cmd + [str(files[0])], cwd=ROOT, check=True, capture_output=True)
            cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run(cmd + [str(folder), "--output", str(Path(tmp) / "r.csv")], cwd=ROOT, check=True,
                       capture_output=True)
        wall = time.perf_counter() - t
        rss = float(rss_file.read_text())
    return {"model": model.name, "images": len(files), "wall_s": wall, "cells_per_s": len(files) / wall,
            "cold_start_s_median": float(np.median(cold)),
            "peak_rss_mb": rss}


FIELD_PHOTO = ROOT / "examples" / "field" / "IMG_20150614_124212.jpg"


def field_speed(model: Path, photo: Path = FIELD_PHOTO, repeats: int = 5) -> dict:
    """Field mode on a real 16 MP field photo (decode, detection, classification of every cell at the
    counting point, or the card threshold): fields/s, median of `repeats` after one warm-up."""
    from benchmarks.fields import time_field
    from edge.field import FieldOptions
    from edge.images import load_image
    from edge.operating import field_point, operating_point
    from edge.runtime import ModelError, load_classifier
    m = load_classifier(model)
    try:
        point = operating_point(m, field_point(m))
        opts, name = FieldOptions.at(point), point.name
    except ModelError:
        opts, name = FieldOptions(m.card.threshold, {}), "card threshold"
    t = time_field(lambda: load_image(photo), photo.name, m, opts, repeats, warmup=True)
    return {"model": model.name, "photo": photo.name, "operating_point": name, **t}


def bench(model_dir: Path, data_dir: Path, out_dir: Path, threads=(1, 2), runs: int = 200, budget_s: float = 15.0,
          max_images: int | None = None, e2e_images: int = 2000, log=print) -> dict:
    import keras
    from export.parity import Gate, check
    from export.pipeline import export_data
    from train.data import load_prepared
    from train.evaluate import keras_predict
    from edge import metrics as M

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    keras_path, arts = artifacts(model_dir)
    name = model_dir.name
    model = keras.models.load_model(keras_path, compile=False)
    macs = hardware.model_macs(model)
    data = export_data(data_dir, calib_n=2, max_parity=max_images)
    p_ref = keras_predict(model, data.images)
    thr = read_card(keras_path).threshold if card_path(keras_path).exists() else 0.5
    ref = M.binary_metrics(data.labels, p_ref, thr)
    log(f"{name}: {macs / 1e6:.1f} M MACs/image; accuracy on {data.title}")
    acc = {"keras": {"accuracy": ref["accuracy"], "f1": ref["f1"], "auc": ref["auc"], "delta_accuracy_pp": 0.0,
                     "agreement_pct": 100.0, "max_abs_dprob": 0.0}}
    for a in arts:
        acc[label_of(a)] = check(label_of(a), a, data.labels, p_ref, data.images, Gate(), thr).metrics
    log("latency (one process per artifact and thread count)")
    lat = {}
    for path in [keras_path] + arts:
        for t in threads:
            r = run_latency(path, t, "1,32", runs if path.suffix != ".keras" else min(runs, 200), budget_s)
            lat[(label_of(path), t)] = r
            b1 = r["results"].get("run@1") or r["results"]["keras-predict@1"]
            log(f"  {label_of(path):15s} threads {t}: p50 {b1['p50_ms']:.3f} ms @1, peak RSS {r['peak_rss_mb']:.0f} MB")
    peaks = {t: {"fp32_gflops": hardware.fp32_peak_gflops(t), "int8_gops": hardware.int8_peak_gops(t)} for t in threads}
    int8_model = next((a for a in arts if a.name.endswith("_int8.tflite")), arts[0] if arts else None)
    e2e = None
    if int8_model is not None and e2e_images:
        d = load_prepared(data_dir)
        source = Path(json.loads((d.root / "report.json").read_text())["source"])
        idx = d.indices("test")[:e2e_images]
        files = [source / d.relpaths[i] for i in idx]
        if source.is_dir() and all(f.exists() for f in files[:5]):
            log(f"end to end: edge-infer on {len(files)} real images with {int8_model.name}")
            e2e = end_to_end(int8_model, files)
    fields = None
    if int8_model is not None and FIELD_PHOTO.exists():
        log(f"field mode: {FIELD_PHOTO.name} with {int8_model.name}")
        fields = field_speed(int8_model)
    tmax = max(threads)
    base = lat[("keras", tmax)]["results"]["keras-predict@1"]["p50_ms"]
    rows = []
    for path in [keras_path] + arts:
        lab = label_of(path)
        modes = [("keras-predict", "keras model.predict"), ("keras-call", "keras model(x)")] if lab == "keras" \
            else [("run", lab)]
        for key, shown in modes:
            r = {t: lat[(lab, t)]["results"] for t in threads}
            b1, b32 = r[tmax][f"{key}@1"], r[tmax][f"{key}@32"]
            kind_peak = peaks[tmax]["int8_gops"] if "int8" in lab or "dynamic" in lab else peaks[tmax]["fp32_gflops"]
            gflops = 2 * macs * b32["cells_per_s"] / 1e9
            rows.append({
                "artifact": shown, "file": path.name, "size_mb": path.stat().st_size / 1e6,
                **{k: acc[lab][k] for k in ("accuracy", "f1", "auc", "delta_accuracy_pp", "agreement_pct")},
                "load_ms": lat[(lab, tmax)]["load_ms"], "first_ms": b1["first_ms"],
                **{f"p50_b1_t{t}_ms": r[t][f"{key}@1"]["p50_ms"] for t in threads},
                "p90_b1_ms": b1["p90_ms"], "p99_b1_ms": b1["p99_ms"], "mean_b1_ms": b1["mean_ms"], "std_b1_ms": b1["std_ms"],
                "runs_b1": b1["runs"], "p50_b32_ms": b32["p50_ms"], "cells_per_s_b32": b32["cells_per_s"],
                "peak_rss_mb": lat[(lab, tmax)]["peak_rss_mb"], "speedup_vs_keras_predict": base / b1["p50_ms"],
                "gflops_b32": gflops, "pct_of_peak": 100 * gflops / kind_peak,
            })
    result = {"model": name, "macs_per_image": macs, "threads": list(threads), "accuracy_on": data.title,
              "threshold": thr, "machine": hardware.machine(), "peaks": {str(k): v for k, v in peaks.items()},
              "versions": versions(), "rows": rows, "end_to_end": e2e, "field_mode": fields,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_results(out_dir, name, result)
    return result


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for p in ("tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "onnxruntime", "numpy", "opencv-python-headless"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def markdown(res: dict) -> str:
    t = max(res["threads"])
    m = res["machine"]
    lines = [f"## {res['model']} — {res['macs_per_image'] / 1e6:.1f} M MACs/image",
             "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['arch']}, {', '.join(m['simd'])}); {res['date']}. "
             f"Accuracy on the {res['accuracy_on']}. Latency at {t} threads unless noted; "
             f"speed-up is against Keras `model.predict` at batch 1 measured in the same run.",
             "",
             "| Artifact | Size MB | Accuracy | F1 | AUC | Δacc pp | Agree % | load ms | p50 b1 1 thr ms | p50 b1 ms "
             "| p90 b1 ms | p99 b1 ms | mean±std b1 ms | cells/s b32 | peak RSS MB | speed-up | GFLOP/s b32 | % peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['artifact']} | {r['size_mb']:.2f} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['auc']:.4f} | "
            f"{r['delta_accuracy_pp']:+.2f} | {r['agreement_pct']:.2f} | {r['load_ms']:.0f} | {r['p50_b1_t1_ms']:.3f} | "
            f"{r[f'p50_b1_t{t}_ms']:.3f} | {r['p90_b1_ms']:.3f} | {r['p99_b1_ms']:.3f} | "
            f"{r['mean_b1_ms']:.3f}±{r['std_b1_ms']:.3f} | {r['cells_per_s_b32']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['speedup_vs_keras_predict']:.1f}× | {r['gflops_b32']:.1f} | {r['pct_of_peak']:.0f}% |")
    pk = res["peaks"][str(t)]
    lines += ["", f"CPU peak measured in the same run ({t} threads, 1024² matmul): float32 {pk['fp32_gflops']:.0f} "
              f"GFLOP/s (NumPy BLAS), int8 {pk['int8_gops']:.0f} GOP/s (onnxruntime MatMulInteger). "
              "% peak compares each artifact's batch-32 throughput (2×MACs) with the peak of its arithmetic."]
    if res.get("end_to_end"):
        e = res["end_to_end"]
        lines += ["", f"End to end (`edge-infer` on a folder of {e['images']} real cell images with {e['model']}: "
                  f"decode → preprocess → inference → CSV): **{e['cells_per_s']:.0f} cells/s** "
                  f"({e['wall_s']:.1f} s wall, peak RSS {e['peak_rss_mb']:.0f} MB); cold start on one image "
                  f"{e['cold_start_s_median']:.2f} s (median of 3)."]
    if res.get("field_mode"):
        f = res["field_mode"]
        lines += ["", f"Field mode (`edge-infer --field` on the real 5312x2988 photo {f['photo']}, {f['cells']} cells, "
                  f"with {f['model']}, {f.get('operating_point', 'counting')} point): **{f['fields_per_s']:.2f} fields/s** ({f['total_ms']:.0f} ms: decode "
                  f"{f['decode_ms']:.0f}, detect {f['detect_ms']:.0f}, classify {f['classify_ms']:.0f} ms; median of 5)."]
    v = res["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v[k]}" for k in v)]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = max(res["threads"])
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for r in res["rows"]:
        x = r[f"p50_b1_t{t}_ms"]
        ax.scatter(x, 100 * r["accuracy"], s=40 + 60 * r["size_mb"], alpha=0.6)
        ax.annotate(r["artifact"], (x, 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency per cell, batch 1, {t} threads (ms, log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{res['model']}: accuracy vs latency (marker area ∝ file size)\n{res['machine']['cpu']}, "
                 f"{res['machine']['cores']} cores", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def write_results(out_dir: Path, name: str, res: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.json", json.dumps(res, indent=2, default=float) + "\n")
    atomic_write_text(out_dir / f"{name}.md", markdown(res))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(res["rows"][0].keys()), lineterminator="\n")
    w.writeheader()
    w.writerows(res["rows"])
    atomic_write_text(out_dir / f"{name}.csv", buf.getvalue())
    plot(res, out_dir / f"{name}.png")
