"""Check an ONNX Runtime engine against its fake-quant semantics on this CPU, or on an emulated one.

    python tools/check_cpu_target.py qfold-out                      # this CPU
    python tools/check_cpu_target.py qfold-out --qemu-cpu Haswell   # an AVX2-only x86 CPU, emulated

``qfold-out`` is a folder written by ``qfold ptq --example`` (``model_qdq.onnx``, ``engine.ort.onnx``).
The host part computes the FP32 reference logits with PyTorch; the check itself (numpy, onnx,
onnxruntime, qfold.engine only) runs natively or under ``qemu-x86_64 -cpu MODEL`` (user-mode QEMU;
``apt-get install qemu-user``). QEMU's TCG emulates AVX2 but not AVX512/VNNI, so ONNX Runtime picks
its AVX2 int8 kernels there: the saturation of u8 x s8 kernels is reproduced bit for bit. Emulated
timings mean nothing; only the numbers are compared. CI does not depend on this tool.

Rows (SQNR against the FP32 PyTorch model on the test images; "steps" = max |engine - fake-quant|
in output int8 steps, fake-quant = the Q/DQ ONNX with graph optimizations off):
``fake-quant``        the Q/DQ ONNX as float ops: what was calibrated;
``engine file as is`` the engine's graph in a plain ORT session (no qfold protection);
``qfold load(auto)``  ``OrtBackend().load``: re-rendered for this CPU when needed;
``qfold load(portable)`` u8 x u8 weights forced.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def host(args: argparse.Namespace) -> int:
    import torch

    from qfold.examples import load_data, load_model

    x = load_data("test")[0][: args.n]
    calib = load_data("calib")[0][: args.n]
    with torch.no_grad():
        ref = load_model(args.example)(x).numpy()
    with tempfile.TemporaryDirectory() as d:
        npz = Path(d) / "data.npz"
        np.savez(npz, x=x.numpy(), calib=calib.numpy(), ref=ref)
        cmd = [os.path.realpath(sys.executable), str(Path(__file__).resolve()), "--inner", str(npz), str(args.out)]
        if args.qemu_cpu:
            cmd = ["qemu-x86_64", "-cpu", args.qemu_cpu] + cmd
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        errors = [ln for ln in r.stderr.splitlines() if "TCG doesn't support" not in ln and "CleanUnused" not in ln]
        if errors:
            print("\n".join(errors), file=sys.stderr)
        return r.returncode


def inner(npz: Path, out: Path) -> int:
    import onnx
    import onnxruntime as ort

    from qfold.engine.base import EngineConfig
    from qfold.engine.ort import OrtBackend
    from qfold.engine.ort_check import compare
    from qfold.engine.ort_cpu import detect_cpu
    from qfold.report.metrics import sqnr_db

    data = np.load(npz)
    x, calib, ref = data["x"], data["calib"], data["ref"]

    def session(model: onnx.ModelProto, optimize: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return lambda a: s.run(None, {s.get_inputs()[0].name: a})[0]

    fq = session(onnx.load(str(out / "model_qdq.onnx")), optimize=False)
    rows = [("fake-quant", fq)]
    rows.append(("engine file as is", session(onnx.load(str(out / "engine.ort.onnx")), optimize=True)))
    for target in ("auto", "portable"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng = OrtBackend().load(out / "engine.ort.onnx", EngineConfig(cpu_target=target, intra_op_threads=1))
        note = " (re-rendered, warned)" if caught else ""
        rows.append((f"qfold load({target}): runs as {eng.running_as}{note}", eng.run))
    print(f"CPU: {detect_cpu().describe()}")
    print(f"{len(x)} test images (SQNR vs FP32), {len(calib)} calibration images (steps vs fake-quant)\n")
    print("| engine | SQNR vs FP32 (dB) | max error vs fake-quant (output steps) | self-check |")
    print("|---|---|---|---|")
    for name, fn in rows:
        y = fn(x)
        c = compare(fn, fq, [calib])
        print(f"| {name} | {sqnr_db(ref, y):.2f} | {c.max_err_steps:.2f} | {'pass' if c.passed else 'FAIL'} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", type=Path, help="folder from `qfold ptq --example`")
    p.add_argument("--example", default="resnet", help="the example model the folder was built from")
    p.add_argument("--n", type=int, default=64, help="test and calibration images (keep small under QEMU)")
    p.add_argument("--qemu-cpu", help="run the check under qemu-x86_64 -cpu MODEL (e.g. Haswell: AVX2, no VNNI)")
    p.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.inner:
        return inner(a.inner, Path(rest[0]) if rest else a.out)
    if a.out is None:
        p.error("give the output folder of `qfold ptq --example`")
    return host(a)


if __name__ == "__main__":
    sys.exit(main())
