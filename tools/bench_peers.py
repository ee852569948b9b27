"""The peer side of qfold's benchmark: established int8 PTQ tools on the built-in reference models.

    python tools/bench_peers.py                       # all models x all tools (~10 min on 2 cores)
    python tools/bench_peers.py --quick               # fewer latency runs, 256 test images
    python tools/bench_peers.py --models resnet --tools ort-entropy torchao-x86
    python tools/bench_peers.py --modelopt-python /tmp/modelopt_venv/bin/python   # adds ModelOpt

Every tool sees the same FP32 model, the same 512 calibration images and the same test images
(``qfold.examples``). Each (model, tool) runs in its own worker process
(``python tools/bench_peers.py --worker TOOL --model NAME --workdir DIR``), which calibrates under
:class:`CalibMeter` (wall time, peak RSS and its rise over the RSS before calibration) and then
evaluates the int8 engine against FP32 ONNX Runtime in the same process: top-1, agreement, output
SQNR ``10*log10(sum ref^2 / sum (ref - out)^2)`` over the test logits, median latency at batch 1 and
64 (runs interleaved, so both sides see the same machine load) and how many convs the int8 engine
really runs with int8 kernels (ORT: ``QLinearConv``/``ConvInteger`` nodes in the optimized graph
ORT saves; torch.ao: quantized conv modules).

Add a tool: write ``fn(model_name, calib, test, env) -> dict`` that calls :func:`calibrated` around
its calibration and returns ``{**meter.as_dict(), **evaluate_onnx(...) or evaluate_engine(...)}``,
and register it in ``TOOLS``.

ModelOpt (``nvidia-modelopt[onnx]``) pins onnxruntime-gpu 1.24 and onnx 1.21, so it lives in its own
venv: ``python -m venv --system-site-packages /tmp/modelopt_venv &&
/tmp/modelopt_venv/bin/pip install "nvidia-modelopt[onnx]"``. Its calibration runs there (measured
as a child process); its Q/DQ ONNX is evaluated with this environment's ONNX Runtime like the others.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from calib.atomic import atomic_write_text

MIB = 1024.0  # ru_maxrss is in KiB on Linux


@dataclass(frozen=True)
class BenchEnv:
    """Where a worker finds its inputs and how it measures."""

    workdir: Path
    threads: int = 1
    reps_b1: int = 100
    reps_b64: int = 20
    n_test: int = 1000
    modelopt_python: str | None = None

    def fp32_onnx(self, model_name: str) -> Path:
        return self.workdir / f"{model_name}.fp32.onnx"


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, 1, 28, 28), normalized
    y: np.ndarray  # int64 (N,)


# ---------------------------------------------------------------- metrics (pure)
def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((logits.argmax(1) == labels).mean())


def agreement(ref: np.ndarray, out: np.ndarray) -> float:
    """Fraction of rows where both logit sets pick the same class."""
    return float((ref.argmax(1) == out.argmax(1)).mean())


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """10*log10(sum ref^2 / sum (ref - out)^2) in float64; inf when identical."""
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    noise = float(np.sum((ref - out) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


# ---------------------------------------------------------------- measuring
def _rss_now_kib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def calib_metrics(seconds: float, peak_kib: float, base_kib: float) -> dict[str, float]:
    """The calibration columns: wall seconds, peak RSS and its rise over the RSS at the start (MiB)."""
    return {"calib_s": seconds, "calib_peak_rss_mib": peak_kib / MIB, "calib_delta_rss_mib": (peak_kib - base_kib) / MIB}


class CalibMeter:
    """``with CalibMeter() as m: calibrate()``; ``m.as_dict()`` gives :func:`calib_metrics`.

    The peak is this process's ``ru_maxrss`` after the block; the base is the RSS at entry, so
    ``calib_delta_rss_mib`` is what calibration itself added on top of the loaded libraries and data.
    """

    def __enter__(self) -> CalibMeter:  # noqa: PYI034 (Self needs 3.11)
        self._base = _rss_now_kib()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.peak_kib = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def as_dict(self) -> dict[str, float]:
        return calib_metrics(self.seconds, self.peak_kib, self._base)


def ort_session(path: Path, threads: int, optimized_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    from qfold.engine.ort_cpu import u8s8_saturates

    if u8s8_saturates():  # ORT's documented remedy for its saturating u8 x s8 kernels (no VNNI): u8 x u8
        so.add_session_config_entry("session.x64quantprecision", "1")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(sess) -> Callable[[np.ndarray], np.ndarray]:
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def paired_latency_ms(fp32: Callable, int8: Callable, x: np.ndarray, reps: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms of ``fp32(x)`` and ``int8(x)``, measured alternately so both see the same load."""
    for _ in range(warmup):
        fp32(x), int8(x)
    a, b = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fp32(x)
        t1 = time.perf_counter()
        int8(x)
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return 1e3 * float(np.median(a)), 1e3 * float(np.median(b))


