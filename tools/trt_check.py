#!/usr/bin/env python3
"""One short check of the TensorRT backend on a GPU machine; prints JSON, then a markdown table.

    python tools/trt_check.py                     # built-in digits CNN (trained for a few seconds)
    python tools/trt_check.py --onnx m.qdq.onnx   # any Q/DQ ONNX with one input, dynamic batch
                                                  # (e.g. the example's, from `qfold ptq --example`)

What it does:
  1. gets a Q/DQ ONNX: the built-in model (a small CNN trained on sklearn's digits, max-calibrated,
     exported with torch fake-quant ops, so torch's fake-quant forward is a reference), or --onnx;
  2. references on CPU: ONNX Runtime with graph optimizations off (Q/DQ executed literally: the
     fake-quant arithmetic) and ONNX Runtime with its int8 kernels;
  3. with TensorRT: builds three engines (INT8 with FP32 fallback, INT8 with FP16 fallback, and
     FP16 without Q/DQ), compares their outputs with the references, prints the per-engine layer
     precisions and median latency per batch.
Without TensorRT (or CUDA) it prints "TensorRT not installed", the CPU part, and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.spec import scale_from_amax
from qfold.engine import trt as T
from qfold.engine.base import EngineConfig
from qfold.fp16 import convert_float_to_fp16


class DigitsNet(nn.Module):
    """Conv-ReLU6 x2 -> GAP -> Linear; with ``amax`` set, TensorRT-style fake-quant (per-tensor acts, per-channel weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Linear(32, 10)
        self.amax: dict[str, float] | None = None
        self.seen: dict[str, float] = {}

    def _q(self, x: torch.Tensor, key: str) -> torch.Tensor:
        if self.amax is None:
            self.seen[key] = max(self.seen.get(key, 0.0), float(x.detach().abs().max()))
            return x
        return torch.fake_quantize_per_tensor_affine(x, float(scale_from_amax(self.amax[key])), 0, -128, 127)

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        if self.amax is None:
            return w
        s = torch.from_numpy(scale_from_amax(w.detach().abs().flatten(1).amax(1).numpy()))
        return torch.fake_quantize_per_channel_affine(w, s, torch.zeros(w.shape[0], dtype=torch.int32), 0, -128, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(F.conv2d(self._q(x, "x"), self._w(self.c1.weight), self.c1.bias, padding=1))
        x = F.relu6(F.conv2d(self._q(x, "a1"), self._w(self.c2.weight), self.c2.bias, stride=2, padding=1))
        return F.linear(self._q(x.mean((2, 3)), "gap"), self._w(self.fc.weight), self.fc.bias)


def builtin_model(onnx_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, calibrate and export the built-in model; returns (x_eval, labels, fake-quant logits)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.from_numpy((d.images.astype(np.float32) / 16.0)[:, None])
    y = torch.from_numpy(d.target.astype(np.int64))
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(400):
        idx = torch.randint(0, 1400, (64,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        net.seen = {}
        net(x[:512])  # calibration: max of |activation| over 512 training images
        net.amax = dict(net.seen)
        fq = net(x[1400:]).numpy()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x[:2],), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    onnx_path.write_bytes(buf.getvalue())
    return x[1400:].numpy(), y[1400:].numpy(), fq


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
    out = {
        "max_abs_diff": float(np.abs(y - ref).max()),
        "rel_max_diff": float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12)),
        "argmax_agreement": float((y.argmax(-1) == ref.argmax(-1)).mean()) if y.ndim == 2 else float("nan"),
    }
    if labels is not None:
        out["accuracy"] = float((y.argmax(-1) == labels).mean())
    return out


def time_engine(engine: T.TensorRTEngine, shape: tuple[int, ...], iters: int) -> float:
    """Median milliseconds per batch, CUDA events around each run (inputs already on the GPU)."""
    x = torch.rand(shape, device="cuda")
    for _ in range(10):
        engine.run_torch(x)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        engine.run_torch(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def print_cpu_table(cpu: dict) -> None:
    print("| CPU run (ONNX Runtime) | vs | max abs diff | max diff / output range | argmax agreement | accuracy |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for name, refs in cpu.items():
        for ref, v in refs.items():
            acc = f"{v['accuracy']:.4f}" if "accuracy" in v else "-"
            print(f"| {name} | {ref} | {v['max_abs_diff']:.4g} | {v['rel_max_diff']:.4f} | {v['argmax_agreement']:.4f} "
                  f"| {acc} |", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", type=Path, help="a Q/DQ ONNX with one input whose batch is dynamic")
    ap.add_argument("--out", type=Path, help="folder for the engines (default: a temporary folder)")
    ap.add_argument("--batch", type=int, default=64, help="batch for the latency measurement")
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="qfold-trt-check-"))
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "onnxruntime": ort.__version__, "cuda": torch.cuda.is_available()}

    labels = fq = None
    if args.onnx:
        onnx_path = args.onnx
        shape = [d.dim_value or 1 for d in onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(0).uniform(-1, 1, [256, *shape[1:]]).astype(np.float32)
        report["model"] = str(onnx_path)
    else:
        onnx_path = out / "digits.qdq.onnx"
        x, labels, fq = builtin_model(onnx_path)
        report["model"] = "built-in digits CNN (397 eval images)"
    float_path = out / "float.onnx"
    onnx.save(strip_qdq(onnx.load(str(onnx_path))), str(float_path))
    fp16_path = out / "float.fp16.onnx"
    onnx.save(convert_float_to_fp16(onnx.load(str(float_path))), str(fp16_path))

    literal = ort_run(onnx_path, x, literal=True)
    refs = {"ort_qdq_literal": literal}
    if fq is not None:
        refs["torch_fake_quant"] = fq
    qdq16_path = out / "qdq.fp16.onnx"  # what the FP16-fallback engine parses
    onnx.save(convert_float_to_fp16(onnx.load(str(onnx_path))), str(qdq16_path))
    cpu = {
        "ort_int8_kernels": ort_run(onnx_path, x, literal=False),
        "ort_qdq_fp16_fallback": ort_run(qdq16_path, x, literal=True),
        "ort_float": ort_run(float_path, x, literal=False),
    }
    report["cpu"] = {name: {ref: compare(y, r, labels) for ref, r in refs.items()} for name, y in cpu.items()}
    if fq is not None:
        report["cpu"]["ort_qdq_literal"] = {"torch_fake_quant": compare(literal, fq, labels)}

    print_cpu_table(report["cpu"])
    try:
        T.import_tensorrt()
    except T.TensorRTUnavailableError as exc:
        print(f"TensorRT not installed (or no CUDA device): {exc}", file=sys.stderr)
        report["tensorrt"] = {"available": False, "reason": str(exc)}
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0

    import tensorrt

    report["tensorrt"] = {"available": True, "version": tensorrt.__version__, "gpu": torch.cuda.get_device_name()}
    cfg = EngineConfig(backend="tensorrt", batch_min=1, batch_opt=args.batch, batch_max=max(args.batch, 256))
    builds = {
        "int8_fp32_fallback": (onnx_path, cfg),
        "int8_fp16_fallback": (onnx_path, dataclasses.replace(cfg, fp16_fallback=True)),
        "fp16_no_qdq": (fp16_path, cfg),
    }
    engines = {}
    for name, (src, c) in builds.items():
        t0 = time.perf_counter()
        info = T.BACKEND.build(src, out / f"{name}.plan", c)
        engine = T.BACKEND.load(out / f"{name}.plan", c)
        y = engine.run(x)
        engines[name] = {
            "build_s": round(time.perf_counter() - t0, 2),
            "layers": info.extra["layers"],
            "vs": {ref: compare(y, r, labels) for ref, r in refs.items()},
            "ms_per_batch": time_engine(engine, (args.batch, *x.shape[1:]), args.iters),
        }
    report["tensorrt"]["engines"] = engines
    print(json.dumps(report, indent=2, sort_keys=True))
    print(f"\n| engine ({report['tensorrt']['gpu']}, TensorRT {tensorrt.__version__}, batch {args.batch}) "
          "| INT8 layers | float layers | ms/batch | max diff vs ORT Q/DQ | argmax agreement |")
    print("|---|---|---|---|---|---|")
    for name, e in engines.items():
        v = e["vs"]["ort_qdq_literal"]
        print(f"| {name} | {e['layers']['int8']} | {len(e['layers']['float_layers'])} | {e['ms_per_batch']:.3f} "
              f"| {v['max_abs_diff']:.4g} | {v['argmax_agreement']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
