"""Wall time and peak RSS of qfold's PTQ against ONNX Runtime's quantize_static and torch.ao FX PTQ.

    python tools/bench_ptq_speed.py                                   # resnet18 resnet50 mobilenetv2, 512 images
    python tools/bench_ptq_speed.py --models resnet18 --calib 64 --eval 128 --growth 128 256 512 1024
    python tools/bench_ptq_speed.py --models resnet18 --calib 64 --eval 64 --growth --repeat 4 --baseline /tmp/qfold-before

Every tool sees the same FP32 model (torchvision-style architectures from ``ptq_speed_models``,
seeded random weights, BatchNorm statistics from image-like data) and the same 224x224 images.
Each (tool, model, image count) runs in its own worker process
(``--worker TOOL --model NAME --n N --workdir DIR``); the workers of one model run one after the
other, interleaved, so they see the same machine load. Reported per worker:

- qfold (default configuration, run as the command line runs it: batch sizes measured
  (``qfold.inputs.with_rows``), allocator tuned (``qfold.host``); qfold-nchw: ``channels_last=False``):
  ``calib_s`` = fold, bound, calibrate, calibration table, Q/DQ export and the ORT engine build
  (everything ``run_ptq`` does before the stage report), ``report_s`` = the stage report
  (``evaluate_stages``) on the eval images, ``report_fast_s`` = the same with
  ``eval.stage_samples`` = FAST_STAGE_SAMPLES (``qfold ptq --stage-samples``), ``peak_rss_mib``
  after each part.
- ort-minmax / ort-entropy: FP32 ONNX export + ``quant_pre_process`` + ``quantize_static`` (QDQ,
  per-channel, symmetric int8) as ``calib_s``; ``eval_s`` = one pass of the int8 model over the
  eval images.
- torchao: ``prepare_fx`` + calibration + ``convert_fx`` (x86 qconfig) as ``calib_s``.

``rss_base_mib`` is the RSS after imports, model and data are loaded (copied into anonymous memory,
then the peak is reset: VmHWM); ``calib_rise_mib`` is the calibration's peak above it (the part
that may not grow with the number of images).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TOOLS = ("qfold", "qfold-nchw", "ort-minmax", "ort-entropy", "torchao")
FAST_STAGE_SAMPLES = 100  # the report's speed option: folded, bounded and the layer report on the first 100 eval images


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    """Peak RSS since the last :func:`_reset_peak` (VmHWM), else since the process started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start the peak over from the current RSS (Linux >= 4.0), so loading the data does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def prepare(workdir: Path, model: str, n_max: int, n_eval: int) -> None:
    """Model state and images on disk, shared by every worker of this model."""
    import torch
    from ptq_speed_models import build, images

    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / f"{model}.pt").exists():
        torch.save(build(model).state_dict(), workdir / f"{model}.pt")
    for name, n, seed in (("calib", n_max, 1), ("eval", n_eval, 2)):
        path = workdir / f"{name}_{n}.npy"
        if not path.exists():
            np.save(path, images(n, seed=seed).numpy())


