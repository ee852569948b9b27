"""QAT arithmetic: BatchNorm folding simulated while training, and the LSQ fake quantizer.

Pure tensor functions (no modules, no state). Everything is differentiable where it should be.

**Simulated BN fold** (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", sec. 3.2 and fig. C.8; single-pass form of
``torch.ao.nn.intrinsic.qat._ConvBnNd``). Per output channel ``c``::

    sf_c = gamma_c / sqrt(running_var_c + eps)               (fold scale)
    W'_c = W_c * sf_c                                        (the weight the engine runs)
    b'_c = (b_c - running_mean_c) * sf_c + beta_c            (the bias the engine runs)

While BN statistics are live (training, not frozen) the layer computes, with ``u = conv(x, fq(W'))``::

    z = u / sf + b                 (~ conv(x, W) + b, what the float BN would see)
    y = gamma * (z - mean_B(z)) / sqrt(var_B(z) + eps) + beta
      = (sigma_run / sigma_B) * u + beta + gamma * (b - mean_B(z)) / sigma_B

i.e. the quantized folded conv, corrected to batch statistics by ``sigma_run / sigma_B`` (Jacob et
al.'s correction). Once statistics are frozen (or in eval mode) ``y = u + b'`` exactly: the
network the engine runs.

**LSQ fake quantization** (Esser et al. 2020, "Learned Step Size Quantization", eqs. 1-3), here
parameterised by ``amax`` (``s = amax / qmax``)::

    y = clamp(round_half_even(x / s), qmin, qmax) * s
    dy/dx    = 1 inside [qmin*s, qmax*s], 0 outside                      (straight-through)
    dy/damax = (round(x/s) - x/s) / qmax inside, qmin/qmax below, 1 above (times grad scale g)
    g = 1 / sqrt(numel(x) * qmax)

The forward value equals ``torch.fake_quantize_per_tensor_affine`` (round half to even).
"""
from __future__ import annotations

import torch


def fold_scale(gamma: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``sf = gamma / sqrt(running_var + eps)``; ``gamma`` None (``affine=False``) means 1."""
    inv = torch.rsqrt(running_var + eps)
    return inv if gamma is None else gamma * inv


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape([-1] + [1] * (ndim - 1))


def fold_weight(weight: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """``W' = W * sf`` along output-channel axis 0 (Conv weights ``(C_out, C_in/groups, k...)``)."""
    return weight * _per_channel(sf, weight.ndim)


def fold_bias(
    bias: torch.Tensor | None, running_mean: torch.Tensor, sf: torch.Tensor, beta: torch.Tensor | None
) -> torch.Tensor:
    """``b' = (b - running_mean) * sf + beta`` (``b``/``beta`` None mean 0)."""
    b = -running_mean if bias is None else bias - running_mean
    out = b * sf
    return out if beta is None else out + beta


def safe_divisor(sf: torch.Tensor) -> torch.Tensor:
    """``sf`` with exact zeros (gamma == 0: a dead channel) replaced by 1, so ``u / sf`` is finite.

    Such a channel's output is ``beta`` whatever its input, so the value divided does not matter.
    """
    return torch.where(sf == 0, torch.ones_like(sf), sf)


def add_channel_bias(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``u + bias`` broadcast over the channel axis 1 of an ``(N, C, ...)`` activation."""
    return u + bias.reshape([1, -1] + [1] * (u.ndim - 2))


def divide_channels(u: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """``u / sf`` per channel (axis 1) of an ``(N, C, ...)`` activation."""
    return u / sf.reshape([1, -1] + [1] * (u.ndim - 2))


def scale_grad(t: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``t``, gradient multiplied by ``g`` (LSQ's gradient scaling)."""
    tg = t * g
    return (t - tg).detach() + tg


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round_half_even(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def lsq_fake_quant(x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int, min_amax: float = 1e-8) -> torch.Tensor:
    """LSQ fake quantization of ``x`` (float32) with learnable per-tensor ``amax`` (see module doc).

    ``amax`` is clamped to ``min_amax`` so a step can never make the scale zero or negative.
    """
    g = 1.0 / float(x.numel() * qmax) ** 0.5
    s = scale_grad(amax.clamp(min=min_amax), g) / qmax
    v = torch.clamp(x * torch.reciprocal(s), qmin, qmax)
    return round_ste(v) * s


def ema(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """Exponential moving average ``(1 - momentum) * old + momentum * new``."""
    return old * (1.0 - momentum) + new * momentum