def count_onnx_convs(optimized: Path) -> int:
    """Convs ORT runs with int8 kernels in the graph it saved after optimization."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    return sum(op in ("QLinearConv", "ConvInteger", "NhwcQLinearConv") for op in ops)


def fp32_conv_count(path: Path) -> int:
    import onnx

    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def evaluate_engine(model_name: str, run_int8: Callable[[np.ndarray], np.ndarray], test: Split, env: BenchEnv) -> dict:
    """Accuracy vs FP32 ONNX Runtime and paired latencies for any int8 engine (numpy in, logits out)."""
    fp32 = ort_runner(ort_session(env.fp32_onnx(model_name), env.threads))
    ref = np.concatenate([fp32(test.x[i : i + 100]) for i in range(0, len(test.x), 100)])
    out = np.concatenate([np.asarray(run_int8(test.x[i : i + 100])) for i in range(0, len(test.x), 100)])
    res = {
        "fp32_top1": top1(ref, test.y),
        "int8_top1": top1(out, test.y),
        "agreement": agreement(ref, out),
        "sqnr_db": sqnr_db(ref, out),
        "convs": fp32_conv_count(env.fp32_onnx(model_name)),
    }
    res["drop_pts"] = 100 * (res["fp32_top1"] - res["int8_top1"])
    for b, reps in ((1, env.reps_b1), (64, env.reps_b64)):
        f, q = paired_latency_ms(fp32, run_int8, np.ascontiguousarray(test.x[:b]), reps)
        res[f"fp32_b{b}_ms"], res[f"int8_b{b}_ms"], res[f"speedup_b{b}"] = f, q, f / q
    return res


def evaluate_onnx(model_name: str, int8_onnx: Path, test: Split, env: BenchEnv) -> dict:
    """:func:`evaluate_engine` for a Q/DQ ONNX run by ONNX Runtime, plus its int8 conv count."""
    optimized = int8_onnx.with_suffix(".ortopt.onnx")
    ort_session(int8_onnx, env.threads, optimized)  # writes the optimized graph
    res = evaluate_engine(model_name, ort_runner(ort_session(int8_onnx, env.threads)), test, env)
    res["int8_convs"] = count_onnx_convs(optimized)
    return res


# ---------------------------------------------------------------- tools
def ort_static(method: str) -> Callable[[str, Split, Split, BenchEnv], dict]:
    """onnxruntime.quantization.quantize_static, QDQ, per-channel, symmetric int8 W and A."""

    def run(model_name: str, calib: Split, test: Split, env: BenchEnv) -> dict:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"input": calib.x[i : i + 64]} for i in range(0, len(calib.x), 64)])

            def get_next(self) -> dict | None:
                return next(self.batches, None)

        pre = env.workdir / f"{model_name}.ort-pre.onnx"
        quant_pre_process(str(env.fp32_onnx(model_name)), str(pre))  # ORT's recommended first step
        out = env.workdir / f"{model_name}.ort-{method.lower()}.onnx"
        with CalibMeter() as meter:
            quantize_static(
                str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        return {**meter.as_dict(), **evaluate_onnx(model_name, out, test, env)}

    return run


def torchao_x86(model_name: str, calib: Split, test: Split, env: BenchEnv) -> dict:
    """torch.ao.quantization FX PTQ: prepare_fx / convert_fx with get_default_qconfig_mapping("x86")."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from qfold.examples import load_model

    torch.backends.quantized.engine = "x86"
    model = load_model(model_name)
    x = torch.from_numpy(calib.x)
    with CalibMeter() as meter, torch.inference_mode():
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs=(x[:1],))
        for i in range(0, len(x), 64):
            prepared(x[i : i + 64])
        qmodel = convert_fx(prepared)

    def run(a: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return qmodel(torch.from_numpy(a)).numpy()

    res = evaluate_engine(model_name, run, test, env)
    res["int8_convs"] = sum(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in qmodel.modules())
    return {**meter.as_dict(), **res}


_MODELOPT_CHILD = """
import json, resource, sys, time, numpy as np
from modelopt.onnx.quantization import quantize
src, calib, out, method = sys.argv[1:5]
base = next(float(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:'))
t0 = time.perf_counter()
quantize(src, quantize_mode='int8', calibration_data=np.load(calib), calibration_method=method,
         calibration_eps=['cpu'], high_precision_dtype='fp32', output_path=out)
seconds = time.perf_counter() - t0
print('CHILD ' + json.dumps([seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base]))
"""


def modelopt(method: str) -> Callable[[str, Split, Split, BenchEnv], dict]:
    """NVIDIA Model Optimizer ONNX PTQ (int8, CPU calibration, fp32 high precision) in its own venv.

    Calibration runs in a child process of that venv; the child measures itself after importing
    modelopt, like the other tools' workers do after importing theirs.
    """

    def run(model_name: str, calib: Split, test: Split, env: BenchEnv) -> dict:
        py = env.modelopt_python
        if not py or not Path(py).is_file():
            raise RuntimeError(
                f"skipped: ModelOpt needs its own venv (it pins onnxruntime-gpu 1.24, onnx 1.21); pass --modelopt-python "
                f"(got {py!r}); see the module docstring"
            )
        data = env.workdir / f"{model_name}.calib.npy"
        np.save(data, calib.x)
        out = env.workdir / f"{model_name}.modelopt-{method}.onnx"
        cmd = [py, "-c", _MODELOPT_CHILD, str(env.fp32_onnx(model_name)), str(data), str(out), method]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"modelopt failed: {(proc.stderr or proc.stdout)[-2000:]}")
        seconds, peak_kib, base_kib = json.loads(line[len("CHILD "):])
        return {**calib_metrics(seconds, peak_kib, base_kib), **evaluate_onnx(model_name, out, test, env)}

    return run


