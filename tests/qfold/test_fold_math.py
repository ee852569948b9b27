"""qfold.fold.formulas: golden values, torch's own fusion as a cross-check, and property tests over layouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from qfold.fold.formulas import bn_affine, fold_affine_after, fold_affine_before

D = torch.float64


def _stats(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    mean = torch.randn(n, generator=gen, dtype=D)
    var = torch.exp(torch.empty(n, dtype=D).uniform_(-3, 1.5, generator=gen))
    gamma = torch.randn(n, generator=gen, dtype=D)
    gamma[0] = 0.0
    beta = torch.randn(n, generator=gen, dtype=D)
    return mean, var, gamma, beta


def test_bn_affine_golden() -> None:
    # a = gamma / sqrt(var + eps) = 4 / sqrt(3 + 1) = 2 ; c = beta - mean * a = 0.5 - 1 * 2 = -1.5
    a, c = bn_affine(torch.tensor([1.0]), torch.tensor([3.0]), 1.0, torch.tensor([4.0]), torch.tensor([0.5]))
    assert a.dtype == D and a.tolist() == [2.0] and c.tolist() == [-1.5]
    # affine=False: gamma = 1, beta = 0 -> a = 1/2, c = -1/2
    a, c = bn_affine(torch.tensor([1.0]), torch.tensor([3.0]), 1.0, None, None)
    assert a.tolist() == [0.5] and c.tolist() == [-0.5]


def test_fold_after_golden() -> None:
    # W' = W * a = 3 * 2 = 6 ; b' = b * a + c = 1 * 2 - 1.5 = 0.5
    w, b = fold_affine_after(torch.tensor([[3.0]]), torch.tensor([1.0]), torch.tensor([2.0], dtype=D), torch.tensor([-1.5], dtype=D))
    assert w.tolist() == [[6.0]] and b.tolist() == [0.5] and w.dtype == torch.float32
    w, b = fold_affine_after(torch.tensor([[3.0]]), None, torch.tensor([2.0], dtype=D), torch.tensor([-1.5], dtype=D))
    assert b.tolist() == [-1.5]


def test_bn_affine_matches_batch_norm_eval() -> None:
    gen = torch.Generator().manual_seed(1)
    mean, var, gamma, beta = _stats(7, gen)
    x = torch.randn(4, 7, 3, generator=gen, dtype=D)
    a, c = bn_affine(mean, var, 1e-3, gamma, beta)
    ref = F.batch_norm(x, mean, var, gamma, beta, False, 0.0, 1e-3)
    torch.testing.assert_close(a.view(1, -1, 1) * x + c.view(1, -1, 1), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch_fuse_conv_bn_weights(transpose: bool, bias: bool) -> None:
    """Where torch's own utility applies (groups=1), both give the same weights."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=gen)  # Conv (C_out=6, C_in=4) or ConvT (C_in=6, C_out=4)
    n_out = 4 if transpose else 6
    b = torch.randn(n_out, generator=gen) if bias else None
    mean, var, gamma, beta = (t.float() for t in _stats(n_out, gen))
    ref_w, ref_b = fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta, transpose=transpose)
    a, c = bn_affine(mean, var, 1e-5, gamma, beta)
    got_w, got_b = fold_affine_after(w, b, a, c, out_axis=1 if transpose else 0)
    torch.testing.assert_close(got_w, ref_w.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_b, ref_b.detach(), rtol=1e-6, atol=1e-6)


def test_matches_torch_fuse_linear_bn_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
    mean, var, gamma, beta = (t.float() for t in _stats(5, gen))
    ref_w, ref_b = fuse_linear_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
    got_w, got_b = fold_affine_after(w, b, *bn_affine(mean, var, 1e-5, gamma, beta))
    torch.testing.assert_close(got_w, ref_w.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_b, ref_b.detach(), rtol=1e-6, atol=1e-6)


