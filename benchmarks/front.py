"""`malaria-edge bench-front RUN_OR_MODEL_DIR...`: the accuracy–latency front of trained candidates.

Each candidate is a folder with its `.keras` model and card (a `train` run or a shipped model folder)
and its int8 TFLite export (beside it, or in its `export/` subfolder). Validation accuracy and AUC
(what selection may look at) and test accuracy and AUC come from the card; int8 latency (p50 at batch 1,
one process per artifact) is measured here, every candidate in the same run, with the first folder
as the baseline its speed ratio is against. MACs from the Keras graph, size from the file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from benchmarks import hardware
from benchmarks.bench import run_latency
from edge.card import atomic_write_text, read_card


def find(folder: Path) -> tuple[Path, Path]:
    """(.keras, int8 .tflite) of a candidate folder."""
    kerases = sorted(folder.glob("*.keras"))
    if not kerases:
        raise FileNotFoundError(f"{folder}: no .keras model")
    int8 = sorted(folder.glob("*_int8.tflite")) + sorted(folder.glob("export/*_int8.tflite"))
    if not int8:
        raise FileNotFoundError(f"{folder}: no *_int8.tflite beside it or in export/ (run malaria-edge export)")
    return kerases[0], int8[0]


def describe(c) -> str:
    """A candidate in words, from its card: recipe, input size and what training varied."""
    t = c.training or {}
    bits = [c.recipe, f"{c.input_size} px"]
    if t.get("alpha"):
        bits.append(f"α {t['alpha']}")
    if t.get("stem_stride") == 2:
        bits.append("stride-2 stem")
    if t.get("batchnorm"):
        bits.append("BatchNorm")
    if t.get("width") not in (None, 1, 1.0):
        bits.append(f"width ×{t['width']:g}")
    if (t.get("excluded") or {}).get("images"):
        bits.append(f"{t['excluded']['images']} label issues left out")
    return ", ".join(bits)


def front(folders: list[Path], threads: int = 2, rounds: int = 5, runs: int = 300, budget_s: float = 4.0,
          log=print) -> dict:
    """Latency is the median over `rounds` of each candidate's p50, the candidates taking turns round after
    round, so that a slow spell of a shared machine does not land on one of them alone."""
    import keras
    rows, int8s = [], []
    for folder in folders:
        keras_path, int8 = find(folder)
        card = read_card(keras_path)
        m = card.metrics or {}
        val, test = m.get("val", {}), m.get("test", {})
        macs = hardware.model_macs(keras.models.load_model(keras_path, compile=False))
        int8s.append(int8)
        rows.append({"candidate": str(folder), "what": describe(card), "macs_m": macs / 1e6,
                     "int8_kb": int8.stat().st_size / 1024,
                     "val_accuracy": val.get("accuracy"), "val_auc": val.get("auc"),
                     "test_accuracy": test.get("accuracy"), "test_auc": test.get("auc"),
                     "test_n": test.get("n"), "test_groups": test.get("n_groups"), "p50_rounds_ms": []})
    for r in range(rounds):
        order = range(len(rows)) if r % 2 == 0 else reversed(range(len(rows)))
        for i in order:
            rows[i]["p50_rounds_ms"].append(run_latency(int8s[i], threads, "1", runs, budget_s)["results"]["run@1"]["p50_ms"])
    for row in rows:
        row["int8_p50_ms"] = float(np.median(row["p50_rounds_ms"]))
        log(f"  {row['candidate']}: {row['what']}, int8 p50 {row['int8_p50_ms']:.3f} ms "
            f"(rounds {', '.join(f'{v:.3f}' for v in row['p50_rounds_ms'])}), val acc {row['val_accuracy']}")
    base = rows[0]["int8_p50_ms"]
    for r in rows:
        r["p50_vs_first"] = r["int8_p50_ms"] / base
    return {"machine": hardware.machine(), "threads": threads, "rounds": rounds, "baseline": rows[0]["candidate"],
            "rows": rows}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Accuracy–latency front", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores ({', '.join(m.get('simd', [])) or 'no SIMD flags read'}); "
             f"int8 TFLite p50 at batch 1, {res['threads']} threads: the median of {res['rounds']} rounds in which the "
             "candidates took turns, all in this run; "
             f"ratio against `{res['baseline']}`. Selection looks at validation only; the test split is "
             "reported once per candidate.", "",
             "| candidate | model | MACs (M) | int8 KB | int8 p50 ms | × first | val acc | val AUC | test acc | test AUC |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, d=4: "–" if v is None else f"{v:.{d}f}"
    for r in res["rows"]:
        lines.append(f"| `{r['candidate']}` | {r['what']} | {r['macs_m']:.1f} | {r['int8_kb']:.0f} | "
                     f"{r['int8_p50_ms']:.3f} | {r['p50_vs_first']:.2f} | {f(r['val_accuracy'])} | {f(r['val_auc'])} | "
                     f"{f(r['test_accuracy'])} | {f(r['test_auc'])} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, name in ((axes[0], "accuracy", "accuracy"), (axes[1], "auc", "AUC")):
        xs = [r["int8_p50_ms"] for r in res["rows"]]
        ys = [v for r in res["rows"] for v in (r.get(f"val_{key}"), r.get(f"test_{key}")) if v is not None]
        xr, yr = (max(xs) - min(xs)) or 1, (max(ys) - min(ys)) or 1
        placed = []  # label anchors so far: a label near one already placed moves down a line
        for r in res["rows"]:
            for split, marker in (("val", "o"), ("test", "s")):
                v = r.get(f"{split}_{key}")
                if v is not None:
                    ax.scatter(r["int8_p50_ms"], v, marker=marker, color="C0" if split == "val" else "C1",
                               label=split if r is res["rows"][0] else None)
            x, y = r["int8_p50_ms"], r.get(f"val_{key}") or 0
            clash = sum(abs(x - px) < 0.25 * xr and abs(y - py) < 0.04 * yr for px, py in placed)
            placed.append((x, y))
            ax.annotate(_short(r["what"]), (x, y), fontsize=7, xytext=(4, 4 - 9 * clash), textcoords="offset points")
        ax.set_xlabel(f"int8 TFLite p50 ms (batch 1, {res['threads']} threads)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Accuracy–latency front (circles: validation, squares: test)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _short(what: str) -> str:
    for a, b in (("mobilenetv2-finetune", "MNv2"), ("mobilenetv2-frozen", "MNv2 frozen"), ("cnn", "CNN"),
                 (", stride-2 stem", " s2"), (", BatchNorm", "+BN"), (" px", ""), (" label issues left out", " cleaned"),
                 (", ", " ")):
        what = what.replace(a, b)
    return what


def run(folders: list[Path], out: Path, threads: int = 2, rounds: int = 5, log=print) -> dict:
    res = front(folders, threads, rounds, log=log)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "front.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / "front.md", markdown(res))
    plot(res, out / "front.png")
    return res
