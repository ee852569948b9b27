"""Small fake-quant CNNs built from the exact torch ops qfold's placement emits (test and benchmark fixtures).

Activation quant points: ``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)``
with ``scale = amax / 127`` (0-d float32 buffer) and an int32 0-d zero point; weights:
``torch.fake_quantize_per_channel_affine(w, scale, zeros, axis, -128, 127)`` (axis 0 Conv/Linear,
1 ConvTranspose). Placement follows TensorRT: Q/DQ on weighted-layer inputs, residual skip inputs
and linear-bottleneck outputs; none between conv and ReLU; one scale across a Concat's inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ActQ(nn.Module):
    """Per-tensor int8 fake quant; ``observing`` records amax instead (max calibration)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0 / 127))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("amax", torch.tensor(0.0))
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.amax = torch.maximum(self.amax, x.detach().abs().max())
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, -128, 127)

    def freeze(self) -> None:
        self.scale = (torch.clamp(self.amax, min=2.0**-100) / 127).float()


def _wq(w: torch.Tensor, axis: int) -> torch.Tensor:
    dims = [d for d in range(w.dim()) if d != axis]
    scale = (w.detach().abs().amax(dim=dims).clamp_min(2.0**-100) / 127).float()
    zp = torch.zeros(w.shape[axis], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, axis, -128, 127)


class QConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _wq(self.weight, 0), self.bias)


class QConvT(nn.ConvTranspose2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, _wq(self.weight, 1), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


class QLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _wq(self.weight, 0), self.bias)


class BasicBlock(nn.Module):
    """ResNet basic block; the input arrives already quantized (``x_q``), the skip uses it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = QConv(cin, cout, 3, stride, 1)
        self.q_mid = ActQ()
        self.conv2 = QConv(cout, cout, 3, 1, 1)
        self.down = QConv(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.q_down = ActQ() if self.down is not None else None
        self.q_out = ActQ()

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.q_mid(F.relu(self.conv1(x_q))))
        skip = x_q if self.down is None else self.q_down(self.down(x_q))
        return self.q_out(F.relu(y + skip))


class ResNetish(nn.Module):
    """Stem, basic blocks (one with a projection shortcut), GAP, Linear head."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10, in_ch: int = 3) -> None:
        super().__init__()
        self.q_in = ActQ()
        self.stem = QConv(in_ch, width, 3, 1, 1)
        self.q_stem = ActQ()
        layers, c = [], width
        for stage in range(2):
            for b in range(blocks):
                cout = width * (2**stage)
                layers.append(BasicBlock(c, cout, 2 if (stage > 0 and b == 0) else 1))
                c = cout
        self.layers = nn.Sequential(*layers)
        self.q_fc = ActQ()
        self.fc = QLinear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_stem(F.relu(self.stem(self.q_in(x))))
        x = self.layers(x)
        return self.fc(self.q_fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class Mixed(nn.Module):
    """One of each: ReLU6 (Clip), MaxPool, depthwise conv, linear bottleneck, Concat, ConvTranspose."""

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.q_in = ActQ()
        self.stem = QConv(3, c, 3, 1, 1)
        self.q_stem = ActQ()
        self.dw = QConv(c, c, 3, 1, 1, groups=c)
        self.q_dw = ActQ()
        self.project = QConv(c, c, 1)  # linear bottleneck: its output feeds the next conv
        self.q_project = ActQ()
        self.branch_a = QConv(c, c, 1)
        self.branch_b = QConv(c, c, 3, 1, 1)
        self.q_cat = ActQ()  # shared by both concat inputs
        self.up = QConvT(2 * c, c, 2, stride=2)
        self.q_up = ActQ()
        self.fc = QLinear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_stem(F.max_pool2d(F.relu6(self.stem(self.q_in(x))), 2))
        x = self.q_dw(F.relu6(self.dw(x)))
        x = self.q_project(self.project(x))
        cat = torch.cat([self.q_cat(F.relu(self.branch_a(x))), self.q_cat(F.relu(self.branch_b(x)))], 1)
        x = F.relu(self.up(cat))
        return self.fc(self.q_up(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Max-calibrate every ActQ of ``model`` (in place) on ``x`` and return it in eval mode."""
    model.eval()
    quants = [m for m in model.modules() if isinstance(m, ActQ)]
    for q in quants:
        q.observing = True
    try:
        model(x)
    finally:
        for q in quants:
            q.observing = False
    for q in quants:
        q.freeze()
    return model
