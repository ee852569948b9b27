"""Pure math for bounding ReLU to ReLU6 without changing the function.

**Why a rescale preserves the function.** ReLU is positively homogeneous: ``relu(s*x) = s*relu(x)``
for ``s > 0``. Multiply output channel ``c`` of the producer (weight rows and bias) by ``s_c`` and
divide the consumers' matching input channel by ``s_c``; every op in between that commutes with a
positive per-channel scale (max/avg pooling, zero padding, flatten, concat) passes the scale
through, so the network computes the same function (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", section 4.1, the same identity used by
cross-layer equalization). Then ``relu6(s_c*x) = s_c * min(relu(x), 6/s_c)``: the ReLU6 clips
channel ``c`` at ``6/s_c`` in the original units.

**Scale choice.** ``s_c = 6 / q_c`` with ``q_c`` a high quantile of channel ``c``'s pre-activation
on calibration data, so the cap ``6/s_c = q_c`` lies above all but a ``1 - quantile`` fraction of
the real activations (times ``1 + HEADROOM``, ``HEADROOM = 2**-14``: float32 rounding of the
rescaled convolution can otherwise put a channel's maximum a few ulps above 6). Guards: a dead channel (``q_c = 0``, never positive) keeps ``s_c = 1``; ``s_c``
never exceeds ``max_scale`` (a nearly dead channel would otherwise blow up the producer's weights
and underflow the consumer's).

**Streaming per-channel quantiles.** A fixed number ``B`` (a power of two) of equal bins per
channel over ``[0, hi_c)``, with ``hi_c`` the smallest power of two strictly above the channel's
running maximum. When a batch raises the maximum, ``hi_c`` doubles ``k`` times and every ``2**k``
adjacent bins merge into one. Because ``hi_c`` is a power of two, ``x * (B / hi_c)`` is exact in
floating point and ``floor(x*B/(2*hi)) == floor(floor(x*B/hi)/2)``, so the counts do not depend on
how the data were split into batches (bit-identical, deterministic). The quantile is the upper edge
of the bin holding the rank-``ceil(quantile*N)`` value, capped at the exact running maximum: never
below the exact quantile, at most one bin width ``hi_c/B <= 2*max_c/B`` above it, and exactly the
maximum for ``quantile = 1``. Negative pre-activations count as zeros (ReLU maps them there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RELU6_CAP = 6.0
HEADROOM = 2.0**-14  # relative margin of the cap above q_c, far above float32 rounding (2**-24)


@dataclass(frozen=True)
class ChannelHistogram:
    """Per-channel counts of ``relu(x)`` over ``[0, hi_c)`` in ``bins`` equal bins.

    Attributes:
        counts: ``(C, bins)`` int64 counts.
        hi: ``(C,)`` float64 upper range per channel, a power of two, or 0 while all values are 0.
        maxv: ``(C,)`` float64 exact running maximum of ``relu(x)``.
        n: number of values seen per channel.
    """

    counts: torch.Tensor
    hi: torch.Tensor
    maxv: torch.Tensor
    n: int

    @property
    def bins(self) -> int:
        return self.counts.shape[1]

    @property
    def channels(self) -> int:
        return self.counts.shape[0]


def hist_empty(channels: int, bins: int = 2048) -> ChannelHistogram:
    """An empty histogram; ``bins`` must be a power of two."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if bins < 2 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two >= 2, got {bins}")
    z = torch.zeros(channels, dtype=torch.float64)
    return ChannelHistogram(torch.zeros(channels, bins, dtype=torch.int64), z, z.clone(), 0)


