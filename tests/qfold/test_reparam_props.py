"""Property tests for re-parameterization over kernel sizes, paddings, dilations, groups and strides."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from qfold.reparam import formulas as rm
from qfold.reparam.passes import reparameterize

torch.set_num_threads(1)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KERNELS = [(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (1, 5), (3, 5), (2, 2), (2, 4), (4, 4)]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---- pure math -------------------------------------------------------------------------------


@SETTINGS
@given(
    k=st.sampled_from(KERNELS),
    grow=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    stride=st.integers(1, 3),
    dil=st.integers(1, 2),
)
def test_centre_pad_with_aligned_padding_is_the_same_conv(k, grow, pad, stride, dil) -> None:
    target = tuple(kk + 2 * g for kk, g in zip(k, grow))
    w = torch.randn(3, 2, *k, dtype=torch.float64)
    x = torch.randn(1, 2, 11, 12, dtype=torch.float64)
    big_pad = rm.aligned_padding(k, pad, (dil, dil), target)
    ref = F.conv2d(x, w, None, stride, pad, dil)
    out = F.conv2d(x, rm.centre_pad(w, target), None, stride, big_pad, dil)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)


@given(k=st.sampled_from(KERNELS), odd=st.tuples(st.integers(0, 3), st.integers(0, 3)))
def test_centre_offset_rejects_odd_growth_and_shrinking(k, odd) -> None:
    target = (k[0] + 2 * odd[0] + 1, k[1] + odd[1])
    with pytest.raises(ValueError, match="centred"):
        rm.centre_offset(k, target)
    with pytest.raises(ValueError, match="centred"):
        rm.centre_offset((k[0] + 2, k[1]), k)


@SETTINGS
@given(c=st.integers(1, 8), k=st.sampled_from([1, 3, 5]), data=st.data())
def test_identity_kernel_is_a_per_channel_scale(c, k, data) -> None:
    g = data.draw(st.sampled_from(divisors(c)))
    scale = torch.randn(c, dtype=torch.float64)
    x = torch.randn(2, c, 6, 7, dtype=torch.float64)
    out = F.conv2d(x, rm.identity_kernel(c, (k, k), groups=g, scale=scale), padding=k // 2, groups=g)
    assert torch.allclose(out, x * scale.view(1, -1, 1, 1), atol=1e-14)


@SETTINGS
@given(c_in=st.integers(1, 12), mult=st.integers(1, 3), data=st.data())
def test_regroup_is_the_same_conv(c_in, mult, data) -> None:
    g = data.draw(st.sampled_from(divisors(c_in)))
    new_g = data.draw(st.sampled_from(divisors(g)))
    c_out = g * mult
    w = torch.randn(c_out, c_in // g, 3, 3, dtype=torch.float64)
    x = torch.randn(2, c_in, 5, 5, dtype=torch.float64)
    ref = F.conv2d(x, w, padding=1, groups=g)
    out = F.conv2d(x, rm.regroup(w, g, new_g), padding=1, groups=new_g)
    assert torch.allclose(out, ref, atol=1e-12)


# ---- the graph pass --------------------------------------------------------------------------


class Branches(nn.Module):
    """Sum of conv / conv-BN / BN / identity branches, all reading x."""

    def __init__(self, convs: list[nn.Module], bns: list[bool], identities: list[str]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(cv, nn.BatchNorm2d(cv.out_channels)) if bn else cv for cv, bn in zip(convs, bns)
        )
        self.ids = nn.ModuleList(nn.BatchNorm2d(convs[0].out_channels) if i == "bn" else nn.Identity() for i in identities)

    def forward(self, x):
        out = self.convs[0](x)
        for m in list(self.convs)[1:]:
            out = out + m(x)
        for m in self.ids:
            out = out + m(x)
        return out


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 2)
            m.running_var.copy_(torch.exp(torch.randn(n, generator=g) * 1.5))  # variances over ~3 decades
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


@st.composite
def blocks(draw):
    c = draw(st.sampled_from([2, 4, 6]))
    c_out = draw(st.sampled_from([c, c, 2 * c]))
    stride = draw(st.sampled_from([1, 1, 2, 3]))
    dil = draw(st.sampled_from([1, 1, 2]))
    n = draw(st.integers(1, 3))
    extra = draw(st.integers(0, 1))  # the same extra padding on every branch keeps them aligned
    convs = []
    for _ in range(n):
        k = draw(st.sampled_from(KERNELS))
        shift = draw(st.sampled_from([(0, 0)] * 4 + [(1, 0), (0, 1), (1, 1), (-1, 0)]))  # misaligns
        pad = tuple(max(0, dil * (kk - 1) // 2 + extra + d) for kk, d in zip(k, shift))
        g = draw(st.sampled_from([d for d in divisors(c) if c_out % d == 0]))
        convs.append(nn.Conv2d(c, c_out, k, stride, pad, dil, groups=g, bias=draw(st.booleans())))
    bns = [draw(st.booleans()) for _ in convs]
    ids = draw(st.lists(st.sampled_from(["bn", "plain"]), max_size=2)) if c == c_out and stride == 1 else []
    assume(n + len(ids) >= 2)
    return Branches(convs, bns, ids), c, draw(st.integers(7, 12))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(block=blocks(), seed=st.integers(0, 2**16))
def test_any_summable_block_is_merged_exactly_or_left_unchanged(block, seed) -> None:
    """Whenever the eager sum runs, the pass either merges it to one exact conv (and it merges
    exactly when the kernels share a centre) or leaves it bit-identical with a reason."""
    model, c, hw = block
    model = randomize_bn(model, seed)
    x = torch.randn(2, c, hw, hw + 1)
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:
        assume(False)  # branch output shapes differ: not a valid sum at all
    convs = [m[0] if isinstance(m, nn.Sequential) else m for m in model.convs]
    geometry = [(cv.kernel_size, cv.padding) for cv in convs] + [((1, 1), (0, 0))] * len(model.ids)
    kernel = tuple(max(k[i] for k, _ in geometry) for i in range(2))
    try:  # the spec: every branch needs P = p + d (K - k) / 2 with K - k even
        centred = len({rm.aligned_padding(k, p, convs[0].dilation, kernel) for k, p in geometry}) == 1
    except ValueError:
        centred = False
    gm, report = reparameterize(model)
    with torch.no_grad():
        out = gm(x)
    event("merged" if centred else "left")
    if centred:
        assert len(report.merged) == 1 and not report.left, str(report)
        merged = gm.get_submodule(report.merged[0].module)
        assert merged.groups == math.gcd(*(cv.groups for cv in convs)) and merged.kernel_size == kernel
        assert sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in gm.modules()) == 1
        assert rel_err(out, ref) <= 1e-5
    else:
        assert not report.merged and len(report.left) == 1 and report.left[0].reason, str(report)
        assert torch.equal(out, ref)
