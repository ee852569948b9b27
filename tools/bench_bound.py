"""Benchmark ReLU -> ReLU6 bounding: "preserve" vs the literal "swap" against the FP32 model.

    python tools/bench_bound.py                                # prints markdown tables (~10 s)
    python tools/bench_bound.py --out tools/results/bound.md   # also writes them (atomically)

A small residual CNN is trained (seeded, single thread) on ``sklearn.datasets.load_digits`` (1,797
8x8 digits) with raw pixel values 0..16 and no BatchNorm, so its pre-activations routinely exceed 6.
Split: a seed-0 permutation; the last 597 are the test set; 512 of the first 1,200 calibrate.
Every metric below is measured on the held-out test set: top-1 accuracy, top-1 agreement and
output SQNR against the FP32 model, and per ReLU site the fraction of the FP32 pre-activations above
6 and the fraction of each bounded model's ReLU6 inputs above 6 (the values the cap changes).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.atomic import atomic_write_text
from qfold.bound.passes import bound_relu
from qfold.report import metrics as metrics

COMMAND = "python tools/bench_bound.py --out tools/results/bound.md"


class DigitsNet(nn.Module):
    """Stem, one residual block, a downsampling conv, an MLP head: 6 ReLU sites, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.down = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))
        x = F.max_pool2d(x, 2)
        x = F.avg_pool2d(F.relu(self.down(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8)  # raw 0..16: large activations
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> DigitsNet:
    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@contextmanager
def count_above_6(model: nn.Module, types: tuple[type, ...]) -> Iterator[dict[str, list[int]]]:
    """Per module of ``types``: [inputs > 6, inputs]; hooks removed on exit."""
    counts: dict[str, list[int]] = {}
    handles = []

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            c = counts.setdefault(name, [0, 0])
            c[0] += int((args[0] > 6).sum())
            c[1] += args[0].numel()
        return fn

    try:
        for name, m in model.named_modules():
            if type(m) in types:
                handles.append(m.register_forward_pre_hook(hook(name)))
        yield counts
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--quantile", type=float, default=0.9999)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    xtr, ytr, xte, yte = load_data()
    t0 = time.perf_counter()
    model = train(xtr, ytr, args.epochs)
    t_train = time.perf_counter() - t0
    calib = xtr[:512]

    t0 = time.perf_counter()
    preserved, rep_p = bound_relu(model, calib, quantile=args.quantile)
    t_preserve = time.perf_counter() - t0
    swapped, rep_s = bound_relu(model, calib, mode="swap")

    with torch.no_grad():
        ref = model(xte)
        outs = {}
        above = {}
        for name, gm in (("preserve", preserved), ("swap", swapped)):
            with count_above_6(gm, (nn.ReLU6,)) as c:
                outs[name] = gm(xte)
            order = [n for n, _ in gm.named_modules()]  # ReLU6 modules are added in graph order
            above[name] = [c[k] for k in sorted(c, key=order.index)]
        # the FP32 model's own pre-activations > 6 on the test set (the swap report measures them)
        _, rep_test = bound_relu(model, xte, mode="swap")

    rows = ["| model | test top-1 | top-1 agreement vs FP32 | output SQNR vs FP32 | max ReLU6-input >6 fraction |", "|---|---|---|---|---|"]
    rows.append(f"| FP32 (ReLU) | {100 * metrics.topk_accuracy(ref, yte):.2f}% | 100% | inf | - |")
    for name in ("preserve", "swap"):
        o = outs[name]
        worst = max(a / n for a, n in above[name])
        rows.append(
            f"| {name} | {100 * metrics.topk_accuracy(o, yte):.2f}% | {100 * metrics.top1_agreement(ref, o):.2f}% | "
            f"{metrics.sqnr_db(ref, o):.1f} dB | {100 * worst:.3f}% |"
        )
    sites = ["| ReLU site | FP32 pre-activations > 6 | preserve: cap min..max (orig. units) | preserve: ReLU6 inputs > 6 | swap: ReLU6 inputs > 6 |", "|---|---|---|---|---|"]
    for i, s in enumerate(rep_p.sites):
        a_p, a_s = above["preserve"][i], above["swap"][i]
        sites.append(
            f"| {s.name} ({s.mode}{', group ' + str(s.group) if s.group is not None else ''}) | {100 * rep_test.sites[i].above6_fp32:.2f}% | "
            f"{min(s.caps):.2f}..{max(s.caps):.2f} | {100 * a_p[0] / a_p[1]:.3f}% | {100 * a_s[0] / a_s[1]:.2f}% |"
        )
    machine = f"{platform.machine()}, torch {torch.__version__} CPU, 1 thread"
    text = "\n".join(
        [
            "## Bounding ReLU to ReLU6 (issue 3)",
            "",
            f"Command: `{COMMAND}`. Machine: 2-core x86-64 VM, AVX512-VNNI/AMX, torch 2.13 CPU, onnxruntime 1.32 ({machine}).",
            (
                f"Data: sklearn digits, raw 0..16 pixels, {len(xtr)} train / {len(xte)} test, 512 calibration images; "
                f"quantile {args.quantile}; {args.epochs} epochs ({t_train:.1f} s training, {t_preserve:.2f} s for bound_relu preserve)."
            ),
            "",
            *rows,
            "",
            "Per site, on the test set (sites in graph order; same-group sites share one scale, a residual stream):",
            "",
            *sites,
            "",
            (
                f"On the calibration data the report of `bound_relu` gives: preserve SQNR {rep_p.output_sqnr_db:.1f} dB, "
                f"agreement {100 * rep_p.top1_agreement:.2f}%; swap SQNR {rep_s.output_sqnr_db:.1f} dB, agreement {100 * rep_s.top1_agreement:.2f}%."
            ),
            "",
        ]
    )
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
