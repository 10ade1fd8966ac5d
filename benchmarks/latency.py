"""Time one artifact in a process of its own (so its peak RSS is its own), benchmark_model style.

    python -m benchmarks.latency ARTIFACT --batches 1,32 --threads 2 --runs 200

Prints one JSON object: load time, first inference, then p50/p90/p99/mean/std over the timed runs
for each batch size, and the process's peak RSS. A `.keras` file is the TensorFlow baseline, timed
both through `model.predict` (what the seed's app does) and a direct `model(x)` call.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


def stats(times_s: list[float], batch: int) -> dict:
    ms = np.array(times_s) * 1000
    return {"runs": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "std_ms": float(ms.std()),
            "cells_per_s": float(batch * 1000 / np.percentile(ms, 50))}


def time_fn(fn, x, runs: int, warmup: int, budget_s: float) -> list[float]:
    for _ in range(warmup):
        fn(x)
    out, t_end = [], time.perf_counter() + budget_s
    for i in range(runs):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
        if i >= 20 and time.perf_counter() > t_end:  # never fewer than 20, stop at the time budget
            break
    return out


def peak_rss_mb() -> float:
    """This process's own high-water mark. VmHWM resets at exec; ru_maxrss would carry the
    parent's peak over from fork, so it is only the fallback where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def edge_infer_hook(rss_file: Path) -> list[str]:
    """A command that runs edge-infer (its arguments appended) and writes its own peak RSS to rss_file at exit."""
    hook = ("import atexit, runpy, sys; from benchmarks.latency import peak_rss_mb; "
            f"atexit.register(lambda: open({str(rss_file)!r}, 'w').write(str(peak_rss_mb()))); "
            "sys.argv[0] = 'edge-infer'; runpy.run_module('edge.cli', run_name='__main__')")
    return [sys.executable, "-c", hook]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=20.0, help="Per measurement: stop after this (≥20 runs).")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    rng = np.random.default_rng(0)
    res = {"artifact": a.artifact, "threads": a.threads, "results": {}}
    t0 = time.perf_counter()
    if a.artifact.endswith(".keras"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(a.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras
        model = keras.models.load_model(a.artifact, compile=False)
        size = int(model.input_shape[1])
        fns = {"keras-predict": lambda x: model.predict(x, verbose=0, batch_size=len(x)),
               "keras-call": lambda x: model(x, training=False).numpy()}
    else:
        from edge.runtime import load
        m = load(a.artifact, threads=a.threads)
        size = m.size
        fns = {"run": m.predict}
    res["load_ms"] = 1000 * (time.perf_counter() - t0)
    for name, fn in fns.items():
        for b in batches:
            x = rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8)
            x = x.astype(np.float32) if a.artifact.endswith(".keras") else x
            t = time.perf_counter()
            fn(x)
            first = 1000 * (time.perf_counter() - t)
            runs = a.runs if b == 1 else max(20, a.runs // 4)
            res["results"][f"{name}@{b}"] = {"first_ms": first, **stats(time_fn(fn, x, runs, a.warmup, a.budget_s), b)}
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