def channels_first(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """``x`` as a ``(C, M)`` float64 matrix, one row per channel along ``axis``."""
    x = x.detach()
    return x.movedim(axis, 0).reshape(x.shape[axis], -1).to(torch.float64)


def _pow2_above(v: torch.Tensor) -> torch.Tensor:
    """Smallest power of two strictly greater than ``v`` (0 where ``v == 0``)."""
    _, exp = torch.frexp(v)  # v = mant * 2**exp, mant in [0.5, 1) => 2**(exp-1) <= v < 2**exp
    return torch.where(v > 0, torch.ldexp(torch.ones_like(v), exp), torch.zeros_like(v))


def _merge_bins(counts: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of ``counts`` after the range doubles ``k`` times (adjacent ``2**k`` bins summed)."""
    bins = counts.shape[1]
    if k <= 0:
        return counts
    group = min(1 << k, bins)
    merged = counts.reshape(counts.shape[0], bins // group, group).sum(dim=2)
    out = torch.zeros_like(counts)
    out[:, : merged.shape[1]] = merged
    return out


def hist_update(h: ChannelHistogram, x: torch.Tensor, axis: int = 0) -> ChannelHistogram:
    """Add the values of ``x`` (any sign) to ``h``; ``x`` has the ``C`` channels along ``axis``.

    ``(C, M)`` with ``axis=0`` (see :func:`channels_first`), or an activation as it comes, e.g.
    ``(N, C, H, W)`` with ``axis=1``, which saves the transposed copy. The counts depend only on
    the values per channel, not on the layout or the order they arrive in.
    """
    if x.ndim < 1 or not -x.ndim <= axis < x.ndim or x.shape[axis] != h.channels:
        raise ValueError(f"expected {h.channels} channels along axis {axis}, got shape {tuple(x.shape)}")
    axis %= x.ndim
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float64)
    per_channel = x.numel() // h.channels if h.channels else 0
    if per_channel == 0:
        return h
    others = tuple(d for d in range(x.ndim) if d != axis)
    bmax = (x.amax(dim=others) if others else x).to(torch.float64).clamp_min(0.0)  # NaN and +inf propagate
    if not bool(torch.isfinite(bmax).all()):
        raise ValueError("pre-activations contain NaN or inf; check the model and the calibration data")
    maxv = torch.maximum(h.maxv, bmax)
    hi = torch.maximum(h.hi, _pow2_above(maxv))
    counts = h.counts.clone()
    grown = (h.hi > 0) & (hi > h.hi)
    if bool(grown.any()):
        ks = torch.round(torch.log2(hi[grown] / h.hi[grown])).to(torch.int64)
        rows = grown.nonzero().flatten()
        for k in sorted(set(ks.tolist())):
            sel = rows[ks == k]
            counts[sel] = _merge_bins(counts[sel], k)
    bins = h.bins
    mult = torch.where(hi > 0, bins / torch.where(hi > 0, hi, torch.ones_like(hi)), torch.zeros_like(hi))
    shape = [1] * x.ndim
    shape[axis] = h.channels
    if not (x.dtype == torch.float32 and bool(((mult >= 2.0**-126) & (mult <= 2.0**126) | (mult == 0)).all())):
        x = x.to(torch.float64)
    # mult is a power of two (a normal float32 on the float32 path), so x * mult is exact; after
    # clamping negatives to 0, x * mult < bins and truncation is the floor: the bin of relu(x)
    scaled = (x * mult.to(x.dtype).view(shape)).clamp_min_(0.0)
    itype = torch.int32 if h.channels * bins < 2**31 else torch.int64
    # bincount wants each channel's indices together: channels-last order scatters every run of C
    # values over C histograms (2.4x slower), so the conversion to integers also writes them in
    # channel-major (contiguous) order, one pass for both
    idx = torch.empty(scaled.shape, dtype=itype).copy_(scaled)
    del scaled
    idx += (torch.arange(h.channels, dtype=itype) * bins).view(shape)
    # added in place: bincount's minlength-sized result and the sum with it cost three passes over
    # C x bins counters, which at 7x7 maps (few values per channel) outweighs the values themselves
    counts.view(-1).index_add_(0, idx.reshape(-1), torch.ones((), dtype=counts.dtype).expand(idx.numel()))
    return ChannelHistogram(counts, hi, maxv, h.n + per_channel)


def hist_quantile(h: ChannelHistogram, quantile: float) -> torch.Tensor:
    """Per-channel ``quantile`` of ``relu(x)`` (float64, ``(C,)``), never below the exact one.

    The rank-``ceil(quantile*N)`` value's bin upper edge, capped at the exact maximum.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if h.n == 0:
        raise ValueError("the histogram is empty: no calibration values were seen")
    rank = min(max(math.ceil(quantile * h.n - 1e-9 * h.n), 1), h.n)
    cum = h.counts.cumsum(dim=1)
    b = torch.searchsorted(cum, torch.full((h.channels, 1), rank, dtype=torch.int64)).flatten()
    upper = (b.to(torch.float64) + 1.0) * h.hi / h.bins
    return torch.minimum(upper, h.maxv)


def relu6_scales(q: torch.Tensor, *, cap: float = RELU6_CAP, max_scale: float = 1e6) -> torch.Tensor:
    """Per-channel scales ``s_c = cap / (q_c * (1 + HEADROOM))`` (float64), ``1`` for dead
    channels (``q_c = 0``), at most ``max_scale``.

    >>> [round(v, 3) for v in relu6_scales(torch.tensor([12.0, 3.0, 0.0])).tolist()]
    [0.5, 2.0, 1.0]
    """
    q = q.detach().to(torch.float64)
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError(f"quantiles must be finite and >= 0, got {q.tolist()}")
    if not (cap > 0 and max_scale >= 1):
        raise ValueError(f"need cap > 0 and max_scale >= 1, got cap={cap}, max_scale={max_scale}")
    s = torch.where(q > 0, cap / (torch.where(q > 0, q, torch.ones_like(q)) * (1.0 + HEADROOM)), torch.ones_like(q))
    return s.clamp(max=max_scale)


def rescale_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_scale: torch.Tensor | None = None,
    in_scale: torch.Tensor | None = None,
    groups: int = 1,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of a Conv/ConvTranspose/Linear whose output channel ``o`` is multiplied
    by ``out_scale[o]`` and whose input channel ``i`` arrives multiplied by ``in_scale[i]``::

        W'[o, i, ...] = W[o, i, ...] * out_scale[o] / in_scale[i]      b'[o] = b[o] * out_scale[o]

    Layouts: Conv/Linear weight ``(C_out, C_in/groups, k...)``; ConvTranspose ``(C_in, C_out/groups,
    k...)``, where output channel ``g*(C_out/groups) + j`` is ``weight[g*(C_in/groups):..., j]``.
    Computed in float64, returned in the weight's dtype (a ``None`` bias stays ``None``).
    """
    dtype = weight.dtype
    w = weight.detach().to(torch.float64)
    extra = [1] * (w.ndim - 2)
    if transposed:
        c_in, out_pg = w.shape[0], w.shape[1]
        in_pg = c_in // groups
        c_out = out_pg * groups
    else:
        c_out, in_pg = w.shape[0], w.shape[1]
        out_pg = c_out // groups
        c_in = in_pg * groups
    if out_scale is not None:
        o = out_scale.detach().to(torch.float64)
        if o.numel() != c_out:
            raise ValueError(f"out_scale has {o.numel()} entries, the layer has {c_out} output channels")
        if transposed:  # (groups, in_pg, out_pg, k...) * o[g, j]
            w = (w.reshape(groups, in_pg, out_pg, *w.shape[2:]) * o.reshape(groups, 1, out_pg, *extra)).reshape(w.shape)
        else:
            w = w * o.reshape(c_out, 1, *extra)
    if in_scale is not None:
        i = in_scale.detach().to(torch.float64)
        if i.numel() != c_in:
            raise ValueError(f"in_scale has {i.numel()} entries, the layer reads {c_in} input channels")
        if transposed:
            w = w / i.reshape(c_in, 1, *extra)
        else:  # output channel o (group o // out_pg) reads input channel g*in_pg + j at w[o, j]
            i_g = i.reshape(groups, 1, in_pg).expand(groups, out_pg, in_pg).reshape(c_out, in_pg)
            w = w / i_g.reshape(c_out, in_pg, *extra)
    b = bias
    if bias is not None and out_scale is not None:
        b = (bias.detach().to(torch.float64) * out_scale.detach().to(torch.float64)).to(bias.dtype)
    return w.to(dtype), b
