"""Third-party architecture patterns: timm-style BatchNormAct, frozen BN + act, LeViT's LinearNorm,
MixNet's mixed conv, TF-"same" padding (torch.export capture), a segmentation model's shape check
against an encoder property (attributes kept through fold, bound, fake-quant)."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from arch_models import (
    ARCH_BN_TYPES,
    BatchNormAct2d,
    EffNetLike,
    FrozenBatchNormAct2d,
    LeViTLike,
    SegModel,
)
from models import max_rel_err

from qfold.bound.passes import bound_relu
from qfold.capture import capture_info, trace
from qfold.config import PTQConfig
from qfold.errors import UntraceableModelError
from qfold.fold.passes import fold_batchnorm
from qfold.fold.sites import FoldedNormAct
from qfold.pipeline import run_ptq
from qfold.reparam.passes import reparameterize


def _prep(model: nn.Module, seed: int = 0) -> nn.Module:
    """Realistic BN statistics and affine parameters for every BN-like module; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, ARCH_BN_TYPES) and m.running_mean is not None:
            n = m.running_mean.numel()
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.exp(torch.empty(n).uniform_(-2, 1, generator=gen)))
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(0.5 * torch.randn(n, generator=gen))
    return model.eval()


def _bns(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ARCH_BN_TYPES)]


def _same(model: nn.Module, folded: nn.Module, *xs: torch.Tensor, tol: float = 1e-5) -> None:
    with torch.no_grad():
        for x in xs:
            assert max_rel_err(folded(x), model(x)) <= tol


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- BN + activation modules
@pytest.mark.parametrize("frozen", [False, True])
def test_batchnorm_act_folds_and_keeps_its_activation(frozen: bool) -> None:
    model = _prep(EffNetLike(same_pad=False, frozen=frozen))
    folded, report = fold_batchnorm(model)
    kind = "FrozenBatchNormAct2d" if frozen else "BatchNormAct2d"
    assert [(e.bn, e.kind, e.status, e.into) for e in report.entries] == [
        ("bn1", kind, "folded", "conv_stem"),
        ("bn2", kind, "folded", "conv_pw"),
        ("bn3", kind, "folded", "conv_dw.0+conv_dw.1+conv_dw.2"),  # BN over a concat of per-group convs
        ("bn4", kind, "folded", "conv_pwl"),
    ]
    assert report.capture == "torch.fx" and _bns(folded) == []
    assert isinstance(folded.bn1, FoldedNormAct) and isinstance(folded.bn1.act, nn.ReLU)
    assert isinstance(folded.bn2.act, nn.Hardswish)
    _same(model, folded, X, -X, X[:1])
    # the activation kept inside the module is still a ReLU site for bound_relu
    bounded, rep = bound_relu(folded, X, mode="swap")
    assert [s.target for s in rep.sites] == ["bn1.act", "se.act1"]
    assert isinstance(bounded.get_submodule("bn1.act"), nn.ReLU6)


def test_shape_reads_are_not_consumers() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            torch._assert(y.ndim == 4, f"got {y.ndim}-D")
            z = self.bn(y).reshape(y.size(0), -1).to(y.device).to(y.dtype)
            return z.view(y.shape).view_as(y)

    model = _prep(Block())
    folded, report = fold_batchnorm(model)
    assert [(e.bn, e.status, e.into) for e in report.entries] == [("bn", "folded", "conv")]
    _same(model, folded, X)


def test_real_consumer_still_blocks_the_fold() -> None:
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), BatchNormAct2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y.sum()

    model = _prep(TwoUsers())
    folded, report = fold_batchnorm(model)
    assert report.left[0].reason.startswith("after: the output of 'conv' also feeds .sum() ('sum_1')")
    _same(model, folded, X)  # the BatchNorm still runs


def test_frozen_norm_act_with_a_different_order_is_not_taken_for_bn_then_act() -> None:
    class ActThenBN(FrozenBatchNormAct2d):  # the activation before the affine: not BN -> act
        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return self.act(x) * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)

    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 1), ActThenBN(4)))
    folded, report = fold_batchnorm(model)
    assert report.entries == ()
    _same(model, folded, X)


# ----------------------------------------------------------------------------- LeViT LinearNorm
def test_linear_flatten_batchnorm1d_folds() -> None:
    model = _prep(LeViTLike())
    folded, report = fold_batchnorm(model)
    assert [(e.bn, e.status, e.into) for e in report.entries] == [
        ("stem.1", "folded", "stem.0"),
        ("qkv.bn", "folded", "qkv.linear"),
        ("proj.bn", "folded", "proj.linear"),
        ("mlp.0.bn", "folded", "mlp.0.linear"),
        ("mlp.2.bn", "folded", "mlp.2.linear"),
        ("head_bn", "folded", "head"),
    ]
    assert report.entries[1].note == "assumed a 3-D input to flatten(0, 1); pass example_inputs to check"
    _same(model, folded, X, -X)
    _, checked = fold_batchnorm(model, example_inputs=X)
    assert [e.status for e in checked.entries] == ["folded"] * 6 and checked.entries[1].note == ""


def test_flatten_of_a_4d_linear_output_is_left() -> None:
    class Flat4d(nn.Module):  # flatten(0, 1) of (N, A, B, C) is 3-D: BatchNorm1d would normalise B, not C
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 4, bias=False), nn.BatchNorm1d(16)

        def forward(self, x):
            return self.bn(self.fc(x).flatten(0, 1))

    model = _prep(Flat4d())
    folded, report = fold_batchnorm(model, example_inputs=X)
    assert report.left and report.left[0].reason.startswith(
        "after: its input is .flatten() ('flatten'), which does not give a 2-D (tokens, features) tensor"
    )
    _same(model, folded, X)


