"""Small models for the qfold tests (importable by any test): BN variants, ResNet- and DenseNet-style nets.

Nothing here downloads weights: BatchNorm statistics are set by :func:`randomize_bn` (realistic
means/variances, gammas of both signs and some exact zeros) or from data by :func:`calibrate_bn`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like module realistic statistics, in place; returns ``model``.

    mean ~ N(0, 1), var ~ exp(U(-3, 1.5)) (0.05 .. 4.5), gamma ~ N(0, 1) with every 5th channel
    exactly 0, beta ~ N(0, 0.5).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        names = ("mu", "sigma2", "gamma", "beta") if isinstance(m, FunctionalBN) else _STAT_NAMES
        mean, var, gamma, beta = (getattr(m, a, None) for a in names)
        if not isinstance(m, (_BatchNorm, FrozenBatchNorm2d, FunctionalBN)) or mean is None:
            continue
        n, dt = mean.numel(), mean.dtype
        with torch.no_grad():
            mean.copy_(torch.randn(n, generator=gen).to(dt))
            var.copy_(torch.exp(torch.empty(n).uniform_(-3, 1.5, generator=gen)).to(dt))
            if gamma is not None:
                g = torch.randn(n, generator=gen)
                g[::5] = 0.0
                gamma.copy_(g.to(dt))
                beta.copy_((0.5 * torch.randn(n, generator=gen)).to(dt))
    return model


_STAT_NAMES = ("running_mean", "running_var", "weight", "bias")


@torch.no_grad()
def calibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set BatchNorm running statistics from data (cumulative average over ``batches``); returns ``model`` in eval mode."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x in batches:
        model(x)
    return model.eval()


class FrozenBatchNorm2d(nn.Module):
    """A BatchNorm with frozen statistics held as buffers (the torchvision recipe, written from its description)."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class FunctionalBN(nn.Module):
    """A BatchNorm written as ``F.batch_norm`` on the module's own, unconventionally named tensors.

    The names (``mu``, ``sigma2``, ``gamma``, ``beta``) keep it from looking like a frozen BatchNorm,
    so the fold meets it as an ``F.batch_norm`` call in the traced graph.
    """

    def __init__(self, n: int, eps: float = 1e-3, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(n)) if affine else None
        self.beta = nn.Parameter(torch.zeros(n)) if affine else None
        self.register_buffer("mu", torch.zeros(n))
        self.register_buffer("sigma2", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mu, self.sigma2, self.gamma, self.beta, self.training, 0.1, self.eps)


class RootFunctionalBN(nn.Module):
    """Conv whose BatchNorm is an ``F.batch_norm`` call in the root's own forward, on root-level buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.register_buffer("mu", torch.randn(6))
        self.register_buffer("sigma2", torch.rand(6) + 0.5)
        self.gamma = nn.Parameter(torch.randn(6))
        self.beta = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mu, self.sigma2, self.gamma, self.beta, False, 0.1, 1e-4)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn (+ optional conv-bn downsample) + add, relu."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNetStyle(nn.Module):
    """A tiny ResNet: stem, two basic blocks (one downsampling), pooled Linear + BatchNorm1d head."""

    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, n_classes)
        self.head_bn = nn.BatchNorm1d(n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head_bn(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class DenseLayer(nn.Module):
    """DenseNet bottleneck layer: cat -> bn-relu-conv1x1 -> bn-relu-conv3x3."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(feats, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNetStyle(nn.Module):
    """A tiny DenseNet: stem, a 2-layer dense block, a transition (BN -> 1x1 conv, BN before a padded conv), head."""

    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.layer1 = DenseLayer(8, growth)
        self.layer2 = DenseLayer(8 + growth, growth)
        c = 8 + 2 * growth
        self.trans_norm = nn.BatchNorm2d(c)  # BN -> 1x1 conv without padding: folds forward
        self.trans_conv = nn.Conv2d(c, 8, 1)
        self.pre_norm = nn.BatchNorm2d(8)  # BN -> padded 3x3 conv: must be left
        self.pre_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm5 = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm0(self.conv0(x)))
        feats = [x]
        feats.append(self.layer1(feats))
        feats.append(self.layer2(feats))
        x = F.avg_pool2d(self.trans_conv(self.trans_norm(torch.cat(feats, 1))), 2)
        x = self.pre_conv(self.pre_norm(x))
        x = F.relu(self.norm5(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Untraceable(nn.Module):
    """A root whose forward branches on data; its children hold foldable chains and a direct conv/bn pair."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = BasicBlock(4, 4)
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.features(x))
        if x.mean() > 0:  # data-dependent control flow: fx cannot trace this forward
            x = x * 2
        return self.bn(self.conv(x))


class Gate(nn.Module):
    """A submodule fx cannot trace (branches on data)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class UntraceableChild(nn.Module):
    """A traceable root with one untraceable child that itself holds a conv -> bn chain in an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gated = nn.Sequential(Gate(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(self.bn(self.conv(x)))


class LinearBN3d(nn.Module):
    """Linear over the last dim of (N, L, F), then BatchNorm1d over the features via transpose(1, 2)."""

    def __init__(self, f_in: int = 6, f_out: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(f_in, f_out)
        self.bn = nn.BatchNorm1d(f_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2)


def bn_modules(model: nn.Module) -> list[str]:
    """Names of the BatchNorm-like modules still in ``model``."""
    kinds = (_BatchNorm, FrozenBatchNorm2d, FunctionalBN)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` in float64 (relative to the output's scale, not elementwise)."""
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