def qfold_ptq(method: str) -> Callable[[str, Split, Split, BenchEnv], dict]:
    """qfold itself: fold, bound (preserve), calibrate (``method``), TensorRT-profile export, ORT rendering.

    The timed part is everything from the FP32 model to the built engine file, as for the peers.
    """

    def run(model_name: str, calib: Split, test: Split, env: BenchEnv) -> dict:
        import torch

        from qfold import pipeline as pl
        from qfold.config import PTQConfig
        from qfold.examples import load_model

        cfg = PTQConfig(progress=False).replace(calib={"method": method})
        model, cx = load_model(model_name), torch.from_numpy(calib.x)
        out = env.workdir / f"{model_name}.qfold-{method}"
        out.mkdir(parents=True, exist_ok=True)
        with CalibMeter() as meter:
            folded, _ = pl.fold_stage(model, cfg)
            bounded, _ = pl.bound_stage(folded, cx, cfg)
            fq, _, cres = pl.calibrate_stage(bounded, cx, cfg)
            onnx_path, _ = pl.export_stage(fq, cx[:1], out, cfg, cres=cres)
            engine = pl.build_engine_stage(onnx_path, out, cfg, cx)
        return {**meter.as_dict(), **evaluate_onnx(model_name, out / Path(engine.info.engine_path).name, test, env)}

    return run


TOOLS: dict[str, Callable[[str, Split, Split, BenchEnv], dict]] = {
    "ort-minmax": ort_static("MinMax"),
    "ort-entropy": ort_static("Entropy"),
    "ort-percentile": ort_static("Percentile"),
    "torchao-x86": torchao_x86,
    "modelopt-max": modelopt("max"),
    "modelopt-entropy": modelopt("entropy"),
    "qfold-max": qfold_ptq("max"),
    "qfold-percentile": qfold_ptq("percentile"),
    "qfold-mse": qfold_ptq("mse"),
    "qfold-entropy": qfold_ptq("entropy"),
}


