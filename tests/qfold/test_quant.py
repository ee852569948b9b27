"""Q/DQ placement on traced graphs and the fake-quant modules it inserts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from calib.spec import QuantSpec, fake_quant_ref
from qfold.capture import trace
from qfold.quant import ActQuant, QuantLayer, plan_quantization, prepare_fake_quant
from qfold.quant.prepare import quant_layers, quantization_disabled


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.down = nn.Conv2d(cin, cout, 1, stride) if stride > 1 else None

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        identity = self.down(x) if self.down is not None else x
        return self.relu(out + identity)


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 1, 1)
        self.act = nn.ReLU()
        self.b1 = Block(8, 8, 1)
        self.b2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.b2(self.b1(self.act(self.stem(x))))), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2: expand, depthwise, linear bottleneck, residual add."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 4 * c, 1)
        self.dw = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c)
        self.project = nn.Conv2d(4 * c, c, 1)
        self.relu = nn.ReLU6()

    def forward(self, x):
        return x + self.project(self.relu(self.dw(self.relu(self.expand(x)))))


class Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.c3 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        h = torch.cat([x, a], 1)
        b = self.c2(h)
        return self.c3(torch.cat([h, b], 1))


def test_resnet_placement_is_skip_only_and_fuses_the_deeper_branch():
    gm = trace(ResNetish().eval())
    plan = plan_quantization(gm)
    assert set(plan.layers) == {"stem", "b1.conv1", "b1.conv2", "b2.conv1", "b2.conv2", "b2.down", "fc"}
    roles = {k: p.role for k, p in plan.points.items()}
    # identity block: the skip (the stem's ReLU output) is quantized for both the conv and the add
    assert roles["act"] == "input" and set(plan.points["act"].consumers) == {"b1_conv1", "add"}
    # downsample block: conv2 (deeper) fuses with the add; the 1x1 downsample output is the quantized skip
    assert roles["b2_down"] == "skip" and plan.points["b2_down"].consumers == ("add_1",)
    assert "b2_conv2" not in plan.points  # the fused branch stays float
    assert plan.layers["fc"].axis == 0


def test_linear_bottleneck_quantizes_the_skip_not_the_projection():
    gm = trace(InvertedResidual().eval())
    plan = plan_quantization(gm)
    assert set(plan.points["x"].consumers) == {"expand", "add"}
    assert "project" not in plan.points  # conv output feeding only the add: fused by TensorRT


def test_concat_members_share_a_scale_group():
    gm = trace(Dense().eval())
    plan = plan_quantization(gm)
    # x is quantized (input of c1) and meets a's output in cat; cat (h) feeds c2 and another cat
    assert plan.groups, plan.to_dict()
    flat = {k for g in plan.groups for k in g}
    assert {"cat", "cat_1"} <= flat


def test_keep_float_patterns_and_unmatched_pattern_error():
    gm = trace(ResNetish().eval())
    plan = plan_quantization(gm, keep_float=("b2.*", "type:Linear"))
    assert "fc" in plan.float_layers and "b2.conv1" in plan.float_layers and "b2.conv1" not in plan.layers
    assert plan.precision_map()["stem"] == "int8"
    with pytest.raises(ValueError, match=r"'nope\.\*' matches no"):
        plan_quantization(gm, keep_float=("nope.*",))
    with pytest.raises(ValueError, match="type:Conv3d"):
        plan_quantization(gm, keep_float=("type:Conv3d",))


def test_prepare_is_float_exact_when_disabled_and_does_not_touch_input():
    model = ResNetish().eval()
    gm = trace(model)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    fq = prepare_fake_quant(gm, plan_quantization(gm))
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert not any(isinstance(m, (ActQuant, QuantLayer)) for m in gm.modules())
    x = torch.randn(3, 1, 12, 12)
    with quantization_disabled(fq):
        torch.testing.assert_close(fq(x), model(x), rtol=0, atol=0)
    assert all(bool(q.enabled) for q in quant_layers(fq).values())  # restored
    with pytest.raises(ValueError, match="already carries qfold quantizers"):
        prepare_fake_quant(fq, plan_quantization(gm))


def test_act_quant_matches_the_numpy_reference_and_zero_amax_is_safe():
    q = ActQuant()
    x = torch.randn(1000) * 3
    q.set_amax(2.5)
    np.testing.assert_allclose(q(x).numpy(), fake_quant_ref(x.numpy(), 2.5), rtol=0, atol=1e-6)
    q.set_amax(0.0)  # a dead activation: it was all zeros during calibration
    assert torch.count_nonzero(q(torch.zeros(10))) == 0
    y = q(x)  # anything else saturates at +-128 * tiny scale, finite
    assert torch.isfinite(y).all() and float(y.abs().max()) < 1e-20


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (nn.Conv2d(4, 6, 3, groups=2, bias=False), (2, 4, 7, 7)),
        (nn.Conv1d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 9)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1), (2, 4, 5, 5)),
        (nn.Conv3d(2, 4, 3), (1, 2, 5, 5, 5)),
        (nn.Linear(7, 3), (4, 7)),
    ],
)
def test_quant_layer_weight_is_per_channel_reference_quantized(layer, x_shape):
    ql = QuantLayer(layer)
    axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    w = layer.weight.detach().numpy()
    dims = tuple(d for d in range(w.ndim) if d != axis)
    ref_w = fake_quant_ref(w, np.abs(w).max(axis=dims), QuantSpec(axis=axis))
    np.testing.assert_allclose(ql.quantized_weight().detach().numpy(), ref_w, rtol=0, atol=1e-7)
    x = torch.randn(*x_shape)
    with torch.no_grad():
        got = ql(x)
    # the quantized layer is the float layer run with the reference-quantized weight
    w_saved = layer.weight.data.clone()
    layer.weight.data = torch.from_numpy(ref_w).float()
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
    layer.weight.data = w_saved
    assert ql.layer.weight is layer.weight  # parameters are shared, not copied
