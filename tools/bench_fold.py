"""Benchmark BatchNorm folding on a ResNet-50-sized network built in code (no torchvision, no downloads).

The network is ResNet-50's layout (bottleneck blocks [3, 4, 6, 3], 53 BatchNorms, 25.6 M
parameters) with random weights. BatchNorm statistics come from data: a few random batches run in
training mode with a cumulative average (``momentum=None``); gammas and betas are then drawn at
random (some negative, some zero) so the fold's scale and shift paths are both exercised.

Measured: fold time (median of ``--repeats``), BatchNorms folded/left, and the max relative error
``max |y_folded - y| / max |y|`` of the folded FP32 model against the unfolded FP32 model, plus both
against a float64 copy of the unfolded model (the truth).

    python tools/bench_fold.py                  # prints a markdown table, writes tools/results/fold.md
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.atomic import atomic_write_text
from qfold.fold.passes import fold_batchnorm


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self, n_classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(c_in, width, stride if i == 0 else 1))
                c_in = 4 * width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def build(seed: int, calib_batches: int, calib_res: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet50()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for _ in range(calib_batches):
        model(torch.randn(8, 3, calib_res, calib_res))
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            g = 1.0 + 0.5 * torch.randn(m.num_features, generator=gen)
            g[::7] = 0.0
            m.weight.copy_(g)
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
    return model.eval()


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).abs().max() / ref.abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--res", type=int, default=128, help="input resolution for the error check")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fold.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build(0, calib_batches=3, calib_res=64)
    n_params = sum(p.numel() for p in model.parameters())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        folded, report = fold_batchnorm(model, strict=True)
        times.append(time.perf_counter() - t0)

    x = torch.randn(args.batch, 3, args.res, args.res, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y, y_fold = model(x), folded(x)
        truth = copy.deepcopy(model).double()(x.double())
    rows = [
        ("network", f"ResNet-50 layout, {n_params / 1e6:.1f} M parameters, {n_bn} BatchNorm2d"),
        ("BatchNorms folded / left", f"{len(report.folded)} / {len(report.left)}"),
        (f"fold time (median of {args.repeats})", f"{statistics.median(times) * 1e3:.0f} ms"),
        ("max rel. error, folded FP32 vs unfolded FP32", f"{max_rel_err(y_fold, y):.2e}"),
        ("max rel. error, unfolded FP32 vs float64 truth", f"{max_rel_err(y, truth):.2e}"),
        ("max rel. error, folded FP32 vs float64 truth", f"{max_rel_err(y_fold, truth):.2e}"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    md = (
        "## BatchNorm folding\n\n"
        "ResNet-50-sized network built in code (`tools/bench_fold.py`), random weights, BatchNorm statistics "
        "from 3 random batches (8x3x64x64) in training mode, random gammas (every 7th zero) and betas. "
        f"Error measured on a {args.batch}x3x{args.res}x{args.res} input; error = max |y - ref| / max |ref|.\n\n"
        + table
        + "\nMachine: 2-core x86-64 VM, AVX512-VNNI/AMX, torch 2.13 CPU, onnxruntime 1.32 "
        f"({platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}, "
        f"{args.threads} thread(s)).\n\n"
        f"Reproduce: `python tools/bench_fold.py --repeats {args.repeats} --res {args.res} --batch {args.batch} "
        f"--threads {args.threads}`\n"
    )
    print(md)
    atomic_write_text(args.out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