def test_grouped_conv_transpose_axis() -> None:
    """groups=2 ConvTranspose: the scale runs along axis 1 group by group (torch's utility cannot do this)."""
    gen = torch.Generator().manual_seed(4)
    groups, c_in, c_out = 2, 4, 6
    w = torch.randn(c_in, c_out // groups, 3, generator=gen, dtype=D)
    b = torch.randn(c_out, generator=gen, dtype=D)
    mean, var, gamma, beta = _stats(c_out, gen)
    x = torch.randn(2, c_in, 5, generator=gen, dtype=D)
    ref = F.batch_norm(F.conv_transpose1d(x, w, b, groups=groups), mean, var, gamma, beta, False, 0.0, 1e-5)
    w2, b2 = fold_affine_after(w, b, *bn_affine(mean, var, 1e-5, gamma, beta), out_axis=1, groups=groups)
    torch.testing.assert_close(F.conv_transpose1d(x, w2, b2, groups=groups), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError):  # torch's transpose path broadcasts C_out over C_out/groups and fails
        fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta, transpose=True)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    groups=st.integers(1, 3),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    dims=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_before_matches_conv_of_bn(groups: int, cin_g: int, cout_g: int, dims: int, bias: bool, seed: int) -> None:
    """conv(bn(x)) == conv'(x) for unpadded convs of any groups and rank."""
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = groups * cin_g, groups * cout_g
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    w = torch.randn(c_out, cin_g, *([2] * dims), generator=gen, dtype=D)
    b = torch.randn(c_out, generator=gen, dtype=D) if bias else None
    mean, var, gamma, beta = _stats(c_in, gen)
    x = torch.randn(2, c_in, *([3] * dims), generator=gen, dtype=D)
    ref = conv(F.batch_norm(x, mean, var, gamma, beta, False, 0.0, 1e-5), w, b, groups=groups)
    w2, b2 = fold_affine_before(w, b, *bn_affine(mean, var, 1e-5, gamma, beta), groups=groups)
    torch.testing.assert_close(conv(x, w2, b2, groups=groups), ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    groups=st.integers(1, 3),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    dims=st.integers(1, 3),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_after_matches_bn_of_conv(groups: int, cin_g: int, cout_g: int, dims: int, transpose: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = groups * cin_g, groups * cout_g
    k = [2] * dims
    if transpose:
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        w = torch.randn(c_in, cout_g, *k, generator=gen, dtype=D)
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        w = torch.randn(c_out, cin_g, *k, generator=gen, dtype=D)
    mean, var, gamma, beta = _stats(c_out, gen)
    x = torch.randn(2, c_in, *([3] * dims), generator=gen, dtype=D)
    ref = F.batch_norm(conv(x, w, None, groups=groups), mean, var, gamma, beta, False, 0.0, 1e-5)
    w2, b2 = fold_affine_after(w, None, *bn_affine(mean, var, 1e-5, gamma, beta), out_axis=int(transpose), groups=groups)
    torch.testing.assert_close(conv(x, w2, b2, groups=groups), ref, rtol=1e-10, atol=1e-10)


def test_float64_arithmetic_survives_fp16_overflow() -> None:
    """running_var above fp16's max (65504) must not turn into inf when the layer is fp16."""
    w = torch.ones(2, 1, dtype=torch.float16)
    mean = torch.tensor([0.0, 1.0])
    var = torch.tensor([1e6, 4e6])  # 1/sqrt(var) = 1e-3, 5e-4
    w2, b2 = fold_affine_after(w, None, *bn_affine(mean, var, 0.0, None, None))
    assert w2.dtype == torch.float16 and torch.isfinite(w2).all() and torch.isfinite(b2).all()
    torch.testing.assert_close(w2.float(), torch.tensor([[1e-3], [5e-4]]), rtol=1e-3, atol=0)


def test_shape_errors_name_the_cause() -> None:
    a, c = torch.ones(3, dtype=D), torch.zeros(3, dtype=D)
    with pytest.raises(ValueError, match="weight has 4 output channels, the affine has 3"):
        fold_affine_after(torch.ones(4, 2), None, a, c)
    with pytest.raises(ValueError, match="groups=2 does not have 3 output channels"):
        fold_affine_after(torch.ones(4, 2, 3), None, a, c, out_axis=1, groups=2)
    with pytest.raises(ValueError, match="out_axis must be 0 or 1"):
        fold_affine_after(torch.ones(3, 2), None, a, c, out_axis=2)
    with pytest.raises(ValueError, match="does not read 3 input channels"):
        fold_affine_before(torch.ones(4, 2, 1), None, a, c)
