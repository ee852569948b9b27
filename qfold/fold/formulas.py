"""BatchNorm folding formulas (pure tensor math, no modules).

Eval-mode BatchNorm is a per-channel affine map ``y = a * x + c`` with::

    a = gamma / sqrt(var + eps)
    c = beta - mean * a

Folding it into the layer before it (output channel axis ``axis`` of the weight)::

    W' = W * a   (broadcast along the output-channel axis)
    b' = (b - mean) * a + beta = b * a + c

Folding a BN *before* a layer (its input channels), exact when the layer pads with zeros only
if it does not pad at all (padding a shifted input is not the same as shifting a padded one)::

    W' = W * a   (broadcast along the input-channel axis)
    b' = b + sum_{in, k} W * c

All arithmetic is float64; results are cast back to the layer's dtype.
Reference: torch.nn.utils.fusion.fuse_conv_bn_weights (same formula, without the axis logic).
"""
from __future__ import annotations

import torch


def bn_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(a, c)`` in float64 such that ``bn(x) = a * x + c`` per channel.

    ``gamma``/``beta`` may be None (``affine=False``), meaning 1 and 0.

    >>> a, c = bn_affine(torch.tensor([1.0]), torch.tensor([4.0]), 0.0, torch.tensor([2.0]), torch.tensor([3.0]))
    >>> a.item(), c.item()   # 2 / sqrt(4) = 1; 3 - 1 * 1 = 2
    (1.0, 2.0)
    """
    mean = mean.detach().to(torch.float64)
    var = var.detach().to(torch.float64)
    a = torch.rsqrt(var + eps)
    if gamma is not None:
        a = a * gamma.detach().to(torch.float64)
    c = -mean * a
    if beta is not None:
        c = c + beta.detach().to(torch.float64)
    return a, c


def _broadcast(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def fold_affine_after(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    c: torch.Tensor,
    *,
    out_axis: int = 0,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``y -> a*y + c`` applied to a layer's output into its weight and bias.

    Args:
        weight: the layer weight; Conv/Linear ``(C_out, ...)`` with ``out_axis=0``,
            ConvTranspose ``(C_in, C_out/groups, ...)`` with ``out_axis=1``.
        bias: the layer bias or None (a bias is synthesized).
        a, c: per-output-channel affine of length ``C_out`` (float64).
        out_axis: the weight axis that indexes output channels (within a group).
        groups: for ``out_axis=1`` (ConvTranspose), the weight's dim 0 holds the groups: output
            channel ``g*(C_out/groups) + j`` lives at ``weight[g*(C_in/groups):(g+1)*..., j]``.

    Returns:
        ``(weight', bias')`` in the dtype of ``weight``.
    """
    dtype = weight.dtype
    w = weight.detach().to(torch.float64)
    n_out = a.numel()
    if out_axis == 0:
        if w.shape[0] != n_out:
            raise ValueError(f"weight has {w.shape[0]} output channels, the affine has {n_out}")
        w = w * _broadcast(a, w.ndim, 0)
    elif out_axis == 1:
        per_group = w.shape[1]
        if per_group * groups != n_out or w.shape[0] % groups:
            raise ValueError(
                f"ConvTranspose weight {tuple(w.shape)} with groups={groups} does not have {n_out} output channels"
            )
        in_per_group = w.shape[0] // groups
        w = w.reshape(groups, in_per_group, per_group, *w.shape[2:])
        a_g = a.reshape(groups, 1, per_group, *([1] * (w.ndim - 3)))
        w = (w * a_g).reshape(weight.shape)
    else:
        raise ValueError(f"out_axis must be 0 or 1, got {out_axis}")
    b = torch.zeros(n_out, dtype=torch.float64, device=w.device) if bias is None else bias.detach().to(torch.float64)
    b = b * a + c
    return w.to(dtype), b.to(dtype)


def fold_affine_before(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, c: torch.Tensor, *,
                       groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``x -> a*x + c`` applied to a Conv/Linear *input* into its weight and bias.

    Only exact for layers without padding (Linear, or Conv with zero padding): each output then
    sees every shifted input through the full kernel, so the shift becomes a constant bias.
    ``weight`` is ``(C_out, C_in/groups, k...)``; ``a``, ``c`` have length ``C_in``.
    """
    dtype = weight.dtype
    w = weight.detach().to(torch.float64)
    c_out, in_per_group = w.shape[0], w.shape[1]
    if in_per_group * groups != a.numel():
        raise ValueError(f"weight {tuple(w.shape)} with groups={groups} does not read {a.numel()} input channels")
    out_per_group = c_out // groups
    a_g = a.reshape(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group).reshape(c_out, in_per_group)
    c_g = c.reshape(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group).reshape(c_out, in_per_group)
    extra = [1] * (w.ndim - 2)
    w_new = w * a_g.reshape(c_out, in_per_group, *extra)
    shift = (w * c_g.reshape(c_out, in_per_group, *extra)).reshape(c_out, -1).sum(dim=1)
    b = torch.zeros(c_out, dtype=torch.float64, device=w.device) if bias is None else bias.detach().to(torch.float64)
    return w_new.to(dtype), (b + shift).to(dtype)
