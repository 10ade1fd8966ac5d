"""Field mode's counting cross-fitted over every train/val patient, not the 14 infected ones validation holds.

Each fold (`malaria-edge data fold`) is read by a model of the shipped recipe trained on the other folds
(`train/sweeps/crossfit.txt`), exported to int8 and given its operating points on its own fold's crops
(`evaluate --operating-points`). For each fold: pools of synthetic fields of its patients at 0.5, 2 and 5%
(as `bench-fields` builds them), mixed and one-patient sessions corrected with the fold model's card, and the
share of its crops' sensitivity field mode's re-cut keeps. The rule this serves is in
benchmarks/results/crossfit/CRITERION.md.

    python -m benchmarks.crossfit --fold FOLD_DIR MODEL.tflite [--fold ...] --out benchmarks/results/crossfit
                                  [--cache runs/crossfit]
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from benchmarks.fields import pool_summary, simulate_sessions, single_patient_sessions
from edge.card import atomic_write_text
from edge.field import FieldOptions
from edge.operating import operating_point
from edge.runtime import load_classifier
from train.fieldpool import field_pool, field_spread

LEVELS = (0.005, 0.02, 0.05)
POOL_KEYS = ("labels", "probs", "crop_probs", "groups", "shared", "per_field")


def fold_pools(model_path: Path, data_dir: Path, crops_root: Path, point: str = "counting", fields_per_group: int = 3,
               cache: Path | None = None, log=print) -> tuple[FieldOptions, dict[float, dict], dict]:
    """The fold model's options at `point` (its spread measured on these pools, as `evaluate --field-spread`
    measures it on validation's), its pools, read from `cache` (.npz) where it was written before, and what
    field mode's re-cut kept of their infected cells' calls (`field_spread`'s recut)."""
    model = load_classifier(model_path)
    opts = FieldOptions.at(operating_point(model, point))
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        pools = {pi: {**m, **{k: z[f"{pi}/{k}"] for k in POOL_KEYS}} for pi, m in
                 ((float(k), v) for k, v in meta.items())}
    else:
        pools = {pi: field_pool(data_dir, crops_root, model, opts, split="val", parasitemia=pi,
                                fields_per_group=fields_per_group, log=log) for pi in LEVELS}
        if cache is not None:
            meta = {str(pi): {k: v for k, v in p.items() if k not in POOL_KEYS} for pi, p in pools.items()}
            arrays = {f"{pi}/{k}": p[k] for pi, p in pools.items() for k in POOL_KEYS}
            tmp = cache.with_name(cache.name + ".partial.npz")
            np.savez_compressed(tmp, meta=json.dumps(meta, default=float), **arrays)
            tmp.replace(cache)
    fs = field_spread(list(pools.values()), opts.threshold)
    return replace(opts, spread=(fs["sensitivity_var"], fs["specificity_var"])), pools, fs["recut"]


def _slim(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("per_patient",)} for r in rows]


def run(folds: list[tuple[Path, Path]], crops_root: Path, out: Path, cache: Path, sessions: int = 200,
        log=print) -> dict:
    """cache: where each fold's pools are kept (by fold and model), so the sessions can be re-run without them."""
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    read, kept = [], []
    for k, (data_dir, model_path) in enumerate(folds):
        log(f"fold {k}: {model_path.name} on {data_dir}")
        opts, pools, rc = fold_pools(model_path, data_dir, crops_root, log=log,
                                     cache=cache / f"pools_fold{k}_{model_path.stem}.npz")
        read.append((opts, pools))
        kept.append({**rc, "kept": rc["field_called"] / max(rc["crops_called"], 1)})
    res = {"folds": []}
    for k, (opts, pools) in enumerate(read):
        others = [kept[j] for j in range(len(read)) if j != k]
        rc = tuple(sum(x[c] for x in others) for c in ("field_called", "crops_called", "infected"))
        r_other = rc[0] / max(rc[1], 1)
        sc = replace(opts, recut=rc)  # the shipped estimator, scaled by what the other folds' re-cut kept
        data_dir, model_path = folds[k]
        split = json.loads((data_dir / "split.json").read_text())
        res["folds"].append({
            "fold": k, "model": str(model_path), "patients": len(split["val_groups"]),
            "threshold": opts.threshold, "counts": opts.counts, "spread": list(opts.spread),
            "recut": kept[k], "r_other_folds": r_other,
            "pools": {str(100 * pi): pool_summary(p, opts.threshold) for pi, p in pools.items()},
            "unscaled": {"sessions": _slim(simulate_sessions(pools, opts, sessions=sessions)),
                         "single_patient": _slim(single_patient_sessions(pools, opts))},
            "scaled": {"sessions": _slim(simulate_sessions(pools, sc, sessions=sessions)),
                       "single_patient": _slim(single_patient_sessions(pools, sc))}})
        log(f"fold {k}: kept {kept[k]['kept']:.3f}, r from the others {r_other:.3f}")
    res["summary"] = summary(res["folds"])
    res["recut_pooled"] = {k: sum(x[k] for x in kept) for k in ("infected", "field_called", "crops_called")}
    res["recut_pooled"]["kept"] = res["recut_pooled"]["field_called"] / max(res["recut_pooled"]["crops_called"], 1)
    atomic_write_text(out / "crossfit.json", json.dumps(res, indent=1, default=float) + "\n")
    atomic_write_text(out / "crossfit.md", markdown(res))
    return res


