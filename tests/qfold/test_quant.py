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


# ----------------------------------------------------------------------------- the inference fast path


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inference_fake_quant_is_the_fused_op_bit_for_bit(layout: str) -> None:
    """calib.spec.fake_quant_inference_torch == torch.fake_quantize_*: random values, exact
    half-step ties, values past the clamp, a zero amax, per tensor and per channel on either axis."""
    from calib.spec import fake_quant_inference_torch, scale_from_amax_torch

    g = torch.Generator().manual_seed(0)
    for amax in (0.0, 1e-3, 0.37, 6.0, 1000.0):
        s = scale_from_amax_torch(torch.tensor(amax))
        k = torch.randint(-300, 300, (4, 8, 5, 5), generator=g).float()
        x = torch.cat([torch.randn(4, 8, 5, 5, generator=g) * 2 * max(amax, 1e-3), (k + 0.5) * s, k * s])
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        want = torch.fake_quantize_per_tensor_affine(x, s, torch.tensor(0, dtype=torch.int32), -128, 127)
        got = fake_quant_inference_torch(x, s)
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        for axis in (0, 1):
            amaxes = torch.rand(x.shape[axis], generator=g) * max(amax, 1e-3)
            amaxes[0] = 0.0  # a dead channel: its values are zero too (past 2**63 steps the fused op's cast overflows)
            x.select(axis, 0).zero_()
            sc = scale_from_amax_torch(amaxes)
            want = torch.fake_quantize_per_channel_affine(x, sc, torch.zeros(x.shape[axis], dtype=torch.int32), axis, -128, 127)
            assert torch.equal(fake_quant_inference_torch(x, sc, axis), want)
    tiny = scale_from_amax_torch(torch.tensor(0.0))  # a nonzero value at a zero amax saturates
    assert float(fake_quant_inference_torch(torch.tensor([1.0, -1.0]), tiny)[0]) == float(127 * tiny)


def test_fake_quant_model_gives_the_same_bits_with_and_without_gradients() -> None:
    """The prepared model under inference_mode (fast path, cached weights) equals its forward with
    autograd on (the fused ops), and a changed weight or weight amax is seen at the next call."""
    torch.manual_seed(0)
    model = ResNetish().eval()
    x = torch.randn(6, 1, 12, 12)
    gm = trace(model)
    fq = prepare_fake_quant(gm, plan_quantization(gm))
    for q in fq.modules():
        if isinstance(q, ActQuant):
            q.set_amax(2.5)
    with torch.enable_grad():
        slow = fq(x.requires_grad_(False)).detach()
    with torch.inference_mode():
        assert torch.equal(fq(x), slow)
        assert torch.equal(fq(x), slow)  # second call: cached weights
    layer = quant_layers(fq)["stem"]
    with torch.no_grad():
        layer.layer.weight.mul_(0.5)
    with torch.enable_grad():
        slow2 = fq(x).detach()
    with torch.inference_mode():
        assert torch.equal(fq(x), slow2) and not torch.equal(slow2, slow)
    with torch.no_grad():
        layer.weight_amax.mul_(3.0)  # coarser weight steps
    with torch.enable_grad():
        slow3 = fq(x).detach()
    with torch.no_grad():
        assert torch.equal(fq(x), slow3) and not torch.equal(slow3, slow2)


def test_export_still_sees_the_fused_ops_after_inference_calls(tmp_path) -> None:
    """An inference call first (weights cached) does not leak the fast path into the ONNX: it has
    QuantizeLinear/DequantizeLinear and no Round."""
    import onnx

    from qfold.config import ExportConfig
    from qfold.onnx import export_onnx

    torch.manual_seed(0)
    gm = trace(ResNetish().eval())
    fq = prepare_fake_quant(gm, plan_quantization(gm))
    for q in fq.modules():
        if isinstance(q, ActQuant):
            q.set_amax(2.5)
    x = torch.randn(2, 1, 12, 12)
    with torch.inference_mode():
        fq(x)
    path = export_onnx(fq, x, tmp_path / "m.onnx", ExportConfig())
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Round" not in ops
