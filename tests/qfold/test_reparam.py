"""Structural re-parameterization: RepVGG / ACNet / residual blocks merged exactly into one conv."""
from __future__ import annotations

import copy
import io
import json
import operator

import pytest
import torch
import torch.nn as nn

from qfold.reparam.passes import ReparamReport, reparameterize

torch.set_num_threads(1)
REL_TOL = 1e-5  # acceptance: max |merged - reference| / max |reference| in fp32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def realistic_bn(model: nn.Module, x: torch.Tensor, batches: int = 3) -> nn.Module:
    """Give every BN data statistics (cumulative average over a few train batches) and random affine."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.empty(m.num_features).uniform_(0.3, 2.0, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(x * (1 + 0.3 * i) + 0.2 * i)
    return model.eval()


def conv_bn(ci: int, co: int, k, s: int = 1, p=0, g: int = 1, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, k, s, p, groups=g, bias=False, **kw), nn.BatchNorm2d(co))


class RepVGGBlock(nn.Module):
    """Train-time RepVGG block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN when shapes allow), ReLU."""

    def __init__(self, ci: int, co: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dense = conv_bn(ci, co, 3, stride, 1, groups)
        self.one = conv_bn(ci, co, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(ci) if ci == co and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class ACBlock(nn.Module):
    """ACNet asymmetric block: 3x3 + 1x3 + 3x1, each conv-BN (square optional)."""

    def __init__(self, c: int, square: bool = True) -> None:
        super().__init__()
        self.square = conv_bn(c, c, 3, p=1) if square else None
        self.hor = conv_bn(c, c, (1, 3), p=(0, 1))
        self.ver = conv_bn(c, c, (3, 1), p=(1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.hor(x) + self.ver(x)
        return y + self.square(x) if self.square is not None else y


def repvgg_a0_like(width: float = 1 / 6, groups_every_other: int = 1) -> nn.Sequential:
    """RepVGG-A0 layout (blocks 1-2-4-14-1, widths 48-48-96-192-1280) scaled in width."""
    widths = [max(4, int(w * width)) // 4 * 4 for w in (48, 48, 96, 192, 1280)]
    depths = [1, 2, 4, 14, 1]
    layers: list[nn.Module] = []
    ci, idx = 3, 0
    for w, d in zip(widths, depths):
        for i in range(d):
            g = groups_every_other if idx % 2 == 1 and ci == w else 1
            layers.append(RepVGGBlock(ci, w, stride=2 if i == 0 else 1, groups=g))
            ci, idx = w, idx + 1
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ci, 10))


def merged_ok(model: nn.Module, x: torch.Tensor, n_merged: int) -> tuple[nn.Module, ReparamReport]:
    gm, report = reparameterize(model)
    assert len(report.merged) == n_merged, str(report)
    with torch.no_grad():
        err = rel_err(gm(x), model(x))
    assert err <= REL_TOL, f"relative error {err:.3g}"
    return gm, report


def module_types(gm: nn.Module) -> list[type]:
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


def add_nodes(gm: nn.Module) -> list:
    return [n for n in gm.graph.nodes if n.target in (operator.add, torch.add, "add")]


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_repvgg_block_merges_exactly(groups: int) -> None:
    x = torch.randn(4, 8, 12, 12)
    block = realistic_bn(RepVGGBlock(8, 8, groups=groups), x)
    gm, report = merged_ok(block, x, 1)
    assert module_types(gm) == [nn.Conv2d, nn.ReLU]
    (m,) = report.merged
    assert m.weight_shape == (8, 8 // groups, 3, 3) and m.groups == groups and m.padding == (1, 1)
    assert len(m.branches) == 3 and "bn 'identity'" in m.branches[2]


def test_repvgg_stride2_block_without_identity() -> None:
    x = torch.randn(2, 4, 15, 15)
    block = realistic_bn(RepVGGBlock(4, 8, stride=2), x)
    gm, report = merged_ok(block, x, 1)
    assert report.merged[0].stride == (2, 2) and module_types(gm) == [nn.Conv2d, nn.ReLU]


@pytest.mark.parametrize("square", [True, False])
def test_acnet_block_merges_to_3x3(square: bool) -> None:
    x = torch.randn(3, 6, 10, 9)
    block = realistic_bn(ACBlock(6, square), x)
    gm, report = merged_ok(block, x, 1)
    assert report.merged[0].weight_shape == (6, 6, 3, 3)
    assert module_types(gm) == [nn.Conv2d]


class ConvBNPlusBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = conv_bn(5, 5, 3, p=1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.branch(x) + self.bn(x)


class Residual(nn.Module):
    """``x + BN(conv(x))`` and ``Identity(x)``: plain identities become identity kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = conv_bn(4, 4, 5, p=2)
        self.skip = nn.Identity()

    def forward(self, x):
        return x + self.branch(x) + self.skip(x)


