"""Int8 output SQNR of a RepVGG-like network: train-time branches vs the re-parameterized conv stack.

    python tools/bench_reparam.py            # trains ~30 s on 1 thread, prints a markdown table
    python tools/bench_reparam.py --epochs 2 # quicker, noisier

A RepVGG-A0 layout (blocks 1-2-4-14-1, widths 48-48-96-192-1280 scaled by 1/4) is trained in its
train-time form (3x3 conv-BN + 1x1 conv-BN + identity BN per block) on sklearn digits upsampled to
32x32, then merged with ``qfold.reparameterize`` into 22 conv-ReLU layers. Both forms are
fake-quantized the way a TensorRT int8 engine computes (``calib.spec``: scale = amax/127, round half
to even, clamp [-128, 127], zero point 0):

* weights per output channel, amax = ``calib.weight_amax`` (max |w|). Train-time form: each branch
  conv with its own BN folded in is quantized separately (the identity-BN branch stays an exact
  per-channel affine). Merged form: the one merged kernel is quantized.
* activations per tensor at every block / linear input, amax from ``calib.observe`` histograms with
  each ``calib.CalibMethod``; both forms use the same amax (their activations are the same tensors).

Output SQNR (``qfold.report.metrics.sqnr_db``, dB, higher is better) is measured on the test-split logits
against the FP32 train-time network. The weight statistics column gives, per layer, the mean over
output channels of ``amax / rms`` (how far the largest tap stands out: the int8 step is amax/127,
so a peaky channel spends its levels on one tap) and the weight-only SQNR of the quantized kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from calib import CalibMethod, HistogramObserver, observe, weight_amax
from calib.spec import scale_from_amax_torch
from qfold.reparam import formulas as rm
from qfold.reparam.passes import reparameterize
from qfold.report.metrics import sqnr_db

METHODS = [CalibMethod("max"), CalibMethod("percentile", percentile=99.99), CalibMethod("entropy"), CalibMethod("mse")]


# ---- the train-time network -------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    def __init__(self, ci: int, co: int, stride: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co))
        self.one = nn.Sequential(nn.Conv2d(ci, co, 1, stride, 0, bias=False), nn.BatchNorm2d(co))
        self.identity = nn.BatchNorm2d(ci) if ci == co and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


def repvgg_a0_like(in_ch: int = 1, width: float = 0.25, classes: int = 10) -> nn.Sequential:
    widths = [int(w * width) for w in (48, 48, 96, 192, 1280)]
    blocks: list[nn.Module] = []
    ci = in_ch
    for w, d in zip(widths, [1, 2, 4, 14, 1]):
        for i in range(d):
            blocks.append(RepVGGBlock(ci, w, 2 if i == 0 else 1))
            ci = w
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ci, classes))


def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * ((len(y) + 63) // 64))
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# ---- fake quantization ------------------------------------------------------------------------


def fq_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel int8 fake quant with amax = max |w| (calib.weight_amax)."""
    scale = scale_from_amax_torch(weight_amax(w, 0).double()).float()
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -128, 127)


def fq_act(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = float(scale_from_amax_torch(torch.tensor(amax, dtype=torch.float64)))
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)


def branch_folded(model: nn.Sequential) -> nn.Sequential:
    """Train-time form with each branch's BN folded into its own conv (branches kept apart)."""
    model = copy.deepcopy(model)
    for block in model:
        if not isinstance(block, RepVGGBlock):
            continue
        for name in ("dense", "one"):
            conv, bn = getattr(block, name)
            w, b = rm.fold_bn_into_branch(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
            new.weight.data, new.bias.data = w.float(), b.float()
            setattr(block, name, new)
    return model


def quant_inputs(model: nn.Module) -> list[str]:
    """Names of the modules whose input is an int8 activation: each block (or merged conv) and the head."""
    if isinstance(model, fx.GraphModule):  # the merged form: the convs the graph calls, in order
        return [n.target for n in model.graph.nodes if n.op == "call_module"
                and isinstance(model.get_submodule(n.target), (nn.Conv2d, nn.Linear))]
    return [n for n, m in model.named_children() if isinstance(m, (RepVGGBlock, nn.Linear))]


@contextlib.contextmanager
def fake_quantized(model: nn.Module, amax: list[float] | None) -> Iterator[nn.Module]:
    """A copy of ``model`` with int8 weights (every conv/linear) and, if ``amax`` is given, int8 inputs."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(fq_weight(m.weight))
    handles = []
    try:
        if amax is not None:
            for name, a in zip(quant_inputs(q), amax, strict=True):
                hook = lambda _m, args, a=a: (fq_act(args[0], a),)  # noqa: E731
                handles.append(q.get_submodule(name).register_forward_pre_hook(hook))
        yield q
    finally:
        for h in handles:
            h.remove()


def weight_stats(model: nn.Module) -> tuple[float, float]:
    """Mean over conv layers of (mean over channels of amax/rms) and of the weight-only SQNR."""
    peak, snr = [], []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            w = m.weight.detach().flatten(1)
            peak.append(float((w.abs().amax(1) / w.pow(2).mean(1).sqrt().clamp_min(1e-30)).mean()))
            snr.append(sqnr_db(m.weight.detach().numpy(), fq_weight(m.weight.detach()).numpy()))
    return float(np.mean(peak)), float(np.mean(snr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = digits()
    net = train(repvgg_a0_like(), xtr, ytr, args.epochs)
    merged, report = reparameterize(net)
    assert len(report.merged) == 22 and not report.left, str(report)
    forms = {"train-time (per-branch weights)": branch_folded(net), "merged (qfold.reparameterize)": merged}
    with torch.no_grad():
        ref = net(xte)
        acc_fp32 = float((ref.argmax(1) == yte).float().mean())
        calib_x = xtr[:512]
        names = quant_inputs(merged)
        with observe(merged, names, observer_factory=lambda: HistogramObserver(2048)) as obs:
            for i in range(0, len(calib_x), 128):
                merged(calib_x[i : i + 128])
        rows = []
        for form, model in forms.items():
            peak, wsnr = weight_stats(model)
            fp = model(xte)
            cases: list[tuple[str, list[float] | None]] = [("weights only", None)]
            cases += [(m.name if m.name != "percentile" else f"percentile {m.percentile}", [obs[n].compute_amax(m) for n in names]) for m in METHODS]
            for label, amax in cases:
                with fake_quantized(model, amax) as q:
                    out = q(xte)
                rows.append((form, label, sqnr_db(ref.numpy(), out.numpy()), float((out.argmax(1) == yte).float().mean()), peak, wsnr))
            rows.append((form, "fp32 (no quantization)", sqnr_db(ref.numpy(), fp.numpy()), float((fp.argmax(1) == yte).float().mean()), peak, wsnr))
    print(f"RepVGG-A0-like (width 1/4, 22 blocks), sklearn digits 32x32, {args.epochs} epochs; FP32 top-1 {acc_fp32:.4f} "
          f"on {len(yte)} test images; calibration 512 train images; {time.perf_counter() - t0:.0f} s\n")
    print("| form | int8 activations (amax method) | output SQNR dB | top-1 | conv amax/rms | weight SQNR dB |")
    print("|---|---|---:|---:|---:|---:|")
    for form, label, s, acc, peak, wsnr in rows:
        print(f"| {form} | {label} | {s:.2f} | {acc:.4f} | {peak:.2f} | {wsnr:.2f} |")


if __name__ == "__main__":
    main()
