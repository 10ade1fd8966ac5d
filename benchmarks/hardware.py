"""How close to the limit: model MACs per image and this CPU's measured matmul peak."""
from __future__ import annotations

import os
import platform
import time

import numpy as np


def model_macs(model) -> int:
    """Multiply-accumulates per image of a Keras model (Conv2D, DepthwiseConv2D, Dense)."""
    import keras
    total = 0
    for l in model.layers:
        if isinstance(l, keras.layers.DepthwiseConv2D):
            _, h, w, c = l.output.shape
            total += h * w * c * l.kernel_size[0] * l.kernel_size[1]
        elif isinstance(l, keras.layers.Conv2D):
            _, h, w, c = l.output.shape
            total += h * w * c * l.kernel_size[0] * l.kernel_size[1] * l.input.shape[-1]
        elif isinstance(l, keras.layers.Dense):
            total += int(l.input.shape[-1]) * l.units
    return int(total)


def fp32_peak_gflops(threads: int, n: int = 1024, reps: int = 10) -> float:
    """Best-of-reps float32 matmul throughput through NumPy's BLAS with `threads` threads."""
    from threadpoolctl import threadpool_limits
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.T.copy()
    with threadpool_limits(threads):
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def int8_peak_gops(threads: int, n: int = 1024, reps: int = 10) -> float:
    """Best-of-reps uint8×int8 MatMulInteger throughput through onnxruntime (what int8 ONNX runs on)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                           helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    s.run(None, feed)
    best = min(_timed(lambda: s.run(None, feed)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "neon") if f" {f}" in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "simd": simd,
            "os": platform.platform(), "python": platform.python_version()}
