#!/usr/bin/env python3
"""One short check of the TensorRT backend on a GPU machine: the real PTQ pipeline, then TensorRT.

    python tools/trt_check.py                     # qfold's PTQ pipeline on the built-in resnet example
    python tools/trt_check.py --model densenet    # another built-in example (resnet, mobilenetv2, densenet)
    python tools/trt_check.py --onnx m.qdq.onnx   # any Q/DQ ONNX with one input, dynamic batch

What it does:
  1. gets a Q/DQ ONNX: by default ``qfold.pipeline.run_ptq`` on a built-in example model (fold,
     bound, calibrate on the fixed 512-image calibration split, export ``model_qdq.onnx``, the
     TensorRT-profile Q/DQ ONNX, and build the ONNX Runtime engine), evaluated on the fixed
     1,000-image test split; or --onnx (random inputs, no torch reference);
  2. CPU half: ONNX Runtime on model_qdq.onnx with graph optimizations off (Q/DQ executed
     literally), with its int8 kernels, on the FP16-fallback conversion TensorRT parses, and the
     pipeline's own ONNX Runtime engine, each compared with the torch fake-quant model (max abs
     difference in output quantization steps, step = max|reference| / 127, top-1 agreement);
  3. with TensorRT and CUDA: builds engines from model_qdq.onnx (INT8 with FP32 fallback, INT8 with
     FP16 fallback via ``EngineConfig(fp16_fallback=True)``, and FP16 without Q/DQ as the speed
     baseline), compares their outputs with ONNX Runtime and the fake-quant model, prints each
     engine's layer precisions (INT8 layer count, float layers), writes each engine's inspector
     JSON (``<engine>.inspector.json``), and its latency per batch measured twice:
     * in process: input and output preallocated and bound once, CUDA events recorded on the
       engine's own stream around ``--iters`` back-to-back enqueues (no allocation, no host sync
       inside), median over ``--repeats`` such runs;
     * with ``trtexec --loadEngine`` when trtexec is on PATH (the pip wheels do not ship it): its
       "GPU Compute Time" median.
Human-readable lines go to stderr, one JSON summary to stdout.

Exit status: 0 verified (every engine built, ran, agreed with the fake-quant model on at least
``--min-agreement`` of the top-1 predictions for the INT8 engines, which have INT8 layers); 1 an
engine failed to build or to agree; 2 TensorRT (or a CUDA device) is missing while ``--require-tensorrt`` (the
default): one line, "TensorRT not installed: not verified", before any work. With
``--no-require-tensorrt`` and no TensorRT it runs the CPU half and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qfold.config import PTQConfig
from qfold.engine import get_backend
from qfold.engine import trt as T
from qfold.engine.base import EngineConfig
from qfold.examples import MODELS, load_data, load_model
from qfold.onnx.fp16 import convert_float_to_fp16
from qfold.pipeline import run_ptq


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model behind a Q/DQ graph: DQ(Q(t)) -> t, DQ(int8 constant) -> float constant."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    drop: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        src = producer.get(n.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            rename[n.output[0]] = src.input[0]
            drop += [n, src]
        elif n.input[0] in inits:
            q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if s.ndim == 1:
                s = s.reshape([-1 if k == axis % q.ndim else 1 for k in range(q.ndim)])
            g.initializer.append(numpy_helper.from_array(q * s, n.output[0]))
            drop.append(n)
    for n in g.node:
        for k, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[k] = name
    keep = [n for n in g.node if not any(n is d for d in drop)]
    for out in g.output:
        if out.name in rename:
            keep.append(onnx.helper.make_node("Identity", [rename[out.name]], [out.name]))
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [n for n in keep if n.op_type != "Constant" or n.output[0] in used]  # orphaned Q/DQ scales
    del g.node[:]
    g.node.extend(keep)
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return m


def ort_run(path: Path, x: np.ndarray, *, literal: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if literal:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def compare(y: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Max abs difference (absolute and in output steps of ``ref``), top-1 agreement, accuracy."""
    step = float(np.abs(ref).max()) / 127 or 1e-12
    diff = float(np.abs(y.astype(np.float64) - ref).max())
    out = {
        "max_abs_diff": diff,
        "max_diff_steps": diff / step,
        "top1_agreement": float((y.argmax(-1) == ref.argmax(-1)).mean()) if y.ndim == 2 else float("nan"),
    }
    if labels is not None:
        out["accuracy"] = float((y.argmax(-1) == labels).mean())
    return out