class PlainSum(nn.Module):
    """Convs with bias summed through every add spelling, nested, one module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 5, padding=2)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        s = torch.add(self.a(x), self.b(x)).add(self.c(x))
        s += self.b(x) + self.a(x)
        return s


@pytest.mark.parametrize("cls,channels", [(ConvBNPlusBN, 5), (Residual, 4)])
def test_identity_branches(cls, channels: int) -> None:
    x = torch.randn(2, channels, 8, 8)
    gm, _ = merged_ok(realistic_bn(cls(), x), x, 1)
    assert module_types(gm) == [nn.Conv2d] and not add_nodes(gm)


def test_plain_sum_of_convs_through_every_add_spelling() -> None:
    x = torch.randn(2, 3, 9, 9)
    gm, report = merged_ok(PlainSum().eval(), x, 1)
    assert module_types(gm) == [nn.Conv2d] and not add_nodes(gm)
    assert report.merged[0].module == "a" and len(report.merged[0].branches) == 5


class TwoInputs(nn.Module):
    """The RepVGG branches read x; a residual from another tensor y is added back unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(4, 4, 3, padding=1)
        self.k1 = nn.Conv2d(4, 4, 1)
        self.other = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.other(x).relu()
        return self.k3(x) + y + self.k1(x)


def test_partial_merge_adds_other_leaves_back() -> None:
    x = torch.randn(2, 4, 7, 7)
    gm, report = merged_ok(TwoInputs().eval(), x, 1)
    assert report.merged[0].module == "k3" and len(add_nodes(gm)) == 1


def test_repvgg_a0_like_network_becomes_plain_conv_relu_stack() -> None:
    """22 merged blocks: exact in float64; in float32 the merged net is as close to the float64
    truth as the train-time net is (both ~1e-5 after 22 layers of fp32 rounding)."""
    x = torch.randn(4, 3, 32, 32)
    net = realistic_bn(repvgg_a0_like(), x)
    gm, report = reparameterize(net)
    assert len(report.merged) == 22 and not report.left
    net64 = copy.deepcopy(net).double()
    gm64, _ = reparameterize(net64)
    with torch.no_grad():
        truth = net64(x.double())
        assert rel_err(gm64(x.double()), truth) <= 1e-12
        assert rel_err(gm(x).double(), truth) <= 2 * rel_err(net(x).double(), truth) + 1e-7
    types = module_types(gm)
    assert types[:44] == [nn.Conv2d, nn.ReLU] * 22
    assert types[44:] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert not add_nodes(gm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in gm.modules()) == 22


def test_grouped_network_and_conv1d_conv3d() -> None:
    x = torch.randn(2, 3, 32, 32)
    net = realistic_bn(repvgg_a0_like(width=1 / 3, groups_every_other=4), x)
    merged_ok(net, x, 22)

    class Block1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv1d(4, 4, 5, padding=2), nn.BatchNorm1d(4))
            self.b = nn.Conv1d(4, 4, 3, padding=1, groups=2)
            self.i = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.i(x)

    class Block3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1, bias=False), nn.BatchNorm3d(2))
            self.b = nn.Sequential(nn.Conv3d(2, 2, 1, bias=False), nn.BatchNorm3d(2))

        def forward(self, x):
            return self.a(x) + self.b(x) + x

    x1 = torch.randn(3, 4, 20)
    merged_ok(realistic_bn(Block1d(), x1), x1, 1)
    x3 = torch.randn(2, 2, 5, 6, 7)
    merged_ok(realistic_bn(Block3d(), x3), x3, 1)