# ----------------------------------------------------------------------------- torch.export capture
def test_same_padding_conv_needs_export_and_folds_with_it() -> None:
    model = _prep(EffNetLike(same_pad=True))
    with pytest.raises(UntraceableModelError, match="or pass example inputs so that it can be captured with torch.export"):
        trace(model)
    _, plain = fold_batchnorm(model)  # without inputs: the conv_stem leaf hides the conv, its BN is left with why
    assert plain.capture == "torch.fx" and [e.bn for e in plain.left] == ["bn1"]
    assert "'conv_stem' (Conv2dSame), not a Conv/ConvTranspose/Linear" in plain.left[0].reason

    folded, report = fold_batchnorm(model, example_inputs=X)
    assert report.capture == "torch.export" and report.left == []
    assert report.valid_for == "input shape (N, 3, 16, 16) for any batch size N"
    assert "captured with torch.export: valid for input shape (N, 3, 16, 16)" in str(report)
    assert report.to_dict()["capture"] == {"method": "torch.export", "valid_for": report.valid_for}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    _same(model, folded, X, -X, X[:1], torch.randn(7, 3, 16, 16))

    bounded, rep = bound_relu(model, X, mode="swap")  # the calibration data doubles as the export example
    assert capture_info(bounded)["method"] == "torch.export" and len(rep.sites) == 2
    ref = copy.deepcopy(model)
    ref.bn1.act, ref.se.act1 = nn.ReLU6(), nn.ReLU6()
    _same(ref, bounded, X)

    merged, _ = reparameterize(model, example_inputs=X)
    assert capture_info(merged)["method"] == "torch.export"
    _same(model, merged, X)
    with pytest.raises(UntraceableModelError):
        reparameterize(model)


def test_data_dependent_control_flow_still_falls_back_to_leaves() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if bool(y.sum() > 0) else -y

    model = _prep(DataDependent())
    with pytest.raises(UntraceableModelError, match="the torch.export fallback failed as well"):
        trace(model, example_inputs=X)
    folded, report = fold_batchnorm(model, example_inputs=X)
    assert report.capture == "torch.fx" and report.left[0].reason.startswith("its parent '<root>'")
    _same(model, folded, X)


# ----------------------------------------------------------------------------- attributes kept
def test_segmentation_model_keeps_its_interface_without_inputs() -> None:
    model = _prep(SegModel())
    folded, report = fold_batchnorm(model)  # root untraceable: folded child by child
    assert [e.status for e in report.entries] == ["folded"] * 3
    assert isinstance(folded.encoder, fx.GraphModule) and folded.encoder.output_stride == 4
    _same(model, folded, X)
    with pytest.raises(RuntimeError, match="not divisible by the output stride 4"):
        folded(torch.randn(1, 3, 10, 10))


def test_segmentation_model_through_export_keeps_its_interface() -> None:
    model = _prep(SegModel())
    folded, report = fold_batchnorm(model, example_inputs=X)
    assert report.capture == "torch.export" and [e.status for e in report.entries] == ["folded"] * 3
    assert folded.encoder.output_stride == 4 and folded.name == "seg-like"
    assert type(folded.encoder).__name__ == "Encoder"
    folded.check_input_shape(X)  # a method of the original, bound to the folded model
    _same(model, folded, X, torch.randn(2, 3, 16, 16))
    for m in (copy.deepcopy(folded), trace(folded)):  # survives copies and re-tracing
        assert m.encoder.output_stride == 4 and m.name == "seg-like"
        _same(model, m, X)


def test_traced_model_keeps_attributes_properties_and_methods() -> None:
    class Net(nn.Module):
        scale = 2.0

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.num_classes = 4

        @property
        def width(self) -> int:
            return self.body[0].out_channels

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.features(x) * self.scale

    model = _prep(Net())
    folded, _ = fold_batchnorm(model)
    bounded, _ = bound_relu(folded, X, mode="swap")
    for m in (folded, bounded, copy.deepcopy(bounded)):
        assert m.num_classes == 4 and m.scale == 2.0 and m.width == 4
        assert m.features(X).shape == (4, 4, 16, 16)
    _same(model, folded, X)


@pytest.mark.parametrize("make", [lambda: EffNetLike(same_pad=True), lambda: EffNetLike(frozen=True), LeViTLike, SegModel])
def test_run_ptq_on_architecture_patterns(make, tmp_path) -> None:
    model = _prep(make())
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    res = run_ptq(model, calib, config=PTQConfig(), out_dir=tmp_path)
    assert res.reports["fold"].left == []
    onnx_model = onnx.load(str(res.artifacts["onnx"]))
    assert not [n for n in onnx_model.graph.node if n.op_type == "BatchNormalization"]
    assert res.accuracy.stages["folded"].sqnr_db > 100  # folding is exact
    assert res.accuracy.stages["engine"].sqnr_db > 20  # int8 engine close to FP32
    if isinstance(model, SegModel):
        assert res.fake_quant.encoder.output_stride == 4 and res.bounded.name == "seg-like"
        res.fake_quant.check_input_shape(calib)


def test_reparameterize_and_bound_on_batchnorm_act_models() -> None:
    """Traced-through BatchNormAct modules stay bare containers in the result (no BN class that a pass
    would take for a BatchNorm in training mode)."""
    model = _prep(EffNetLike(same_pad=False))
    merged, _ = reparameterize(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules())
    _same(model, merged, X)
    folded, report = fold_batchnorm(merged)
    assert [e.status for e in report.entries] == ["folded"] * 4
    _same(model, folded, X)