def time_engine(engine: T.TensorRTEngine, shape: tuple[int, ...], iters: int, repeats: int) -> float:
    """Median GPU milliseconds per batch: I/O bound once, events on the engine's stream around ``iters`` enqueues."""
    stream = engine.stream
    with torch.cuda.stream(stream):
        x = torch.rand(shape, device="cuda").to(engine.input_dtype)
        engine.bind(x)  # preallocated, aligned input and output; no allocation inside the timed loop
        for _ in range(20):  # warm-up
            engine.enqueue()
    stream.synchronize()
    per_batch = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            engine.enqueue()
        end.record(stream)
        end.synchronize()
        per_batch.append(start.elapsed_time(end) / iters)
    return float(np.median(per_batch))


_GPU_COMPUTE = re.compile(r"GPU Compute Time: min = ([0-9.e+-]+) ms, max = ([0-9.e+-]+) ms, mean = ([0-9.e+-]+) ms, "
                          r"median = ([0-9.e+-]+) ms")


def parse_trtexec_gpu_compute(log_text: str) -> dict[str, float] | None:
    """trtexec's "GPU Compute Time: min = .. ms, max = .. ms, mean = .. ms, median = .. ms" line
    (samples/common/sampleReporting.cpp, ``printEpilog``) as numbers; None when absent."""
    m = _GPU_COMPUTE.search(log_text)
    if m is None:
        return None
    return dict(zip(("min_ms", "max_ms", "mean_ms", "median_ms"), map(float, m.groups())))


