"""Benchmark: which Q/DQ rendering makes ONNX Runtime's CPU provider run every quantized layer in int8.

For each model (fake-quant fixtures of tests/qfold/fq_models.py, max-calibrated on random data):
export the TensorRT-profile Q/DQ ONNX with qfold, then time in ORT (ORT_ENABLE_ALL, CPU provider):

* ``fp32``      the same network with every Q/DQ removed (weights dequantized): the FP32 baseline;
* ``trt``       the TensorRT profile as exported (int8 activations, zero point 0, float biases);
* ``u8``        activations rewritten to uint8 / zero point 128 only (bit-identical to ``trt``);
* ``u8+bias``   plus int32 biases (what QLinearConv needs);
* ``ort``       qfold's full ``render_for_ort`` (Relu/Clip absorbed, exact propagation, extra Q/DQ
                on conv outputs TensorRT keeps float, max-calibrated here with ``ort_max_amax``).

Columns: int8 kernels / float weighted ops in ORT's optimized graph (``optimized_model_filepath``),
latency (median ms) at batch 1 and 64 with ORT's default threads and with ``intra_op_num_threads=2``,
speed-up of batch 64 vs fp32, and the max |difference| to ``trt`` in output quantization steps
(step = max|y_trt| / 127) plus top-1 agreement with ``trt``.

Run:  python tools/bench_ort_int8.py            (prints a markdown table; --quick for a smoke run)
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "qfold"))

from fq_models import Mixed, ResNetish, calibrate

from qfold.engine.ort import ort_max_amax
from qfold.onnx.export import export_onnx
from qfold.onnx.qdq import OrtRendering, render_for_ort, tensors_needing_amax_for_ort

INT8_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearConcat",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "ConvInteger", "MatMulInteger")
FLOAT_WEIGHTED = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedGemm", "FusedMatMul")


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP32 twin: weight DQs folded to float32, activation Q->DQ pairs bypassed."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q, s = inits[n.input[0]].astype(np.float32), inits[n.input[1]].astype(np.float32)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if s.ndim == 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                s = s.reshape(shape)
            g.initializer.append(numpy_helper.from_array((q * s).astype(np.float32), n.output[0]))
        elif n.op_type == "DequantizeLinear":
            rename[n.output[0]] = producer[n.input[0]].input[0]
    keep = [n for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    for n in keep:
        for k, i in enumerate(n.input):
            n.input[k] = rename.get(i, i)
    del g.node[:]
    g.node.extend(keep)
    from qfold.onnx.graph import remove_dead

    remove_dead(m)
    return m


def session(model: onnx.ModelProto, threads: int, optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if optimized_path:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = optimized_path
    else:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def kernel_counts(model: onnx.ModelProto) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        session(model, 1, path)
        ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    return sum(ops[k] for k in INT8_KERNELS), sum(ops[k] for k in FLOAT_WEIGHTED)


def latency_ms(sess: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reps1, reps64 = (5, 2) if args.quick else (50, 10)
    models = {"resnet (w32, 8 convs+fc, 32x32)": ResNetish(width=32, blocks=2),
              "mixed (dw, relu6, concat, convT)": Mixed(c=32)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for title, net in models.items():
            calib_x = torch.randn(64, 3, 32, 32)
            calibrate(net, calib_x)
            path = export_onnx(net, calib_x[:1], Path(d) / "m.onnx")
            trt = onnx.load(path)
            needed = tensors_needing_amax_for_ort(trt)
            amax = ort_max_amax(trt, needed, [calib_x.numpy()])
            variants = {
                "fp32": dequantized(trt),
                "trt": trt,
                "u8": render_for_ort(trt, None, OrtRendering(absorb_activations=False, extra_qdq=False, propagate=False,
                                                              int32_bias=False, fold_float_weights=False)),
                "u8+bias": render_for_ort(trt, None, OrtRendering(absorb_activations=False, extra_qdq=False,
                                                                   propagate=False, fold_float_weights=False)),
                "ort": render_for_ort(trt, amax),
            }
            x1 = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
            x64 = np.random.default_rng(2).standard_normal((64, 3, 32, 32)).astype(np.float32)
            y_trt = session(trt, 0).run(None, {"input": x64})[0]
            step = float(np.abs(y_trt).max()) / 127
            base = None
            for name, m in variants.items():
                k8, kf = kernel_counts(m)
                t = {}
                for threads in (0, 2):
                    s = session(m, threads)
                    t[(threads, 1)] = latency_ms(s, x1, reps1)
                    t[(threads, 64)] = latency_ms(s, x64, reps64)
                y = session(m, 0).run(None, {"input": x64})[0]
                diff = float(np.abs(y - y_trt).max()) / step
                agree = float(np.mean(y.argmax(1) == y_trt.argmax(1))) * 100
                base = t[(0, 64)] if name == "fp32" else base
                rows.append((title, name, f"{k8}/{kf}", t[(0, 1)], t[(0, 64)], t[(2, 1)], t[(2, 64)],
                             base / t[(0, 64)], diff, agree))
    print("| model | rendering | int8 kernels / float weighted ops | b1 ms | b64 ms | b1 ms (2 thr) | b64 ms (2 thr)"
          " | b64 speed-up vs fp32 | max diff vs trt (output steps) | top-1 agree vs trt % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.1f} | {r[7]:.2f}x"
              f" | {r[8]:.2f} | {r[9]:.1f} |")
    print(f"\nonnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}; "
          f"command: python tools/bench_ort_int8.py{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
