"""qfold's own PTQ numbers on the reference models: accuracy per stage and method, engine speed.

    python tools/bench_qfold.py [--models resnet mobilenetv2 densenet] [--methods max percentile mse entropy]

Each (model, method) runs the whole pipeline (fold, bound, calibrate, export, ONNX Runtime
engine, evaluate) on the shipped MNIST split. Latency: median of repeated runs of the int8 engine
and of the FP32 ONNX export of the same model, in the same process (ratios, not absolute times).
Prints a markdown table; with --json writes the rows too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from qfold.config import PTQConfig
from qfold.examples import load_data, load_model
from qfold.onnx.export import ExportConfig, export_onnx
from qfold.pipeline import run_ptq


def median_ms(fn, x: np.ndarray, repeats: int) -> float:
    fn(x)
    fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def int8_kernel_count(engine_path: Path) -> tuple[int, int]:
    so = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(engine_path), so, providers=["CPUExecutionProvider"])
        import onnx

        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    int8 = sum(op in ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger") for op in ops)
    flt = sum(op in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "ConvTranspose") for op in ops)
    return int8, flt


def run(model_name: str, method: str, repeats: int) -> dict:
    model = load_model(model_name)
    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    cfg = PTQConfig(progress=False).replace(calib={"method": method}, eval={"plots": False})
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run_ptq(model, cx, tx, ty, config=cfg, out_dir=d)
        wall = time.perf_counter() - t0
        eng_path = res.artifacts["engine"]
        fp32_path = Path(d) / "fp32.onnx"
        export_onnx(model, cx[:1], fp32_path, ExportConfig())
        so = ort.SessionOptions()
        fp32 = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
        int8 = ort.InferenceSession(str(eng_path), so, providers=["CPUExecutionProvider"])
        lat = {}
        for bs in (1, 64):
            xb = tx[:bs].numpy()
            f = median_ms(lambda a: fp32.run(None, {fp32.get_inputs()[0].name: a}), xb, repeats)
            q = median_ms(lambda a: int8.run(None, {int8.get_inputs()[0].name: a}), xb, repeats)
            lat[bs] = (f, q)
        kernels = int8_kernel_count(eng_path)
    acc = res.accuracy
    e = acc.stages["engine"]
    return {
        "model": model_name, "method": method, "fp32_top1": acc.reference["top1"], "engine_top1": e.top1,
        "drop_pp": acc.drop_pp("engine"), "agreement": e.agreement, "sqnr_db": e.sqnr_db,
        "fake_quant_sqnr_db": acc.stages["fake_quant"].sqnr_db, "bounded_sqnr_db": acc.stages["bounded"].sqnr_db,
        "fp32_ms_b1": lat[1][0], "int8_ms_b1": lat[1][1], "fp32_ms_b64": lat[64][0], "int8_ms_b64": lat[64][1],
        "int8_kernels": kernels[0], "float_weighted_ops": kernels[1], "pipeline_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet", "mobilenetv2", "densenet"])
    ap.add_argument("--methods", nargs="+", default=["max", "percentile", "mse", "entropy"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [run(m, meth, args.repeats) for m in args.models for meth in args.methods]
    print("| model | method | FP32 top-1 | engine top-1 | drop (pp) | agreement | SQNR engine (dB) | SQNR fake-quant (dB) | int8/float convs in ORT | b1 FP32/int8 (ms) | b64 FP32/int8 (ms) | b64 speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {100*r['fp32_top1']:.1f}% | {100*r['engine_top1']:.1f}% | {r['drop_pp']:+.1f} | "
              f"{100*r['agreement']:.1f}% | {r['sqnr_db']:.1f} | {r['fake_quant_sqnr_db']:.1f} | {r['int8_kernels']}/{r['float_weighted_ops']} | "
              f"{r['fp32_ms_b1']:.2f}/{r['int8_ms_b1']:.2f} | {r['fp32_ms_b64']:.1f}/{r['int8_ms_b64']:.1f} | {r['fp32_ms_b64']/r['int8_ms_b64']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
