"""Benchmarks of issue 14: sensitivity cost, calibration "auto" vs the fixed methods, the fallback search.

    python tools/bench_mixed.py sensitivity [--samples 256]      cone re-evaluation vs full re-runs
    python tools/bench_mixed.py calib                            fake-quant output SQNR per method
    python tools/bench_mixed.py fallback [--budgets 0.1 0.3 1.0] [--method max] [--models resnet ...]

Reference models and data: ``qfold.examples`` (512 calibration / 1,000 test MNIST images). One
intra-op thread (the machine is shared); timings are ratios measured in one process.
Prints Markdown tables; ``--out FILE`` also writes them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qfold import pipeline as pl  # noqa: E402
from qfold.budget.sensitivity import layer_sensitivity  # noqa: E402
from qfold.config import PTQConfig  # noqa: E402
from qfold.examples import MODELS, load_data, load_model  # noqa: E402
from qfold.quant.auto import _apply, refine_auto  # noqa: E402
from qfold.quant.prepare import quantizer_name  # noqa: E402
from qfold.report import metrics as metrics  # noqa: E402

CFG = PTQConfig(progress=False).replace(eval={"plots": False, "layer_report": False})


def _prepared(name: str, method: str = "max"):
    cx, _ = load_data("calib")
    model = load_model(name)
    cfg = CFG.replace(calib={"method": method})
    folded, _ = pl.fold_stage(model, cfg, cx[:2])
    bounded, _ = pl.bound_stage(folded, cx, cfg)
    fq, plan, res = pl.calibrate_stage(bounded, cx, cfg)
    return model, bounded, fq, plan, res, cx


def bench_sensitivity(samples: int) -> str:
    tx, ty = load_data("test")
    x, y = tx[:samples], ty[:samples]
    rows = ["| model | layers | graph nodes | cone s | full re-runs s | speed-up | nodes evaluated (cone / full) | same numbers |",
            "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        model, _, fq, plan, _, _ = _prepared(name)
        with torch.no_grad():
            ref = model(x).double().numpy()
        rep = {}
        for method in ("cone", "full"):
            t = time.perf_counter()
            rep[method] = layer_sensitivity(fq, plan, x, y, reference=ref, method=method)
            rep[method].seconds = time.perf_counter() - t
        c, f = rep["cone"], rep["full"]
        same = [(s.name, s.only_quantized, s.only_float) for s in c.layers] == [(s.name, s.only_quantized, s.only_float) for s in f.layers]
        rows.append(f"| {name} | {len(plan.layers)} | {c.graph_nodes} | {c.seconds:.1f} | {f.seconds:.1f} | {f.seconds / c.seconds:.2f}x "
                    f"| {c.meta['evaluated_nodes_per_batch']} / {f.meta['evaluated_nodes_per_batch']} | {'yes' if same else 'NO'} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def bench_calib() -> str:
    tx, _ = load_data("test")
    rows = ["| model | max | percentile | mse | entropy | auto | auto's choices (tensors) | auto check on calib data |", "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        model, _, fq, plan, res, cx = _prepared(name)
        with torch.no_grad():
            ref = model(tx).double()

        def sqnr() -> float:
            with torch.no_grad():
                return metrics.sqnr_db(ref, fq(tx).double())

        out = {}
        for m in ("max", "percentile", "mse", "entropy"):
            amax = res.recompute(m)
            _apply(fq, plan, {k: amax[quantizer_name(k)] for k in plan.points})
            out[m] = sqnr()
        refine_auto(fq, plan, res, cx, CFG.calib.batch_size or 16)
        out["auto"] = sqnr()
        info = res.extra["auto"]
        counts: dict[str, int] = {}
        for t in info["tensors"].values():
            counts[t["method"]] = counts.get(t["method"], 0) + 1
        chk = info["check"]
        rows.append(f"| {name} | " + " | ".join(f"{out[m]:.2f}" for m in ("max", "percentile", "mse", "entropy", "auto"))
                    + f" | {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} | auto {chk['sqnr_db_auto']:.2f} vs max "
                    f"{chk['sqnr_db_max']:.2f} dB: kept {chk['kept']} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def bench_fallback(budgets: list[float], method: str, bound: str, models: list[str]) -> str:
    from qfold.budget.fallback import search_fallback

    tx, ty = load_data("test")
    rows = [f"calib.method = {method}, bound.mode = {bound}", "",
            "| model | budget (pp) | all-int8 drop (pp) | met | drop (pp) | float layers | engine builds | speed vs all-int8 | search s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in models:
        cx, _ = load_data("calib")
        model = load_model(name)
        for b in budgets:
            cfg = CFG.replace(calib={"method": method}, bound={"mode": bound}, eval={"max_drop_pp": b, "fallback": "auto"})
            folded, _ = pl.fold_stage(model, cfg, cx[:2])
            bounded, _ = pl.bound_stage(folded, cx, cfg)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fb = search_fallback(model, bounded, cx, tx, ty, cfg)
            c = fb.steps[fb.chosen]
            rows.append(f"| {name} | {b} | {fb.steps[0].drop_pp:+.2f} | {'yes' if fb.met else 'no'} | {c.drop_pp:+.2f} | "
                        f"{', '.join(c.float_layers) or '-'} | {len(fb.steps)} | {c.speed_vs_int8:.2f}x | {fb.seconds:.1f} |")
            print(rows[-1], flush=True)
            print(fb.to_markdown(), flush=True)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("sensitivity", "calib", "fallback"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--method", default="max")
    ap.add_argument("--bound", default="preserve")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    text = {"sensitivity": lambda: bench_sensitivity(a.samples), "calib": bench_calib,
            "fallback": lambda: bench_fallback(a.budgets, a.method, a.bound, a.models)}[a.what]()
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