def _load(workdir: Path, model: str, n: int, n_eval: int):
    import torch
    from ptq_speed_models import ARCHS

    m = ARCHS[model]()
    m.load_state_dict(torch.load(workdir / f"{model}.pt"))
    big = max(workdir.glob("calib_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    calib = np.load(big, mmap_mode="r")
    if len(calib) < n:
        raise SystemExit(f"{big} has {len(calib)} images, fewer than {n}")
    # copies in anonymous memory: a slice of the memory map would stay file-backed, and the pages
    # each pass touches would count as the tool's memory growing with the image count
    calib = np.array(calib[:n], copy=True)
    ev = np.array(np.load(workdir / f"eval_{n_eval}.npy"), copy=True)
    return m.eval(), calib, ev


def worker(tool: str, model: str, n: int, n_eval: int, workdir: Path) -> dict:
    import torch

    net, calib, ev = _load(workdir, model, n, n_eval)
    out = workdir / f"{tool}-{model}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    base = _rss_mib()
    _reset_peak()
    res: dict = {"tool": tool, "model": model, "n": n, "n_eval": n_eval, "threads": torch.get_num_threads(), "rss_base_mib": base}
    if tool in ("qfold", "qfold-nchw"):
        from qfold import pipeline as pl
        from qfold.host import tune_allocator

        tune_allocator()  # as the qfold command line does for its own process
        from qfold.config import PTQConfig
        from qfold.fx import channels_last
        from qfold.inputs import with_rows
        from qfold.quant.calibrate import calibration_table
        from qfold.quant.prepare import act_quantizers
        from qfold.report.stages import evaluate_stages

        cfg = PTQConfig(progress=False).replace(eval={"plots": False})
        if tool == "qfold-nchw":
            cfg = dataclasses.replace(cfg, channels_last=False)
        cx, ex = torch.from_numpy(calib), torch.from_numpy(ev)
        t0 = time.perf_counter()
        cfg = with_rows(cfg, net, cx, ex)  # as run_ptq: batch sizes measured where unset
        folded, reports = pl.fold_stage(net, cfg, cx[:2])
        if cfg.channels_last:  # as run_ptq does
            folded = channels_last(folded)
        t_fold = time.perf_counter()
        bounded, pending = pl.bound_stage(folded, cx, cfg, defer_report=True)  # as run_ptq: calibration completes the report
        t_bound = time.perf_counter()
        fq, plan, cres = pl.calibrate_stage(bounded, cx, cfg, bound_report=pending)
        reports["bound"] = pending.report()
        t_cal = time.perf_counter()
        amax = {k: float(q.amax) for k, q in act_quantizers(fq).items()}
        r = pl.PTQResult(folded, bounded, fq, plan, amax, reports)
        calibration_table(fq, cres, cx, net).save_json(out / "calibration.json")
        onnx_path, _ = pl.export_stage(fq, cx[:1], out, cfg, cres=cres)
        engine = pl.build_engine_stage(onnx_path, out, cfg, cx)
        t1 = time.perf_counter()
        res.update(calib_s=t1 - t0, fold_s=t_fold - t0, bound_s=t_bound - t_fold, calibrate_s=t_cal - t_bound,
                   export_build_s=t1 - t_cal, calib_peak_mib=_peak_mib())
        acc = evaluate_stages(net, r, engine, ex, None, cfg)
        t2 = time.perf_counter()
        res.update(report_s=t2 - t1, peak_rss_mib=_peak_mib(), engine_sqnr_db=acc.stages["engine"].sqnr_db,
                   fake_quant_sqnr_db=acc.stages["fake_quant"].sqnr_db)
        if tool == "qfold":
            evaluate_stages(net, r, engine, ex, None, cfg.replace(eval={"stage_samples": FAST_STAGE_SAMPLES}))
            res.update(report_fast_s=time.perf_counter() - t2)
    elif tool.startswith("ort-"):
        import onnxruntime as ort
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
                self.it = iter(range(0, n, 64))

            def get_next(self) -> dict | None:
                i = next(self.it, None)
                return None if i is None else {"input": calib[i : i + 64]}

        t0 = time.perf_counter()
        fp32 = out / "fp32.onnx"
        torch.onnx.export(net, torch.from_numpy(calib[:1]), str(fp32), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
        pre = out / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        t1 = time.perf_counter()
        qpath = out / "int8.onnx"
        quantize_static(str(pre), str(qpath), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method={"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy}[tool],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        t2 = time.perf_counter()
        res.update(calib_s=t2 - t0, export_s=t1 - t0, quantize_s=t2 - t1, calib_peak_mib=_peak_mib())
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(qpath), so, providers=["CPUExecutionProvider"])
        t3 = time.perf_counter()
        for i in range(0, len(ev), 256):
            sess.run(None, {"input": ev[i : i + 256]})
        res.update(eval_s=time.perf_counter() - t3, peak_rss_mib=_peak_mib())
    elif tool == "torchao":
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        x = torch.from_numpy(calib)
        t0 = time.perf_counter()
        with torch.inference_mode():
            prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), example_inputs=(x[:1],))
            for i in range(0, n, 64):
                prepared(x[i : i + 64])
            convert_fx(prepared)
        res.update(calib_s=time.perf_counter() - t0, calib_peak_mib=_peak_mib())
    res["calib_rise_mib"] = res["calib_peak_mib"] - base
    return res


def run_worker(tool: str, model: str, n: int, n_eval: int, workdir: Path, timeout: float, baseline: Path | None = None) -> dict:
    root, script, as_tool = ROOT, __file__, tool
    if tool == "baseline":  # the earlier checkout's own script and package, its qfold worker
        root, as_tool = baseline.resolve(), "qfold"
        script = str(root / "tools" / "bench_ptq_speed.py")
    cmd = [sys.executable, script, "--worker", as_tool, "--model", model, "--n", str(n), "--eval", str(n_eval), "--workdir", str(workdir)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(root)})
    except subprocess.TimeoutExpired:
        return {"tool": tool, "model": model, "n": n, "error": f"timeout after {timeout:.0f} s"}
    line = next((ln for ln in p.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if line is None:
        return {"tool": tool, "model": model, "n": n, "error": (p.stderr or p.stdout)[-600:]}
    return {**json.loads(line[7:]), "tool": tool}


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "fma", "amx")) or f in ("f16c",)]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(sorted(keep))}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenetv2"])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--calib", type=int, default=512, help="calibration images for the tool comparison")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation images for qfold's report and ORT's eval pass")
    ap.add_argument("--growth", type=int, nargs="*", default=[128, 1024], help="image counts for qfold/ort-minmax growth (first model)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qfold_bench_ptq_speed"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "bench_ptq_speed.json")
    ap.add_argument("--repeat", type=int, default=1, help="run every model's workers this many times, interleaved; the summary takes each tool's fastest")
    ap.add_argument("--baseline", type=Path, help="a checkout of an earlier qfold (e.g. `git archive REV | tar -x -C DIR`): its own qfold "
                    "worker runs as tool 'baseline' next to the others, on the same data")
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--n", type=int)
    args = ap.parse_args()
    if args.worker == "prepare":  # in a child too, so no worker inherits this process's peak RSS
        prepare(args.workdir, args.model, args.n, args.eval)
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model, args.n, args.eval, args.workdir)), flush=True)
        return
    rows = []
    n_max = max([args.calib, *args.growth])
    print(cpu_flags(), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for mi, model in enumerate(args.models):
        subprocess.run([sys.executable, __file__, "--worker", "prepare", "--model", model, "--n", str(n_max), "--eval", str(args.eval),
                        "--workdir", str(args.workdir)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        jobs = [(t, args.calib) for t in args.tools]
        if mi == 0:
            jobs += [(t, n) for n in args.growth if n != args.calib for t in ("qfold", "ort-minmax") if t in args.tools]
        if args.baseline is not None:
            jobs.insert(0, ("baseline", args.calib))
        for rep in range(args.repeat):
            for tool, n in jobs:
                r = run_worker(tool, model, n, args.eval, args.workdir, args.timeout, args.baseline)
                r.update(rep=rep, load1=os.getloadavg()[0])
                print(json.dumps(r), flush=True)
                rows.append(r)
            args.out.write_text(json.dumps({"machine": cpu_flags(), "argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")
    print(summary(rows))


def summary(rows: list[dict]) -> str:
    """Markdown: per model and image count, each tool's seconds and qfold's ratios."""
    by: dict = {}
    for r in rows:  # with --repeat, each tool's fastest run (calibration part) per model and image count
        k = (r["model"], r["n"], r["tool"])
        if "error" not in r and (k not in by or r["calib_s"] < by[k]["calib_s"]):
            by[k] = r
    lines = ["| model | images | qfold calib s | ORT MinMax s | ORT Entropy s | torch.ao s | qfold / MinMax | Entropy / qfold | "
             "qfold report s (fast) | ORT eval pass s | total / 2(MinMax+eval) (fast) | qfold calib rise MiB | MinMax rise MiB | "
             "qfold-nchw calib s | baseline calib s | baseline report s |",
             "|" + "---|" * 16]
    for model, n in sorted({(m, n) for m, n, _ in by}):
        g = lambda t, k: by.get((model, n, t), {}).get(k)  # noqa: E731
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        q, mm, en = g("qfold", "calib_s"), g("ort-minmax", "calib_s"), g("ort-entropy", "calib_s")
        rep, fast, evs = g("qfold", "report_s"), g("qfold", "report_fast_s"), g("ort-minmax", "eval_s")
        ratio = lambda r: "-" if None in (q, r, mm, evs) else f"{(q + r) / (2 * (mm + evs)):.2f}"  # noqa: E731
        lines.append(f"| {model} | {n} | {f(q)} | {f(mm)} | {f(en)} | {f(g('torchao', 'calib_s'))} | "
                     f"{'-' if None in (q, mm) else f'{q / mm:.2f}'} | {'-' if None in (q, en) else f'{en / q:.2f}'} | "
                     f"{f(rep)} ({f(fast)}) | {f(evs)} | {ratio(rep)} ({ratio(fast)}) | {f(g('qfold', 'calib_rise_mib'))} | "
                     f"{f(g('ort-minmax', 'calib_rise_mib'))} | {f(g('qfold-nchw', 'calib_s'))} | {f(g('baseline', 'calib_s'))} | {f(g('baseline', 'report_s'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
