"""qfold.fold: legality rules, error messages, report contents, test models, export, idempotence."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from models import (
    DenseNetStyle,
    FrozenBatchNorm2d,
    FunctionalBN,
    LinearBN3d,
    ResNetStyle,
    RootFunctionalBN,
    Untraceable,
    UntraceableChild,
    bn_modules,
    calibrate_bn,
    max_rel_err,
    randomize_bn,
)

from qfold.capture import trace
from qfold.errors import FoldError, UntraceableModelError
from qfold.fold.passes import FoldReport, fold_batchnorm


def _rows(report: FoldReport) -> list[tuple]:
    return [(e.bn, e.kind, e.status, e.into, e.direction) for e in report.entries]


def _check_same(model: nn.Module, folded: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    with torch.no_grad():
        assert max_rel_err(folded(x), model(x)) <= tol


def _prep(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn(model, seed).eval()


# ----------------------------------------------------------------------------- test models
def test_resnet_style_exact_report() -> None:
    model = calibrate_bn(ResNetStyle(), [torch.randn(8, 3, 8, 8) for _ in range(3)])
    folded, report = fold_batchnorm(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert _rows(report) == [
        ("stem.1", "BatchNorm2d", "folded", "stem.0", "after"),
        ("layer1.bn1", "BatchNorm2d", "folded", "layer1.conv1", "after"),
        ("layer1.bn2", "BatchNorm2d", "folded", "layer1.conv2", "after"),
        ("layer2.bn1", "BatchNorm2d", "folded", "layer2.conv1", "after"),
        ("layer2.bn2", "BatchNorm2d", "folded", "layer2.conv2", "after"),
        ("layer2.down.1", "BatchNorm2d", "folded", "layer2.down.0", "after"),
        ("head_bn", "BatchNorm1d", "folded", "fc", "after"),
    ]
    assert all(e.reason == "" and e.note == "" for e in report.entries)
    assert isinstance(folded, fx.GraphModule) and not folded.training
    assert bn_modules(folded) == []
    assert not any(n.op == "call_module" and "bn" in n.target for n in folded.graph.nodes)
    _check_same(model, folded, torch.randn(4, 3, 8, 8))
    # the stem conv had no bias: the fold created one, as a Parameter
    assert isinstance(folded.get_submodule("stem.0").bias, nn.Parameter) and model.stem[0].bias is None


def test_densenet_style_exact_report() -> None:
    model = _prep(DenseNetStyle(), 3)
    folded, report = fold_batchnorm(model)
    not_layer = "not a Conv/ConvTranspose/Linear"
    assert [(e.bn, e.status, e.into, e.direction, e.reason) for e in report.entries] == [
        ("norm0", "folded", "conv0", "after", ""),
        ("layer1.norm1", "left", None, None,
         "after: its input is cat ('cat') of relu ('relu'), not only Conv/ConvTranspose layers; "
         "before: its output feeds relu ('relu_1'), not a Conv/Linear"),
        ("layer1.norm2", "folded", "layer1.conv1", "after", ""),
        ("layer2.norm1", "left", None, None,
         "after: its input is cat ('cat_1') of relu ('relu'), not only Conv/ConvTranspose layers; "
         "before: its output feeds relu ('relu_3'), not a Conv/Linear"),
        ("layer2.norm2", "folded", "layer2.conv1", "after", ""),
        ("trans_norm", "folded", "trans_conv", "before", ""),
        ("pre_norm", "left", None, None,
         (f"after: its input comes from avg_pool2d ('avg_pool2d'), {not_layer}; before: the following 'pre_conv' pads "
          "its input (padding=(1, 1)): a shift before zero padding is not a bias after it")),
        ("norm5", "folded", "pre_conv", "after", ""),
    ]  # fmt: skip
    assert sorted(bn_modules(folded)) == ["layer1.norm1", "layer2.norm1", "pre_norm"]
    _check_same(model, folded, torch.randn(3, 3, 8, 8))


def test_report_prints_and_serialises() -> None:
    _, report = fold_batchnorm(_prep(DenseNetStyle()))
    text = str(report)
    assert text.splitlines()[0] == "BatchNorm folding: 5 folded, 3 left"
    assert text.splitlines()[1].split() == ["bn", "kind", "status", "into", "dir", "reason", "/", "note"]
    assert "trans_norm" in text and "pads its input" in text
    data = json.loads(report.to_json())
    assert data["folded"] == 5 and data["left"] == 3 and len(data["entries"]) == 8
    assert set(data["entries"][0]) == {"bn", "kind", "status", "into", "direction", "reason", "note"}
    assert data == report.to_dict()
    assert [e.bn for e in report.left] == ["layer1.norm1", "layer2.norm1", "pre_norm"]


def test_onnx_export_has_no_batchnorm_and_matches() -> None:
    model = _prep(ResNetStyle(), 5)
    folded, _ = fold_batchnorm(model, strict=True)
    x = torch.randn(2, 3, 8, 8)
    ops = {}
    for name, m in (("unfolded", model), ("folded", folded)):
        buf = io.BytesIO()
        torch.onnx.export(m, (x,), buf, dynamo=False, do_constant_folding=False, input_names=["x"])
        ops[name] = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
        if name == "folded":
            sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
            (y,) = sess.run(None, {"x": x.numpy()})
            with torch.no_grad():
                ref = model(x).numpy()
            assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    assert "BatchNormalization" in ops["unfolded"]  # the check below can fail
    assert "BatchNormalization" not in ops["folded"]


# ----------------------------------------------------------------------------- contract
def test_input_model_untouched_and_idempotent() -> None:
    model = _prep(DenseNetStyle(), 1)
    snapshot = copy.deepcopy(model.state_dict())
    folded, report = fold_batchnorm(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(snapshot) and len(bn_modules(model)) == 8
    again, report2 = fold_batchnorm(folded)
    assert report2.folded == [] and report2.left == report.left
    assert again.code == folded.code
    s1, s2 = folded.state_dict(), again.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_deterministic() -> None:
    model = _prep(ResNetStyle(), 2)
    (a, ra), (b, rb) = fold_batchnorm(model), fold_batchnorm(model)
    assert ra.to_json() == rb.to_json() and a.code == b.code
    bytes_a, bytes_b = io.BytesIO(), io.BytesIO()
    torch.save(a.state_dict(), bytes_a)
    torch.save(b.state_dict(), bytes_b)
    assert bytes_a.getvalue() == bytes_b.getvalue()


def test_strict() -> None:
    fold_batchnorm(_prep(ResNetStyle()), strict=True)  # nothing left: no error
    with pytest.raises(FoldError, match=r"strict=True and 3 BatchNorm\(s\) were left: 'layer1.norm1': after: its input"):
        fold_batchnorm(_prep(DenseNetStyle()), strict=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_and_layout_kept(dtype: torch.dtype) -> None:
    model = _prep(nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6)))
    model = model.to(dtype).to(memory_format=torch.channels_last)
    folded, _ = fold_batchnorm(model)
    w = folded.get_submodule("0").weight
    assert w.dtype == dtype and folded.get_submodule("0").bias.dtype == dtype
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    # the arithmetic ran in float64 and was rounded once: it equals folding a float64 copy, then casting
    ref = fold_batchnorm(copy.deepcopy(model).double())[0].get_submodule("0").weight.to(dtype)
    torch.testing.assert_close(w, ref, rtol=0, atol=0, check_stride=False)


# ----------------------------------------------------------------------------- legality
def test_training_mode_is_an_error() -> None:
    model = _prep(ResNetStyle()).train()
    with pytest.raises(FoldError, match=r"BatchNorm 'stem.1' \(BatchNorm2d\) is in training mode.*Call model.eval\(\)"):
        fold_batchnorm(model)
    func = nn.Sequential(nn.Conv2d(3, 4, 1), FunctionalBN(4)).train()
    with pytest.raises(FoldError, match=r"F.batch_norm in '1' runs with training=True.*model.eval\(\)"):
        fold_batchnorm(func)


def test_lazy_module_is_an_error() -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(FoldError, match=r"module '0' \(LazyConv2d\) is a lazy module.*run one forward pass"):
        fold_batchnorm(model)
    with pytest.raises(TypeError, match="expects an nn.Module, got dict"):
        fold_batchnorm({})  # type: ignore[arg-type]


def test_track_running_stats_false_is_left() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    folded, report = fold_batchnorm(model)
    assert report.left[0].reason.startswith("it has no running statistics (track_running_stats=False)")
    _check_same(model, folded, torch.randn(2, 3, 6, 6))


def test_conv_output_with_another_user_is_left() -> None:
    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _prep(Tap())
    folded, report = fold_batchnorm(model)
    assert report.left[0].reason == (
        "after: the output of 'conv' also feeds add ('add'); before: its output feeds add ('add'), not a Conv/Linear"
    )
    _check_same(model, folded, torch.randn(2, 3, 6, 6))


def test_affine_false_and_zero_negative_gamma() -> None:
    model = _prep(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Conv1d(4, 5, 1), nn.BatchNorm1d(5, affine=False)))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.0, -2.0, -0.5, 1.5]))
    folded, report = fold_batchnorm(model)
    assert len(report.folded) == 2
    _check_same(model, folded, torch.randn(2, 3, 9))
    assert torch.all(folded.get_submodule("0").weight[0] == 0)  # gamma = 0: the channel is the constant beta


def test_bn_before_layers() -> None:
    chain = _prep(nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Conv2d(3, 5, 2, stride=2, dilation=1)))
    folded, report = fold_batchnorm(chain)
    assert _rows(report) == [("0", "BatchNorm2d", "folded", "2", "before"), ("1", "BatchNorm2d", "folded", "2", "before")]
    _check_same(chain, folded, torch.randn(2, 3, 6, 6))
    convt = _prep(nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 2)))
    _, report = fold_batchnorm(convt)
    assert report.left[0].reason.endswith("before: its output feeds '1' (ConvTranspose2d), not a Conv/Linear")
    same = _prep(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding="same")))
    assert "pads its input (padding=same)" in fold_batchnorm(same)[1].left[0].reason
    one = _prep(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, padding="same")))  # k=1: no padding at all
    folded, report = fold_batchnorm(one)
    assert report.folded[0].direction == "before"
    _check_same(one, folded, torch.randn(2, 3, 4, 4))


def test_shared_layers_and_bns() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.c2, self.bn, self.bn2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.bn(self.conv(x))  # conv is also called below: its weights cannot absorb bn
            b = self.conv(x + 1)
            return self.bn2(self.c2(a)) + self.bn2(self.c2(b) * 2) + b  # bn2 called twice; c2 called twice

    model = _prep(Shared())
    folded, report = fold_batchnorm(model)
    reasons = {e.bn: e.reason for e in report.entries}
    assert reasons["bn"].startswith("after: 'conv' is called at 2 places, so its weights cannot absorb one BatchNorm")
    assert list(reasons) == ["bn", "bn2 (call 1)", "bn2 (call 2)"]
    assert reasons["bn2 (call 1)"].startswith("after: 'c2' is called at 2 places")
    _check_same(model, folded, torch.randn(2, 3, 4, 4))

    class TwoSites(nn.Module):  # one BN module after two different convs: both calls fold
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) - self.bn(self.b(x))

    model = _prep(TwoSites())
    folded, report = fold_batchnorm(model)
    assert _rows(report) == [
        ("bn (call 1)", "BatchNorm2d", "folded", "a", "after"),
        ("bn (call 2)", "BatchNorm2d", "folded", "b", "after"),
    ]
    _check_same(model, folded, torch.randn(2, 3, 4, 4))


def test_layers_that_are_not_plain() -> None:
    class StdConv(nn.Conv2d):  # weight standardisation: a custom forward, not linear in the weight
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias)

    m1 = _prep(nn.Sequential(StdConv(3, 4, 3), nn.BatchNorm2d(4)))
    r1 = fold_batchnorm(m1)[1]
    assert r1.left[0].reason.startswith("after: its input comes from conv2d ('conv2d'), not a Conv/ConvTranspose/Linear")
    m2 = _prep(nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    r2 = fold_batchnorm(m2)[1]
    assert r2.left[0].reason.startswith("after: '0' has a parametrized weight (weight_norm / spectral_norm...)")
    m3 = _prep(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(6)))  # would fail at run time; still reported
    assert fold_batchnorm(m3)[1].left[0].reason.startswith("after: '0' has 8 output channels, the BatchNorm 6")


def test_corrupt_statistics_are_left() -> None:
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].running_var[1] = -1.0
    assert fold_batchnorm(model)[1].left[0].reason == "running_var + eps <= 0 in 1 channel(s): the statistics are corrupt"
    with torch.no_grad():
        model[1].running_var[1] = 1.0
        model[1].running_mean[0] = float("nan")
    assert fold_batchnorm(model)[1].left[0].reason == "its running statistics or affine parameters are not finite"


def test_linear_batchnorm1d_ranks() -> None:
    two_d = _prep(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    folded, report = fold_batchnorm(two_d, example_inputs=torch.randn(4, 6))
    assert report.folded[0].note == "" and report.folded[0].into == "0"
    _check_same(two_d, folded, torch.randn(4, 6))
    assert fold_batchnorm(two_d)[1].folded[0].note == "assumed a 2-D (N, features) input; pass example_inputs to check"
    # (N, C=5, L=6) -> Linear(6, 5) -> BatchNorm1d(5) normalises C, not the Linear's features
    x3 = torch.randn(4, 5, 6)
    _, report = fold_batchnorm(two_d, example_inputs=x3)
    assert report.left[0].reason.startswith("after: '0' outputs a 3-D tensor: the BatchNorm normalises dim 1")
    before = _prep(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)))  # BN over C=5, Linear over L=5
    reason = fold_batchnorm(before, example_inputs=torch.randn(4, 5, 5))[1].left[0].reason
    assert reason.endswith("before: the BatchNorm output is 3-D: it normalises dim 1, '1' mixes the last dim")
    seq = _prep(LinearBN3d())
    folded, report = fold_batchnorm(seq)
    assert _rows(report) == [("bn", "BatchNorm1d", "folded", "fc", "after")] and report.entries[0].note == ""
    _check_same(seq, folded, torch.randn(3, 7, 6))


# ----------------------------------------------------------------------------- BatchNorm flavours
def test_frozen_and_functional_batchnorms() -> None:
    frozen = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU()))
    folded, report = fold_batchnorm(frozen)
    assert _rows(report) == [("1", "FrozenBatchNorm2d", "folded", "0", "after")] and bn_modules(folded) == []
    _check_same(frozen, folded, torch.randn(2, 3, 6, 6))

    func = _prep(nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), FunctionalBN(4)))
    folded, report = fold_batchnorm(func)
    assert _rows(report) == [("1", "F.batch_norm", "folded", "0", "after")] and bn_modules(folded) == []
    _check_same(func, folded, torch.randn(2, 3, 4, 4))

    root = RootFunctionalBN().eval()
    folded, report = fold_batchnorm(root)
    assert _rows(report) == [("batch_norm", "F.batch_norm", "folded", "conv", "after")]
    assert not any(hasattr(folded, a) for a in ("mu", "sigma2", "gamma", "beta"))
    _check_same(root, folded, torch.randn(2, 3, 6, 6))

    sync = _prep(nn.Sequential(nn.Conv3d(2, 4, 1, groups=2), nn.SyncBatchNorm(4)))
    folded, report = fold_batchnorm(sync)
    assert _rows(report) == [("1", "SyncBatchNorm", "folded", "0", "after")]
    _check_same(sync, folded, torch.randn(2, 2, 3, 3, 3))


def test_lookalike_is_not_a_batchnorm() -> None:
    class Impostor(FrozenBatchNorm2d):  # the attributes of a frozen BN, a different function
        def forward(self, x):
            return x * self.weight.reshape(1, -1, 1, 1) + self.running_var.reshape(1, -1, 1, 1)

    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), Impostor(4)))
    folded, report = fold_batchnorm(model)
    assert report.entries == ()
    _check_same(model, folded, torch.randn(2, 3, 5, 5))


def test_functional_with_computed_statistics_is_left() -> None:
    class Computed(FunctionalBN):
        def forward(self, x):
            return F.batch_norm(x, x.mean((0, 2, 3)), self.sigma2, self.gamma, self.beta, False, 0.1, self.eps)

    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), Computed(4)))
    _, report = fold_batchnorm(model)
    assert report.left[0].reason == "its running_mean is computed in forward, not a module attribute"


# ----------------------------------------------------------------------------- untraceable models
def test_untraceable_root_folds_inside_children() -> None:
    model = _prep(Untraceable())
    with pytest.raises(UntraceableModelError, match="the forward of module '<root>' failed") as info:
        trace(model)
    assert info.value.module_name == ""
    folded, report = fold_batchnorm(model)
    assert _rows(report) == [
        ("features.1", "BatchNorm2d", "folded", "features.0", "after"),
        ("block.bn1", "BatchNorm2d", "folded", "block.conv1", "after"),
        ("block.bn2", "BatchNorm2d", "folded", "block.conv2", "after"),
        ("bn", "BatchNorm2d", "left", None, None),
    ]
    assert report.left[0].reason == (
        "its parent '<root>' (Untraceable) cannot be traced by torch.fx (TraceError), so the layer feeding it is "
        "unknown: make Untraceable.forward traceable, or put the layer and its BatchNorm in an nn.Sequential"
    )
    assert type(folded) is Untraceable and bn_modules(folded) == ["bn"]
    x = torch.randn(2, 3, 7, 7)
    _check_same(model, folded, x)
    _check_same(model, folded, -x)
    with pytest.raises(FoldError, match="'bn': its parent '<root>' \\(Untraceable\\) cannot be traced"):
        fold_batchnorm(model, strict=True)


def test_untraceable_child_becomes_a_leaf() -> None:
    model = _prep(UntraceableChild())
    with pytest.raises(UntraceableModelError) as info:
        trace(model)
    assert info.value.module_name == "gated.0"
    folded, report = fold_batchnorm(model)
    assert _rows(report) == [
        ("bn", "BatchNorm2d", "folded", "conv", "after"),
        ("gated.2", "BatchNorm2d", "folded", "gated.1", "after"),
    ]
    assert isinstance(folded, fx.GraphModule) and bn_modules(folded) == []
    x = torch.randn(2, 3, 6, 6)
    _check_same(model, folded, x)
    _check_same(model, folded, -x)


def test_transpose_of_unknown_rank_asks_for_inputs() -> None:
    class SyncHead(nn.Module):  # transpose(1, 2) then a SyncBatchNorm: 3-D only if the input is
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 5), nn.SyncBatchNorm(5)

        def forward(self, x):
            return self.bn(self.fc(x).transpose(1, 2))

    model = _prep(SyncHead())
    _, report = fold_batchnorm(model)
    assert report.left[0].reason.startswith(
        "after: its input is .transpose() ('transpose') of 'fc', whose rank is unknown for a SyncBatchNorm: pass example_inputs"
    )
    x = torch.randn(2, 4, 6)
    folded, report = fold_batchnorm(model, example_inputs=x)
    assert _rows(report) == [("bn", "SyncBatchNorm", "folded", "fc", "after")]
    _check_same(model, folded, x)


def test_frozen_statistics_in_a_training_model() -> None:
    """model.train() with every BN put back in eval (fine-tuning with frozen BN) folds; modes are kept."""
    model = _prep(ResNetStyle()).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.eval()
    folded, report = fold_batchnorm(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert len(report.folded) == 7 and model.training and not model.stem[1].training
    model.eval()
    _check_same(model, folded, torch.randn(2, 3, 8, 8))
