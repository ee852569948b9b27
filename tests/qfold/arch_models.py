"""Look-alikes of third-party architecture pieces that torch.fx-based passes stumble on.

Written for the qfold tests from the behaviour of timm / segmentation_models_pytorch layers (no
dependency on those packages): a BatchNorm2d subclass whose forward calls ``F.batch_norm``, dropout
and an activation and asserts on ``x.ndim`` (timm's ``BatchNormAct2d``); its frozen variant with
buffers and children; a TensorFlow-"same" padding conv computing its padding from ``x.size()``; a
squeeze-excitation block with a hard-sigmoid gate; a mixed-kernel grouped conv; LeViT's
``Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as``; and a segmentation model whose forward
checks the input size against a property of its encoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d + dropout + activation in one module, forward written out with F.batch_norm."""

    def __init__(self, n: int, act_layer: type[nn.Module] | None = nn.ReLU, drop: float = 0.0) -> None:
        super().__init__(n)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, factor, self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class FrozenBatchNormAct2d(nn.Module):
    """Frozen statistics as buffers (no num_batches_tracked), then dropout and activation children."""

    def __init__(self, n: int, act_layer: type[nn.Module] = nn.ReLU, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        x = x * scale + (b - rm * scale)
        return self.act(self.drop(x))


def _same_pad(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding, computed in Python from the input size at every call."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__(c_in, c_out, k, stride, 0, 1, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        ph = _same_pad(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = _same_pad(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class SqueezeExcite(nn.Module):
    """SE gate: mean over space, 1x1 reduce, ReLU, 1x1 expand, hard-sigmoid, multiply."""

    def __init__(self, c: int, rd: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, rd, 1)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(rd, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(s))))


class MixedConv2d(nn.ModuleDict):
    """Channels split into groups, each with its own depthwise kernel size (MixNet)."""

    def __init__(self, c: int, kernels: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        self.splits = [c // len(kernels)] * (len(kernels) - 1)
        self.splits.append(c - sum(self.splits))
        for i, (k, ch) in enumerate(zip(kernels, self.splits)):
            self.add_module(str(i), nn.Conv2d(ch, ch, k, padding=k // 2, groups=ch, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.cat([c(parts[i]) for i, c in enumerate(self.values())], 1)


class EffNetLike(nn.Module):
    """Stem (same-padding conv) -> BatchNormAct -> inverted residual with SE, hard-swish -> head."""

    def __init__(self, same_pad: bool = True, frozen: bool = False) -> None:
        super().__init__()
        norm = FrozenBatchNormAct2d if frozen else BatchNormAct2d
        self.conv_stem = Conv2dSame(3, 16, 3, stride=2, bias=False) if same_pad else nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = norm(16)
        self.conv_pw = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = norm(32, nn.Hardswish)
        self.conv_dw = MixedConv2d(32)
        self.bn3 = norm(32, nn.Hardswish)
        self.se = SqueezeExcite(32, 8)
        self.conv_pwl = nn.Conv2d(32, 16, 1, bias=False)
        self.bn4 = BatchNormAct2d(16, None) if not frozen else FrozenBatchNormAct2d(16, nn.Identity)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        shortcut = x
        x = self.bn2(self.conv_pw(x))
        x = self.bn3(self.conv_dw(x))
        x = self.se(x)
        x = self.bn4(self.conv_pwl(x)) + shortcut
        return self.head(x.mean((2, 3)))


class LinearNorm(nn.Module):
    """LeViT: Linear over tokens, BatchNorm1d over the flattened (N*T, C), back to (N, T, C)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTLike(nn.Module):
    """Conv stem to tokens, attention-ish mixing with LinearNorm layers, hard-swish."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.Hardswish())
        self.qkv = LinearNorm(dim, 3 * dim)
        self.proj = LinearNorm(dim, dim)
        self.mlp = nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))
        self.head_bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, 10)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(x).split(self.dim, dim=-1)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(self.dim)).softmax(-1)
        x = x + self.proj(F.hardswish(attn @ v))
        x = x + self.mlp(x)
        return self.head(self.head_bn(x.mean(1)))


class Encoder(nn.Module):
    """A small conv encoder with smp's ``output_stride`` property."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 2
        self._output_stride = 32
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)

    @property
    def output_stride(self) -> int:
        return min(self._output_stride, 2**self._depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SegModel(nn.Module):
    """Encoder + head; forward checks the input size against ``self.encoder.output_stride``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))
        self.name = "seg-like"

    def check_input_shape(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        s = self.encoder.output_stride
        if h % s != 0 or w % s != 0:
            raise RuntimeError(f"input size ({h}, {w}) is not divisible by the output stride {s}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(x)
        y = self.head(self.encoder(x))
        return F.interpolate(y, scale_factor=float(self.encoder.output_stride), mode="nearest")


ARCH_BN_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNormAct2d)
