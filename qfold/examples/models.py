"""Three small reference CNNs for 1x28x28 MNIST, all Conv+BN+ReLU, all torch.fx-traceable.

* ``ResNet``: ResNet-style basic blocks with residual adds; stride-2 blocks carry a 1x1 conv+BN
  on the skip (He et al., "Deep Residual Learning", 2015).
* ``MobileNetV2``: inverted residuals with depthwise 3x3 convs and linear bottlenecks (Sandler
  et al., 2018). Trained with plain ReLU: bounding ReLU -> ReLU6 is the toolkit's job.
* ``DenseNet``: pre-activation BN-ReLU-Conv layers whose outputs are concatenated (Huang et al.,
  2017), so BatchNorms sit *before* convs and after concats.

Every activation is its own ``nn.ReLU`` module (never shared), and residual adds are written as
``out + identity`` so that graph passes see them as ``operator.add`` nodes.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity (or 1x1 conv+BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNet(nn.Module):
    """Stem 32@28x28, blocks 32@14, 64@7, 64@7, 128@4; global average pool; linear 128->10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 32, 3), nn.ReLU())
        self.layer1 = BasicBlock(32, 32, stride=2)
        self.layer2 = BasicBlock(32, 64, stride=2)
        self.layer3 = BasicBlock(64, 64, stride=1)
        self.layer4 = BasicBlock(64, 128, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU (skipped at t=1), 3x3 depthwise-BN-ReLU, 1x1 project-BN; add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU()]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res:  # fixed at construction, so fx traces it as a constant branch
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem 32@28x28, inverted residuals (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,2,2) (6,64,2,2),
    1x1 conv to 256, global average pool, linear 256->10."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(1, 32, 3), nn.ReLU()]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [*_conv_bn(cin, 256, 1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(4*growth)-BN-ReLU-Conv3x3(growth); output concatenated to the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(4 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (halves channels) then 2x2 average pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """Stem conv 32@14x14 (stride 2), dense block (4 layers, growth 16) -> 96, transition -> 48@7x7,
    dense block (4 layers, growth 16) -> 112, BN-ReLU, global average pool, linear 112->10."""

    def __init__(self, num_classes: int = 10, growth: int = 16, layers: int = 4) -> None:
        super().__init__()
        c = 32
        self.stem = nn.Conv2d(1, c, 3, 2, 1, bias=False)
        block1 = []
        for _ in range(layers):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.trans = Transition(c, c // 2)
        c //= 2
        block2 = []
        for _ in range(layers):
            block2.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*block2)
        self.bn, self.relu = nn.BatchNorm2d(c), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.trans(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(x))), 1))
