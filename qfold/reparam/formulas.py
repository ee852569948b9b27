"""Structural re-parameterization formulas (pure tensor math, no modules, no graphs).

A sum of convolutions that read the same input ``x``, share stride and dilation and whose
paddings line their kernels up on the same centre is one convolution (convolution is linear
in its weight)::

    sum_i conv(x; W_i, b_i, k_i, p_i) = conv(x; sum_i pad(W_i -> K), sum_i b_i, K, P)

    K = max_i k_i  (per spatial dim)      P = p_i + d * (K - k_i) / 2  (the same for every i)

``pad`` zero-pads a kernel symmetrically to ``K`` (so ``K - k_i`` must be even): the zero taps
read the extra padding rows and contribute nothing. A branch ``a * x + c`` (an identity
BatchNorm, or ``x`` itself with ``a = 1, c = 0``) is the convolution whose kernel has ``a`` at
the centre tap of input channel ``o mod (C / groups)`` for output channel ``o`` (stride 1 only).
A conv followed by eval BatchNorm folds first (``qfold.fold.formulas``). Branches of different
``groups`` merge at ``g = gcd(groups_i)`` by writing each grouped kernel block-diagonally into the
coarser grouping.

All arithmetic is float64; callers cast the result back.
References: Ding et al., "RepVGG: Making VGG-style ConvNets Great Again" (CVPR 2021), Sec. 3.3;
Ding et al., "ACNet: Strengthening the Kernel Skeletons" (ICCV 2019), Sec. 3.2 (additivity of
convolution for kernels sharing a centre).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qfold.fold.formulas import bn_affine, fold_affine_after


def centre_offset(kernel: Sequence[int], target: Sequence[int]) -> tuple[int, ...]:
    """Taps to add on each side of every spatial dim to grow ``kernel`` to ``target``, centred.

    Raises:
        ValueError: if a dim would shrink, or grows by an odd amount (no common centre).
    """
    if len(kernel) != len(target):
        raise ValueError(f"kernel {tuple(kernel)} and target {tuple(target)} have different ranks")
    offsets = []
    for k, t in zip(kernel, target):
        if t < k or (t - k) % 2:
            raise ValueError(
                f"kernel {tuple(kernel)} cannot be centred in {tuple(target)}: each dim must grow by an even number of taps"
            )
        offsets.append((t - k) // 2)
    return tuple(offsets)


def centre_pad(weight: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial dims of a conv ``weight`` ``(C_out, C_in/g, *k)`` to ``target``, centred."""
    off = centre_offset(weight.shape[2:], target)
    pads: list[int] = []
    for o in reversed(off):  # F.pad lists the last dim first
        pads += [o, o]
    return F.pad(weight, pads) if any(off) else weight


def aligned_padding(
    kernel: Sequence[int], padding: Sequence[int], dilation: Sequence[int], target: Sequence[int]
) -> tuple[int, ...]:
    """The padding ``P = p + d * (K - k) / 2`` a ``target``-sized kernel needs to see what ``kernel`` sees."""
    off = centre_offset(kernel, target)
    return tuple(p + d * o for p, d, o in zip(padding, dilation, off))


def identity_kernel(
    channels: int, kernel: Sequence[int], *, groups: int = 1, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Conv weight ``(C, C/groups, *kernel)`` (float64) computing ``scale * x`` per channel.

    ``kernel`` must be odd in every dim; the tap sits at the centre. ``scale`` (length ``C``)
    defaults to ones.
    """
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups")
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"an identity needs an odd kernel to have a centre, got {tuple(kernel)}")
    per_group = channels // groups
    w = torch.zeros(channels, per_group, *kernel, dtype=torch.float64)
    centre = tuple(k // 2 for k in kernel)
    a = torch.ones(channels, dtype=torch.float64) if scale is None else scale.detach().to(torch.float64)
    out_ch = torch.arange(channels)
    w[(out_ch, out_ch % per_group, *centre)] = a
    return w


def regroup(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """Rewrite a ``groups``-grouped conv weight as an equivalent ``new_groups``-grouped one.

    ``new_groups`` must divide ``groups``: each coarse group holds ``groups / new_groups`` fine
    groups on its block diagonal, zeros elsewhere.
    """
    if groups == new_groups:
        return weight
    if new_groups <= 0 or groups % new_groups:
        raise ValueError(f"cannot regroup a groups={groups} kernel as groups={new_groups}: it must divide {groups}")
    c_out, in_per_group = weight.shape[0], weight.shape[1]
    ratio = groups // new_groups
    out_per_group = c_out // groups
    out = weight.new_zeros(c_out, in_per_group * ratio, *weight.shape[2:])
    for g in range(groups):  # fine group g lands in coarse group g // ratio, column block g % ratio
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        col = (g % ratio) * in_per_group
        out[rows, col : col + in_per_group] = weight[rows]
    return out


def fold_bn_into_branch(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor, eps: float,
                        gamma: torch.Tensor | None, beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval BatchNorm that follows a conv branch: float64 ``(W * a, b * a + c)``."""
    a, c = bn_affine(mean, var, eps, gamma, beta)
    return fold_affine_after(weight.detach().to(torch.float64), None if bias is None else bias.to(torch.float64), a, c)


def sum_branches(
    branches: Sequence[tuple[torch.Tensor, torch.Tensor | None, int]],
    kernel: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(weight, bias, groups)`` branches into one float64 ``(weight, bias)``.

    Each weight is regrouped to ``groups`` and centre-padded to ``kernel``; weights and biases
    are summed in the given order (deterministic).
    """
    if not branches:
        raise ValueError("sum_branches needs at least one branch")
    w_sum: torch.Tensor | None = None
    b_sum: torch.Tensor | None = None
    for w, b, g in branches:
        w = centre_pad(regroup(w.detach().to(torch.float64), g, groups), kernel)
        b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().to(torch.float64)
        if w_sum is not None and w.shape != w_sum.shape:
            raise ValueError(f"branch weights {tuple(w.shape)} and {tuple(w_sum.shape)} do not merge")
        w_sum = w if w_sum is None else w_sum + w
        b_sum = b if b_sum is None else b_sum + b
    assert w_sum is not None and b_sum is not None
    return w_sum, b_sum