def test_reflect_padding_merges_when_padded_branches_agree() -> None:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.k3 = conv_bn(4, 4, 3, p=1, padding_mode="reflect")
            self.k1 = conv_bn(4, 4, 1)

        def forward(self, x):
            return self.k3(x) + self.k1(x) + x

    x = torch.randn(2, 4, 8, 8)
    gm, _ = merged_ok(realistic_bn(Block(), x), x, 1)
    assert gm.get_submodule("k3.0").padding_mode == "reflect"


class Pair(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, use_a_twice: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.use_a_twice = a, b, use_a_twice

    def forward(self, x):
        ya = self.a(x)
        out = ya + self.b(x)
        return out * ya if self.use_a_twice else out


LEFT_CASES = {
    "misaligned": (Pair(nn.Conv2d(3, 3, 5, stride=3), nn.Conv2d(3, 3, 3, stride=3)), (32, 32), "one centre"),
    "even kernel": (Pair(nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Conv2d(3, 3, 2, stride=2)), (32, 32), "centred"),
    "no running stats": (
        Pair(conv_bn(3, 3, 3, p=1), nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))),
        (8, 8),
        "track_running_stats=False",
    ),
    "output reused": (Pair(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1), use_a_twice=True), (8, 8), "also read"),
    "padding modes": (
        Pair(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 3, 5, padding=2)),
        (8, 8),
        "padding modes",
    ),
    "dilation": (Pair(nn.Conv2d(3, 3, 3, padding=2, dilation=2), nn.Conv2d(3, 3, 5, padding=2)), (8, 8), "dilation"),
}


@pytest.mark.parametrize("case", sorted(LEFT_CASES))
def test_inconsistent_blocks_are_left_with_reason(case: str) -> None:
    model, hw, reason = LEFT_CASES[case]
    model.eval()
    x = torch.randn(2, 3, *hw)
    gm, report = reparameterize(model)
    assert not report.merged and len(report.left) == 1, str(report)
    assert reason in report.left[0].reason and len(report.left[0].branches) == 2
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_training_mode_bn_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"'dense.1' is in training mode.*model.eval\(\)"):
        reparameterize(RepVGGBlock(4, 4).train())


def test_input_untouched_and_output_deterministic() -> None:
    x = torch.randn(2, 8, 8, 8)
    block = realistic_bn(RepVGGBlock(8, 8, groups=2), x)
    before = {k: v.clone() for k, v in block.state_dict().items()}

    def dump(m: nn.Module) -> bytes:
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.getvalue()

    gm1, r1 = reparameterize(block)
    gm2, r2 = reparameterize(block)
    assert dump(gm1) == dump(gm2) and r1 == r2 and str(gm1.code) == str(gm2.code)
    after = block.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(block.identity, nn.BatchNorm2d) and not block.training


def test_report_table_and_dict() -> None:
    x = torch.randn(2, 3, 32, 32)
    net = nn.Sequential(realistic_bn(RepVGGBlock(3, 3), x), LEFT_CASES["misaligned"][0].eval())
    _, report = reparameterize(net)
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["merged"][0]["weight_shape"] == [3, 3, 3, 3] and d["merged"][0]["module"] == "0.dense.0"
    text = str(report)
    assert "1 block(s) merged, 1 left" in text and "0.dense.0" in text and "one centre" in text


def test_conv_shared_with_another_call_is_left() -> None:
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.k3 = nn.Conv2d(3, 3, 3, padding=1)
            self.k1 = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.k3(x) + self.k1(x) + self.k3(x.relu())

    model = Shared().eval()
    x = torch.randn(2, 3, 6, 6)
    gm, report = reparameterize(model)
    assert not report.merged and "shared weights" in report.left[0].reason
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_dilated_block_merges_with_dilation_kept() -> None:
    """5x5 dilation 2 (pad 4) + 3x3 dilation 2 (pad 2) + identity BN: P = p + d (K - k) / 2 = 4."""

    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.k5 = conv_bn(4, 4, 5, p=4, dilation=2)
            self.k3 = conv_bn(4, 4, 3, p=2, dilation=2)
            self.i = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.k5(x) + self.k3(x) + self.i(x)

    x = torch.randn(2, 4, 11, 13)
    gm, report = merged_ok(realistic_bn(Dilated(), x), x, 1)
    conv = gm.get_submodule(report.merged[0].module)
    assert conv.dilation == (2, 2) and conv.padding == (4, 4) and conv.kernel_size == (5, 5)