def summary(folds: list[dict]) -> dict:
    """Per level and way (unscaled, scaled): the folds' mean bias, pooled coverage, one-patient coverage."""
    out = {}
    for way in ("unscaled", "scaled"):
        rows = []
        for i, pi in enumerate(LEVELS):
            s = [f[way]["sessions"][i] for f in folds]
            sp = [x for f in folds for x in f[way]["single_patient"] if x["parasitemia_percent"] == 100 * pi]
            n_sp = sum(x["patients"] * x["sessions_per_patient"] for x in sp)
            rows.append({"parasitemia_percent": 100 * pi, "bias_pp": [x["bias_pp"] for x in s],
                         "mean_bias_pp": float(np.mean([x["bias_pp"] for x in s])),
                         "mae_pp": float(np.mean([x["mae_pp"] for x in s])),
                         "coverage_ci95": float(np.mean([x["coverage_ci95"] for x in s])),
                         "mean_ci95_width_pp": float(np.mean([x["mean_ci95_width_pp"] for x in s])),
                         "single_patient_coverage": float(sum(x["coverage_ci95"] * x["patients"] * x["sessions_per_patient"]
                                                              for x in sp) / max(n_sp, 1)),
                         "single_patients": int(sum(x["patients"] for x in sp))})
        out[way] = {"levels": rows, "mean_abs_bias_pp": float(np.mean([abs(r["mean_bias_pp"]) for r in rows]))}
    u, s = out["unscaled"]["levels"], out["scaled"]["levels"]
    out["rule"] = {
        "1_lower_mean_abs_bias": out["scaled"]["mean_abs_bias_pp"] < out["unscaled"]["mean_abs_bias_pp"],
        "2_coverage_at_least_90": all(r["coverage_ci95"] >= 0.9 for r in s),
        "3_single_patient_coverage_5pct_not_lower": s[-1]["single_patient_coverage"] >= u[-1]["single_patient_coverage"],
        "4_bias_at_0.5pct_within_0.3": abs(s[0]["mean_bias_pp"]) <= 0.3}
    out["rule"]["passed"] = all(out["rule"].values())
    return out


def markdown(res: dict) -> str:
    lines = ["# Field mode cross-fitted over every train/val patient", "",
             "Generated by `python -m benchmarks.crossfit`; the rule it was run for: `CRITERION.md`. Each fold's "
             "patients are read by a model of the shipped recipe trained on the other folds, at its `counting` point "
             "(set on its own fold's crops). Bias in points of parasitemia; sessions of 2,000 cells.", "",
             "| fold | patients | crops' Se / Sp (card) | pool Se / Sp at 0.5 / 2 / 5% | re-cut keeps | r from the other folds |",
             "|---:|---:|---|---|---:|---:|"]
    for f in res["folds"]:
        c = f["counts"]
        se, sp = c["tp"] / (c["tp"] + c["fn"]), c["tn"] / (c["tn"] + c["fp"])
        pools = " · ".join(f"{p['sensitivity']:.3f} / {p['specificity']:.4f}" for p in f["pools"].values())
        lines.append(f"| {f['fold']} | {f['patients']} | {se:.3f} / {sp:.4f} | {pools} | "
                     f"{f['recut']['kept']:.3f} ({f['recut']['field_called']}/{f['recut']['crops_called']}) | "
                     f"{f['r_other_folds']:.3f} |")
    rp = res["recut_pooled"]
    lines += ["", f"Pooled over the folds, field mode's crops keep **{rp['kept']:.3f}** of their own crops' calls "
              f"({rp['field_called']} of {rp['crops_called']}, {rp['infected']} infected cells found).", "",
              "| way | level | bias per fold | mean bias | MAE | coverage | width | one-patient coverage (patients) |",
              "|---|---:|---|---:|---:|---:|---:|---|"]
    for way in ("unscaled", "scaled"):
        for r in res["summary"][way]["levels"]:
            lines.append(f"| {way} | {r['parasitemia_percent']:g}% | {' / '.join(f'{b:+.2f}' for b in r['bias_pp'])} | "
                         f"{r['mean_bias_pp']:+.2f} | {r['mae_pp']:.2f} | {100 * r['coverage_ci95']:.1f}% | "
                         f"{r['mean_ci95_width_pp']:.2f} | {100 * r['single_patient_coverage']:.1f}% "
                         f"({r['single_patients']}) |")
    rule = res["summary"]["rule"]
    lines += ["", "Mean |bias| over the levels: unscaled "
              f"{res['summary']['unscaled']['mean_abs_bias_pp']:.2f}, scaled {res['summary']['scaled']['mean_abs_bias_pp']:.2f}.",
              "", "Rule: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in rule.items() if k != "passed")
              + f". **{'Passed' if rule['passed'] else 'Not passed'}.**", ""]
    return "\n".join(lines)


@click.command()
@click.option("--fold", "folds", nargs=2, multiple=True, required=True,
              type=(click.Path(path_type=Path, exists=True, file_okay=False), click.Path(path_type=Path, exists=True)),
              help="A fold's prepared folder (`data fold`) and the int8 model trained without it; once per fold.")
@click.option("--crops", "crops_root", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=Path("../shared/data/nih_malaria_dev"), show_default=True)
@click.option("--sessions", default=200, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/crossfit"), show_default=True)
@click.option("--cache", type=click.Path(path_type=Path), default=Path("runs/crossfit"), show_default=True,
              help="Where each fold's field pools are kept (the slow part), by fold and model.")
def main(folds, crops_root, sessions, out, cache):
    res = run(list(folds), crops_root, out, cache, sessions)
    click.echo(markdown(res))


if __name__ == "__main__":
    main()