# ---------------------------------------------------------------- driver
def export_fp32(model_name: str, path: Path) -> None:
    """FP32 ONNX (opset 17, dynamic batch, input 'input', output 'logits'), written atomically."""
    import io

    import torch

    from calib.atomic import atomic_write_bytes
    from qfold.examples import load_model

    buf = io.BytesIO()
    torch.onnx.export(load_model(model_name), (torch.zeros(1, 1, 28, 28),), buf, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    atomic_write_bytes(path, buf.getvalue())


def load_splits(n_test: int) -> tuple[Split, Split]:
    from qfold.examples import load_data

    (cx, cy), (tx, ty) = load_data("calib"), load_data("test")
    return Split(cx.numpy(), cy.numpy()), Split(tx[:n_test].numpy(), ty[:n_test].numpy())


def worker(tool: str, model_name: str, env: BenchEnv) -> dict:
    import torch

    torch.set_num_threads(env.threads)
    calib, test = load_splits(env.n_test)
    return TOOLS[tool](model_name, calib, test, env)


COLUMNS = [  # (header, key, format)
    ("FP32 top-1", "fp32_top1", "{:.2%}"), ("int8 top-1", "int8_top1", "{:.2%}"), ("drop pts", "drop_pts", "{:+.2f}"),
    ("agree", "agreement", "{:.2%}"), ("SQNR dB", "sqnr_db", "{:.1f}"), ("calib s", "calib_s", "{:.1f}"),
    ("calib peak RSS MiB", "calib_peak_rss_mib", "{:.0f}"), ("calib ΔRSS MiB", "calib_delta_rss_mib", "{:.0f}"),
    ("b1 FP32/int8 ms", None, None), ("b1 speedup", "speedup_b1", "{:.2f}x"),
    ("b64 FP32/int8 ms", None, None), ("b64 speedup", "speedup_b64", "{:.2f}x"), ("int8 convs", None, None),
]


def markdown_table(results: list[dict]) -> str:
    head = "| model | tool | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['error'][:240]} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for _, key, fmt in COLUMNS:
            if key is not None:
                cells.append(fmt.format(r[key]))
        cells.insert(8, f"{r['fp32_b1_ms']:.2f} / {r['int8_b1_ms']:.2f}")
        cells.insert(10, f"{r['fp32_b64_ms']:.1f} / {r['int8_b64_ms']:.1f}")
        cells.append(f"{r['int8_convs']}/{r['convs']}")
        lines.append(f"| {r['model']} | {r['tool']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import onnxruntime
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx512_vnni", "amx_int8", "avx_vnni") if f in flags]
    return (f"{os.cpu_count()}-core {platform.machine()}, {'/'.join(isa) or 'no VNNI'}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


NOTES = """How each peer is configured, and what limits it here:

- **ort-*** `onnxruntime.quantization.quantize_static`: QDQ, `per_channel=True`, QInt8 activations and weights,
  `ActivationSymmetric`/`WeightSymmetric` True, after `quant_pre_process` (not timed); calibrator options at their
  defaults, as users run them. ORT's Entropy defaults (`num_bins=128`, `num_quantized_bins=128`) leave a single
  candidate window, so its ranges equal MinMax's (identical SQNR rows). Entropy and Percentile keep every
  intermediate activation of all calibration batches in RAM before building histograms (the ΔRSS column).
  ORT's CPU optimizer does not turn every Q/DQ conv into `QLinearConv` (the int8 convs column); the rest run as
  float convs between DequantizeLinear/QuantizeLinear, which is why its int8 engine can be slower than FP32.
- **torchao-x86** `torch.ao.quantization` FX PTQ: `prepare_fx`/`convert_fx` with
  `get_default_qconfig_mapping("x86")` (HistogramObserver activations with `reduce_range`, i.e. 7-bit uint8
  asymmetric; per-channel symmetric int8 weights). torch 2.13 warns "torch.ao.quantization is deprecated and will
  be removed in 2.10" but it still works. Its per-op overhead makes batch 1 slower than FP32 ONNX Runtime; its
  fused int8 conv(+ReLU) kernels win at batch 64.
- **modelopt-*** NVIDIA Model Optimizer ONNX PTQ (`modelopt.onnx.quantization.quantize`, `quantize_mode="int8"`,
  `calibration_eps=["cpu"]`, `high_precision_dtype="fp32"`). `nvidia-modelopt[onnx]` 0.47 pins onnxruntime-gpu
  1.24 and onnx 1.21 (and cupy-cuda12x), so it runs from its own venv (`--modelopt-python`); calibration runs on
  CPU. Its Q/DQ placement targets TensorRT (Q/DQ on the inputs of quantized ops, none after a conv), which ONNX
  Runtime's CPU optimizer does not fuse into `QLinearConv`: its latency here is ORT running a TensorRT-shaped
  graph in float, not ModelOpt's intended engine.
"""


def main(argv: list[str] | None = None) -> int:
    from qfold.examples import MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    p.add_argument("--quick", action="store_true", help="256 test images, 20/5 latency runs")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for ORT and torch (default 1)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qfold-bench-peers"))
    p.add_argument("--modelopt-python", default=os.environ.get("QFOLD_MODELOPT_PYTHON"),
                   help="python of a venv with nvidia-modelopt[onnx] (or env QFOLD_MODELOPT_PYTHON)")
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "peers")
    p.add_argument("--render-only", action="store_true", help="rewrite <out>.md from <out>.json (after merging rows)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    env = BenchEnv(args.workdir, args.threads, 20 if args.quick else 100, 5 if args.quick else 20,
                   256 if args.quick else 1000, args.modelopt_python)

    if args.render_only:
        write_report(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model, env)), flush=True)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for model_name in args.models:
        export_fp32(model_name, env.fp32_onnx(model_name))
        for tool in args.tools:
            cmd = [sys.executable, __file__, "--worker", tool, "--model", model_name, "--workdir", str(args.workdir),
                   "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            if args.modelopt_python:
                cmd += ["--modelopt-python", args.modelopt_python]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            row = {"model": model_name, "tool": tool}
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode == 0 and line:
                row.update(json.loads(line[len("RESULT "):]))
            else:
                err = (proc.stderr or proc.stdout).strip().splitlines()
                row["error"] = err[-1] if err else f"exit code {proc.returncode}"
            results.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)

    report = {"machine": machine(), "threads": env.threads, "n_test": env.n_test, "results": results,
              "command": ("python tools/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()}
    write_report(report, args.out)
    return 0


def render(report: dict) -> str:
    """The BENCHMARKS.md section for a report: reference models, the peer table, the notes."""
    ref_path = ROOT / "qfold" / "examples" / "data" / "reference.json"
    ref = json.loads(ref_path.read_text()) if ref_path.is_file() else {}
    ref_rows = [f"| {k} | {v['params']:,} | {v['test_top1']:.2%} | {v['max_pre_relu_calib']:.1f} | {v['relus_above_6']}/{v['relus']} |"
                for k, v in ref.items()]
    return "\n".join([
        "## Peers: established int8 PTQ tools on the reference models", "",
        f"Machine: {report['machine']}. Command: `{report['command']}`.", "",
        ("Reference models (`qfold.examples`, trained by `python tools/train_reference.py`; 28x28 MNIST, "
         "3,488 train / 512 calibration / 1,000 test images):"), "",
        "| model | params | FP32 test top-1 | max pre-ReLU activation (calib) | ReLUs with inputs > 6 |",
        "|---|---|---|---|---|", *ref_rows, "",
        (f"{report['n_test']} test images, 512 calibration images, {report['threads']} thread(s). "
        "Speedup = FP32 ONNX Runtime latency / int8 latency, medians of interleaved runs in the same process. "
        "ΔRSS = calibration peak RSS minus the RSS just before calibration (libraries and data already loaded). "
        "int8 convs = convs run by int8 kernels (ORT: QLinearConv/ConvInteger after graph optimization; "
         "torch.ao: quantized conv modules) / Conv nodes in the FP32 ONNX."), "",
        markdown_table(report["results"]), "", NOTES,
    ])


def write_report(report: dict, out: Path) -> None:
    """Print the markdown and write ``out``.md and ``out``.json (atomically, mode 0644)."""
    md = render(report)
    print("\n" + md)
    for path, text in ((out.with_suffix(".md"), md), (out.with_suffix(".json"), json.dumps(report, indent=2, sort_keys=True) + "\n")):
        atomic_write_text(path, text)
        path.chmod(0o644)  # mkstemp creates 0600


if __name__ == "__main__":
    raise SystemExit(main())
