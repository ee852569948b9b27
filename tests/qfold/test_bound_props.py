"""Property tests for ReLU bounding: random producer/consumer layer pairs, histogram quantiles,
weight rescaling and scale guards (qfold.bound, qfold.bound.formulas)."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfold.bound import formulas as bm
from qfold.bound.passes import bound_relu

pytestmark = pytest.mark.usefixtures("one_thread")


BETWEEN = ("none", "maxpool", "avgpool", "adaptive", "zeropad", "upsample", "flatten")


class Pair(nn.Module):
    def __init__(self, prod: nn.Module, between: str, cons: nn.Module) -> None:
        super().__init__()
        self.prod, self.between, self.cons = prod, between, cons

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.prod(x))
        b = self.between
        if b == "maxpool":
            y = F.max_pool2d(y, 2)
        elif b == "avgpool":
            y = nn.functional.avg_pool2d(y, 2, ceil_mode=True)
        elif b == "adaptive":
            y = F.adaptive_avg_pool2d(y, 3)
        elif b == "zeropad":
            y = F.pad(y, (1, 2, 0, 1))
        elif b == "upsample":
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        elif b == "flatten":
            y = torch.flatten(y, 1)
        return self.cons(y)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    c_in = draw(st.sampled_from([1, 2, 4]))
    c_mid = draw(st.sampled_from([2, 4, 6]))
    dw = draw(st.booleans())
    if dw:
        c_in = c_mid
    k = draw(st.sampled_from([1, 3, 5]))
    if draw(st.booleans()):
        prod = nn.Conv2d(c_in, c_mid, k, padding=k // 2, groups=c_mid if dw else 1, bias=draw(st.booleans()))
    else:
        g = draw(st.sampled_from([1, 2])) if c_in % 2 == 0 and c_mid % 2 == 0 else 1
        prod = nn.ConvTranspose2d(c_in, c_mid, k, padding=k // 2, groups=c_mid if dw else g)
    between = draw(st.sampled_from(BETWEEN))
    hw = 6
    if between == "flatten":
        cons: nn.Module = nn.Linear(c_mid * hw * hw, 3)
    elif draw(st.booleans()):
        kc = draw(st.sampled_from([1, 3]))
        gc = draw(st.sampled_from([g for g in (1, 2, c_mid) if c_mid % g == 0]))
        mode = draw(st.sampled_from(["zeros", "reflect"]))
        cons = nn.Conv2d(c_mid, 2 * gc, kc, padding=kc // 2, groups=gc, padding_mode=mode)
    else:
        gc = draw(st.sampled_from([1, c_mid]))
        cons = nn.ConvTranspose2d(c_mid, gc, 3, padding=1, groups=gc)
    model = Pair(prod, between, cons)
    gain = draw(st.sampled_from([0.5, 3.0, 10.0]))
    with torch.no_grad():
        for p in prod.parameters():
            p.mul_(gain)
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(6, c_in, hw, hw, generator=torch.Generator().manual_seed(seed))
    return model.eval(), x


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs())
def test_preserve_keeps_the_function_for_any_layer_pair(case: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = case
    gm, rep = bound_relu(model, x, quantile=1.0, config=None)
    assert rep.preserved == 1, rep.sites[0].reason
    assert rep.sites[0].clipped == 0.0
    with torch.no_grad():
        ref, out = model(x), gm(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * (1 + float(ref.abs().max())))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 300), st.lists(st.integers(0, 300), max_size=4), st.floats(0.01, 1e4), st.integers(0, 2**16))
def test_histogram_counts_do_not_depend_on_batching(c: int, m: int, cuts: list[int], spread: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, m, generator=g, dtype=torch.float64) * spread * torch.rand(c, 1, generator=g, dtype=torch.float64)
    whole = bm.hist_update(bm.hist_empty(c, 64), x)
    h = bm.hist_empty(c, 64)
    edges = sorted({0, m, *[min(t, m) for t in cuts]})
    for a, b in pairwise(edges):
        h = bm.hist_update(h, x[:, a:b])
    assert torch.equal(h.counts, whole.counts) and torch.equal(h.hi, whole.hi) and torch.equal(h.maxv, whole.maxv)
    assert h.n == whole.n == m and int(h.counts.sum()) == c * m


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 500), st.floats(0.5, 1.0), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_histogram_quantile_brackets_the_exact_quantile(c: int, m: int, q: float, spread: float, seed: int) -> None:
    x = torch.randn(c, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread
    h = bm.hist_update(bm.hist_empty(c, 256), x)
    got = bm.hist_quantile(h, q)
    rank = max(1, min(m, -(-round(q * m * 1e9) // 10**9)))  # ceil(q*m) without float noise
    exact = x.clamp_min(0).sort(dim=1).values[:, rank - 1]
    assert torch.all(got >= exact - 1e-12)
    assert torch.all(got <= exact + h.hi / h.bins + 1e-12)
    assert torch.equal(bm.hist_quantile(h, 1.0), x.clamp_min(0).amax(dim=1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-9, 1e9)), min_size=1, max_size=8))
def test_scales_are_finite_positive_and_map_q_to_the_cap(qs: list[float]) -> None:
    q = torch.tensor(qs, dtype=torch.float64)
    s = bm.relu6_scales(q, max_scale=1e6)
    assert torch.all(torch.isfinite(s)) and torch.all(s > 0) and torch.all(s <= 1e6)
    for qi, si in zip(q.tolist(), s.tolist()):
        if qi == 0:
            assert si == 1.0
        elif 6.0 / qi < 1e6:
            assert si * qi * (1 + bm.HEADROOM) == pytest.approx(6.0, rel=1e-12)


def test_scale_guards_reject_bad_quantiles() -> None:
    with pytest.raises(ValueError, match="finite"):
        bm.relu6_scales(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="finite"):
        bm.relu6_scales(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="power of two"):
        bm.hist_empty(2, 100)
    with pytest.raises(ValueError, match="NaN or inf"):
        bm.hist_update(bm.hist_empty(1, 8), torch.tensor([[float("inf")]]))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["conv", "convT", "linear"]),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([1, 3]),
    st.integers(0, 2**16),
)
def test_rescale_weight_matches_scaling_inputs_and_outputs(kind: str, groups: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c_in, c_out = 4, 8
    if kind == "linear":
        groups = 1
        layer: nn.Module = nn.Linear(c_in, c_out)
        x = torch.randn(5, c_in, generator=g)
    elif kind == "conv":
        layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups)
        x = torch.randn(2, c_in, 5, 5, generator=g)
    else:
        layer = nn.ConvTranspose2d(c_in, c_out, k, padding=k // 2, groups=groups)
        x = torch.randn(2, c_in, 5, 5, generator=g)
    s_in = torch.rand(c_in, generator=g, dtype=torch.float64) * 4 + 0.1
    s_out = torch.rand(c_out, generator=g, dtype=torch.float64) * 4 + 0.1
    shape = [1, -1] + [1] * (x.ndim - 2)
    with torch.no_grad():
        ref = layer(x) * s_out.float().reshape(shape)
        w, b = bm.rescale_weight(layer.weight, layer.bias, out_scale=s_out, in_scale=s_in, groups=groups, transposed=kind == "convT")
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        out = layer(x * s_in.float().reshape(shape))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
