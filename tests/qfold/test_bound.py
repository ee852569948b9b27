"""qfold.bound: ReLU -> ReLU6, function-preserving rescale, fallbacks, errors, determinism."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qfold.bound.formulas import HEADROOM
from qfold.bound.passes import BoundConfig, bound_relu
from qfold.errors import BoundError
from qfold.fold.formulas import bn_affine, fold_affine_after

pytestmark = pytest.mark.usefixtures("one_thread")


class AllForms(nn.Module):
    """Every ReLU spelling, plus already-bounded ReLU6 / hardtanh(0, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu_ip = nn.ReLU(inplace=True)
        self.r6 = nn.ReLU6()
        self.ht = nn.Hardtanh(0.0, 6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_ip(self.relu(self.conv(x)))
        x = torch.relu(F.relu(x))
        x = x.relu()
        x = x.relu_()
        x = torch.relu_(F.relu(x, inplace=True))
        x = self.ht(self.r6(x))
        return F.hardtanh(F.relu6(x), 0.0, 6.0)


class ResNetish(nn.Module):
    """Stem, a residual block (with depthwise conv), a concat, avg-pool, flatten, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu(self.stem(x)), 2)
        x = torch.relu(x + self.b(F.relu(self.a(x))))
        z = self.c(torch.cat([x, F.pad(x, (0, 0))], 1)).relu_()
        return self.fc(F.avg_pool2d(z, 2).flatten(1))


def _big(model: nn.Module, k: float = 3.0) -> nn.Module:
    """Multiply every parameter so pre-activations reach well above 6."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(k)
    return model.eval()


def _relu_like_nodes(gm: torch.fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (F.relu, torch.relu, torch.relu_, F.relu6, F.hardtanh):
            out.append(n.name)
        if n.op == "call_method" and n.target in ("relu", "relu_"):
            out.append(n.name)
        if n.op == "call_module" and type(gm.get_submodule(n.target)) in (nn.ReLU, nn.Hardtanh):
            out.append(n.name)
    return out


def _relu6_calls(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_module" and type(gm.get_submodule(n.target)) is nn.ReLU6 for n in gm.graph.nodes)


@pytest.mark.parametrize("mode", ["swap", "preserve"])
def test_every_relu_form_becomes_a_relu6_module(mode: str) -> None:
    m = AllForms().eval()
    x = torch.randn(8, 2, 5, 5)
    gm, rep = bound_relu(m, x, mode=mode)
    assert len(rep.sites) == 8
    assert len(rep.already_bounded) == 4
    assert _relu_like_nodes(gm) == []
    assert _relu6_calls(gm) == 12
    # a chain of ReLUs ending in the model's own ReLU6 is min(relu(conv(x)), 6) either way
    torch.testing.assert_close(gm(x), torch.clamp(m.conv(x), 0, 6))
    # the chain feeds an existing ReLU6, which is not homogeneous: "preserve" must fall back
    assert all(s.mode == "swap" for s in rep.sites)
    if mode == "preserve":
        assert all("ReLU6" in s.reason and "cannot absorb" in s.reason for s in rep.sites)


def test_swap_equals_a_hand_written_relu6_model_and_degrades() -> None:
    m = _big(ResNetish())
    x = torch.randn(32, 3, 16, 16)
    gm, rep = bound_relu(m, x, mode="swap")
    def r6(t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(t, 0, 6)

    h = F.max_pool2d(r6(m.stem(x)), 2)
    h = r6(h + m.b(r6(m.a(h))))
    z = r6(m.c(torch.cat([h, h], 1)))
    torch.testing.assert_close(gm(x), m.fc(F.avg_pool2d(z, 2).flatten(1)))
    assert rep.output_sqnr_db < 20 and max(s.above6_fp32 for s in rep.sites) > 0.05
    # the first ReLU sees the same input in both models; later ones see already-clipped values
    assert rep.sites[0].clipped == rep.sites[0].above6_fp32 > 0


def test_preserve_is_exact_when_no_activation_exceeds_the_cap() -> None:
    m = _big(ResNetish())
    x = torch.randn(32, 3, 16, 16)
    gm, rep = bound_relu(m, x, quantile=1.0)
    assert rep.preserved == len(rep.sites) == 4
    with torch.no_grad():
        ref, out = m(x), gm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert all(s.clipped == 0.0 for s in rep.sites)
    assert max(s.above6_fp32 for s in rep.sites) > 0.1  # the literal swap would have clipped
    assert rep.output_sqnr_db > 90 and rep.top1_agreement == 1.0


def test_preserve_exact_on_new_data_below_the_caps() -> None:
    # Bias-free ReLU nets are positively homogeneous: 0.5*x keeps every activation under its cap.
    m = ResNetish()
    with torch.no_grad():
        for mod in m.modules():
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    m = _big(m)
    calib = torch.randn(32, 3, 16, 16)
    gm, _ = bound_relu(m, calib, quantile=1.0)
    x = 0.5 * calib[torch.randperm(32)]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5 * float(m(x).abs().max()))


def test_preserve_keeps_agreement_swap_does_not() -> None:
    m = _big(ResNetish())
    x = torch.randn(64, 3, 16, 16)
    _, keep = bound_relu(m, x)
    _, swap = bound_relu(m, x, mode="swap")
    assert keep.top1_agreement >= 0.999 and keep.output_sqnr_db >= 40
    assert swap.output_sqnr_db < keep.output_sqnr_db - 20
    # the cap sits above all but ~1e-4 of each site's activations
    assert all(s.clipped <= 2e-3 for s in keep.sites)


def test_residual_stream_shares_one_scale() -> None:
    _, rep = bound_relu(_big(ResNetish()), torch.randn(16, 3, 16, 16))
    by = {s.name: s for s in rep.sites}
    stream = [by["relu"], by["relu_2"]]  # the stem ReLU and the ReLU after the add
    assert stream[0].group == stream[1].group and stream[0].caps == stream[1].caps
    assert by["relu_1"].group != stream[0].group  # inside the block: its own scale
    assert len(stream[0].caps) == 8 and min(stream[0].caps) > 0


class Fallbacks(nn.Module):
    """Site 1 is a model output, site 2 feeds a sigmoid, site 3 adds the raw input; site 4 is fine."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.c3 = nn.Conv2d(3, 3, 3, padding=1)
        self.c4 = nn.Conv2d(3, 3, 1)
        self.c5 = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor):
        a = F.relu(self.c1(x))
        b = torch.sigmoid(F.relu(self.c2(x)))
        c = F.relu(x + self.c3(x))
        d = self.c5(F.relu(self.c4(x)))
        return a, b + c + d


def test_falls_back_to_swap_where_the_scale_cannot_be_absorbed() -> None:
    m = _big(Fallbacks())
    x = torch.randn(16, 3, 8, 8)
    gm, rep = bound_relu(m, x)
    modes = [s.mode for s in rep.sites]
    assert modes == ["swap", "swap", "swap", "preserve"]
    assert "model output" in rep.sites[0].reason
    assert "sigmoid" in rep.sites[1].reason
    assert "model input" in rep.sites[2].reason
    with torch.no_grad():
        out = gm(x)
    torch.testing.assert_close(out[0], F.relu6(m.c1(x)))  # literal swap
    d = m.c5(F.relu6(m.c4(x)))  # what the bounded model must compute if site 4 were swapped
    e = m.c5(F.relu(m.c4(x)))
    other = torch.sigmoid(F.relu6(m.c2(x))) + F.relu6(x + m.c3(x))
    torch.testing.assert_close(out[1] - other, e, rtol=1e-4, atol=1e-4)  # site 4 preserved...
    assert not torch.allclose(d, e, atol=1e-3)  # ...which the swap would not have been
    assert "model output" in rep.to_markdown() and str(rep) == rep.to_markdown()
    d = json.loads(json.dumps(rep.to_dict()))
    assert [s["mode"] for s in d["sites"]] == modes and d["sites"][3]["caps"] == list(rep.sites[3].caps)


def test_shared_module_falls_back() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.h = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.h(F.relu(self.c(F.relu(self.c(x)))))

    _, rep = bound_relu(_big(Shared()), torch.randn(8, 3, 4, 4))
    assert [s.mode for s in rep.sites] == ["swap", "swap"]
    assert "called 2 times" in rep.sites[0].reason


def test_dead_and_constant_channels_give_finite_scales() -> None:
    seq = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    with torch.no_grad():
        seq[0].weight.mul_(10)
        seq[0].weight[0].zero_()
        seq[0].bias[0] = -1.0  # dead: always 0 after the ReLU
        seq[0].weight[1].zero_()
        seq[0].bias[1] = 2.5  # constant 2.5
    x = torch.randn(16, 2, 6, 6)
    gm, rep = bound_relu(seq.eval(), x)
    caps = rep.sites[0].caps
    assert caps[0] == 6.0 and caps[1] == pytest.approx(2.5 * (1 + HEADROOM), rel=1e-12)
    for p in gm.parameters():
        assert torch.isfinite(p).all()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), seq(x), rtol=1e-4, atol=1e-3)


def test_errors_name_cause_and_fix() -> None:
    m = _big(ResNetish())
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(BoundError, match="needs calib_data.*mode='swap'"):
        bound_relu(m)
    with pytest.raises(BoundError, match=r"shape \(4, 5, 16, 16\) does not fit"):
        bound_relu(m, torch.randn(4, 5, 16, 16))
    with pytest.raises(BoundError, match="batch 1 has shape"):
        bound_relu(m, [x, torch.randn(4, 3, 8, 8)])
    with pytest.raises(BoundError, match="one-shot iterator"):
        bound_relu(m, iter([x]))
    with pytest.raises(BoundError, match=r"\[x for x, _ in loader\]"):
        bound_relu(m, [(x, torch.zeros(4))])
    with pytest.raises(BoundError, match="empty"):
        bound_relu(m, [])
    with pytest.raises(BoundError, match="either config"):
        bound_relu(m, x, mode="swap", config=BoundConfig(mode="preserve"))
    with pytest.raises(ValueError, match="mode must be one of"):
        BoundConfig(mode="clip")
    with pytest.raises(ValueError, match="quantile"):
        BoundConfig(quantile=0.0)


def test_unfolded_batchnorm_is_an_error_only_where_the_rescale_needs_the_fold() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    seq[1].running_mean.uniform_(-1, 1)
    seq[1].running_var.uniform_(0.5, 2)
    seq.eval()
    x = torch.randn(8, 3, 6, 6)
    with pytest.raises(BoundError, match="fold_batchnorm"):
        bound_relu(seq, x)
    gm, _ = bound_relu(seq, x, mode="swap")  # the literal swap needs no fold
    torch.testing.assert_close(gm(x), seq[3](F.relu6(seq[1](seq[0](x)))))
    # folded with qfold.fold.formulas, preserve works and keeps the function
    a, c = bn_affine(seq[1].running_mean, seq[1].running_var, seq[1].eps, seq[1].weight, seq[1].bias)
    conv = nn.Conv2d(3, 4, 3)
    w, b = fold_affine_after(seq[0].weight, seq[0].bias, a, c)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    folded = nn.Sequential(conv, nn.ReLU(), seq[3]).eval()
    gm, rep = bound_relu(folded, x, quantile=1.0)
    assert rep.preserved == 1
    torch.testing.assert_close(gm(x), seq(x), rtol=1e-5, atol=1e-5)


class PreActDense(nn.Module):
    """DenseNet-style: concat -> BN -> ReLU -> conv (BN unfoldable, writes into the group), and
    conv -> ReLU -> BN (BN reads from the group: the group falls back)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)
        for b in (self.bn, self.bn2):
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.5, 2)
            b.weight.data.uniform_(0.5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([x, self.stem(x)], 1)
        y = self.conv(F.relu(self.bn(y)))
        return self.head(self.bn2(F.relu(y)))


def test_unfoldable_batchnorm_writing_into_a_group_absorbs_the_scale() -> None:
    m = PreActDense().eval()
    x = 3 * torch.randn(16, 2, 6, 6)
    gm, rep = bound_relu(m, x, quantile=1.0)
    assert [s.mode for s in rep.sites] == ["preserve", "swap"]
    assert "bn2" in rep.sites[1].reason
    assert rep.sites[0].above6_fp32 > 0.01 and rep.sites[0].clipped == 0.0
    y = m.conv(F.relu(m.bn(torch.cat([x, m.stem(x)], 1))))  # site 1 preserved exactly
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m.head(m.bn2(F.relu6(y))), rtol=1e-4, atol=1e-4)
    assert not torch.equal(gm.get_submodule("bn").weight, m.bn.weight)  # gamma took the scale


def test_user_model_is_not_modified() -> None:
    m = _big(ResNetish()).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    types = [type(mod) for mod in m.modules()]
    gm, _ = bound_relu(m, torch.randn(8, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert [type(mod) for mod in m.modules()] == types
    assert m.training and gm.training  # training flags restored on the copy too


def _bytes(gm: torch.fx.GraphModule) -> bytes:
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    return buf.getvalue() + gm.code.encode()


def test_deterministic_and_independent_of_batching() -> None:
    m = _big(ResNetish())
    x = torch.randn(48, 3, 16, 16)
    g1, r1 = bound_relu(m, x)
    g2, r2 = bound_relu(m, x)
    assert _bytes(g1) == _bytes(g2)
    assert r1 == r2
    # Streaming: another batching gives the same caps up to the model's own float rounding (a
    # conv's result may differ in the last ulp with the batch size; the histograms do not).
    _, r3 = bound_relu(m, list(x.split(7)))
    for a, b in zip(r1.sites, r3.sites):
        assert a.caps == pytest.approx(b.caps, rel=1e-6)


def test_lower_quantile_clips_about_that_fraction() -> None:
    m = _big(ResNetish())
    x = torch.randn(32, 3, 16, 16)
    _, rep = bound_relu(m, x, quantile=0.99)
    for s in rep.sites:
        assert s.clipped <= 0.01 + 1e-9
    assert max(s.clipped for s in rep.sites) > 1e-3