def trtexec_time(plan: Path, input_name: str, shape: tuple[int, ...], log_path: Path) -> dict:
    """Median GPU compute time per batch from ``trtexec --loadEngine``; says why when trtexec is unavailable."""
    exe = shutil.which("trtexec")
    if exe is None:
        return {"skipped": "trtexec is not on PATH (the TensorRT pip wheels do not ship it)"}
    cmd = [exe, f"--loadEngine={plan}", f"--shapes={input_name}:{'x'.join(map(str, shape))}",
           "--warmUp=500", "--duration=3", "--noDataTransfers"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    log_path.write_text(r.stdout + r.stderr)
    timing = parse_trtexec_gpu_compute(r.stdout + r.stderr)
    if r.returncode != 0 or timing is None:
        return {"error": f"trtexec exited {r.returncode} without a GPU Compute Time line; see {log_path}"}
    return {**timing, "command": " ".join(cmd)}


def print_table(title: str, rows: dict[str, dict[str, dict[str, float]]]) -> None:
    log(f"| {title} | vs | max abs diff | max diff (output steps) | top-1 agreement | accuracy |")
    log("|---|---|---|---|---|---|")
    for name, refs in rows.items():
        for ref, v in refs.items():
            acc = f"{v['accuracy']:.4f}" if "accuracy" in v else "-"
            log(f"| {name} | {ref} | {v['max_abs_diff']:.4g} | {v['max_diff_steps']:.2f} | {v['top1_agreement']:.4f} | {acc} |")


def pipeline_model(name: str, out: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, Path, dict]:
    """run_ptq on a built-in example: (model_qdq.onnx, test inputs, labels, fake-quant logits, ORT engine, info)."""
    calib_x, _ = load_data("calib")
    test_x, test_y = load_data("test")
    t0 = time.perf_counter()
    res = run_ptq(load_model(name), calib_x, test_x, test_y, config=PTQConfig(progress=False), out_dir=out)
    ptq_s = time.perf_counter() - t0
    fq_model = res.fake_quant.eval()
    with torch.no_grad():
        fq = torch.cat([fq_model(b) for b in test_x.split(256)]).numpy()
    acc = res.accuracy
    info = {
        "model": f"qfold.examples '{name}' via qfold.pipeline.run_ptq ({calib_x.shape[0]} calibration, "
                 f"{test_x.shape[0]} test images)",
        "ptq_s": round(ptq_s, 2),
        "pipeline_accuracy": {
            "fp32": acc.reference.get("top1") if acc is not None else None,
            **({k: v.top1 for k, v in acc.stages.items()} if acc is not None else {}),
        },
        "trt_rule_violations": res.reports.get("trt_rule_violations", []),
    }
    return out / "model_qdq.onnx", test_x.numpy(), test_y.numpy(), fq, res.artifacts["engine"], info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", type=Path, help="a Q/DQ ONNX with one input whose batch is dynamic (skips the pipeline)")
    ap.add_argument("--model", default="resnet", choices=sorted(MODELS), help="built-in example model (default: resnet)")
    ap.add_argument("--out", type=Path, help="folder for the pipeline artifacts and engines (default: a temporary folder)")
    ap.add_argument("--batch", type=int, default=64, help="batch for the latency measurement")
    ap.add_argument("--iters", type=int, default=200, help="enqueues per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    ap.add_argument("--min-agreement", type=float, default=0.97,
                    help="least top-1 agreement of each engine with the torch fake-quant model (default 0.97)")
    ap.add_argument("--require-tensorrt", action=argparse.BooleanOptionalAction, default=True,
                    help="exit 2 at once when TensorRT or CUDA is missing (default); --no-require-tensorrt "
                         "runs the CPU half instead")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.require_tensorrt:
        try:
            T.check_available()
        except T.TensorRTUnavailableError as exc:
            what = "TensorRT not installed" if "not installed" in str(exc) else "no CUDA device visible"
            print(f"{what}: not verified", file=sys.stderr)
            return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="qfold-trt-check-"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "onnxruntime": ort.__version__, "cuda": torch.cuda.is_available(), "out": str(out)}

    labels = fq = ort_engine_path = None
    if args.onnx:
        onnx_path = args.onnx
        shape = [d.dim_value or 1 for d in onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(0).uniform(-1, 1, [256, *shape[1:]]).astype(np.float32)
        report["model"] = str(onnx_path)
    else:
        log(f"running qfold.pipeline.run_ptq on the '{args.model}' example into {out} ...")
        onnx_path, x, labels, fq, ort_engine_path, info = pipeline_model(args.model, out)
        report.update(info)
        log(f"run_ptq done in {info['ptq_s']} s; pipeline top-1: {info['pipeline_accuracy']}")
    report["onnx"] = str(onnx_path)

    # ------------------------------------------------------------------ CPU half: ONNX Runtime
    literal = ort_run(onnx_path, x, literal=True)  # Q/DQ executed literally: the fake-quant arithmetic
    qdq16_path = out / "model_qdq.fp16.onnx"  # what the FP16-fallback engine parses
    onnx.save(convert_float_to_fp16(onnx.load(str(onnx_path)), keep_io_types=True), str(qdq16_path))
    cpu_out = {
        "ort_qdq_literal": literal,
        "ort_int8_kernels": ort_run(onnx_path, x, literal=False),
        "ort_qdq_fp16_fallback": ort_run(qdq16_path, x, literal=True),
    }
    if ort_engine_path is not None:
        cpu_out["ort_pipeline_engine"] = get_backend("onnxruntime").load(ort_engine_path, EngineConfig()).run(x)
    refs = {"torch_fake_quant": fq} if fq is not None else {}
    refs["ort_qdq_literal"] = literal
    report["cpu"] = {
        name: {ref: compare(y, r, labels) for ref, r in refs.items() if ref != name} for name, y in cpu_out.items()
    }
    print_table("CPU run (ONNX Runtime)", report["cpu"])
    if fq is not None:
        report["torch_fake_quant_accuracy"] = float((fq.argmax(-1) == labels).mean())
        log(f"torch fake-quant accuracy: {report['torch_fake_quant_accuracy']:.4f}")

    # ------------------------------------------------------------------ GPU half: TensorRT
    try:
        T.import_tensorrt()
    except T.TensorRTUnavailableError as exc:
        log(f"TensorRT not installed (or no CUDA device): CPU half only, no engine built. {exc}")
        report["tensorrt"] = {"available": False, "reason": str(exc)}
        report["wall_s"] = round(time.perf_counter() - t_start, 2)
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0

    import tensorrt

    report["tensorrt"] = {"available": True, "version": tensorrt.__version__, "gpu": torch.cuda.get_device_name()}
    float_path = out / "float.fp16.onnx"  # FP16 without Q/DQ: the speed baseline
    onnx.save(convert_float_to_fp16(strip_qdq(onnx.load(str(onnx_path)))), str(float_path))
    cfg = EngineConfig(backend="tensorrt", batch_min=1, batch_opt=args.batch, batch_max=max(args.batch, 256))
    builds = {
        "int8_fp32_fallback": (onnx_path, cfg),
        "int8_fp16_fallback": (onnx_path, dataclasses.replace(cfg, fp16_fallback=True)),
        "fp16_no_qdq": (float_path, cfg),
    }
    engines: dict[str, dict] = {}
    problems: list[str] = []
    shape = (args.batch, *x.shape[1:])
    for name, (src, c) in builds.items():
        t0 = time.perf_counter()
        plan = out / f"{name}.plan"
        try:
            info = T.BACKEND.build(src, plan, c)
            engine = T.BACKEND.load(plan, c)
        except (ValueError, T.EngineBuildError) as exc:  # e.g. an unsupported fallback on this TensorRT
            log(f"{name}: build failed: {exc}")
            engines[name] = {"error": f"{type(exc).__name__}: {exc}"}
            problems.append(f"{name} did not build")
            continue
        (out / f"{name}.inspector.json").write_text(engine.engine_information(args.batch))
        y = engine.run(x)
        trt_refs = {**refs, "ort_int8_kernels": cpu_out["ort_int8_kernels"]}
        engines[name] = {
            "build_s": round(time.perf_counter() - t0, 2),
            "layers": info.extra["layers"],
            "tf32": info.extra.get("tf32"),
            "vs": {ref: compare(y, r, labels) for ref, r in trt_refs.items()},
            "ms_per_batch": time_engine(engine, shape, args.iters, args.repeats),
            "trtexec": trtexec_time(plan, engine.input_name, shape, out / f"{name}.trtexec.log"),
        }
        layers = engines[name]["layers"]
        if "error" in layers:
            problems.append(f"{name}: no layer summary ({layers['error']})")
        elif name.startswith("int8") and layers.get("int8", 0) < 1:
            problems.append(f"{name} has no INT8 layer")
        agree = engines[name]["vs"].get("torch_fake_quant", {}).get("top1_agreement")
        if name.startswith("int8") and agree is not None and not agree >= args.min_agreement:
            problems.append(f"{name} agrees with the fake-quant model on {agree:.4f} < {args.min_agreement} of top-1")
    report["tensorrt"]["engines"] = engines
    ok = {k: e for k, e in engines.items() if "error" not in e}
    print_table(f"TensorRT engine ({report['tensorrt']['gpu']})", {k: e["vs"] for k, e in ok.items()})
    log(f"\n| engine (TensorRT {tensorrt.__version__}, batch {args.batch}) | INT8 layers | float layers (FP16/FP32) "
        f"| ms/batch, events on the engine stream ({args.iters} enqueues, median of {args.repeats}) "
        "| ms/batch, trtexec GPU compute median |")
    log("|---|---|---|---|---|")
    for name, e in ok.items():
        lp = e["layers"]
        te = e["trtexec"]
        te_text = f"{te['median_ms']:.3f}" if "median_ms" in te else te.get("skipped") or te.get("error", "-")
        if "error" in lp:
            log(f"| {name} | ? | ? | {e['ms_per_batch']:.3f} | {te_text} |")
            continue
        log(f"| {name} | {lp['int8']} | {len(lp['float_layers'])} ({lp['fp16']}/{lp['fp32']}) | "
            f"{e['ms_per_batch']:.3f} | {te_text} |")
    for name, e in ok.items():
        if "error" not in e["layers"]:
            log(f"{name} float layers: {', '.join(e['layers']['float_layers']) or '(none)'}")
    base = ok.get("fp16_no_qdq", {}).get("ms_per_batch")
    if base:
        report["tensorrt"]["speedup_vs_fp16"] = {k: round(base / e["ms_per_batch"], 3) for k, e in ok.items() if k != "fp16_no_qdq"}
        log(f"speed-up vs FP16 (no Q/DQ): {report['tensorrt']['speedup_vs_fp16']}")
    report["problems"] = problems
    report["verified"] = not problems
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    print(json.dumps(report, indent=2, sort_keys=True))
    if problems:
        log("NOT VERIFIED: " + "; ".join(problems))
        return 1
    log(f"VERIFIED: INT8 and FP16 engines built with TensorRT {tensorrt.__version__}, run, compared with the "
        "fake-quant model, latencies above")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
