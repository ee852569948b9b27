"""Amax (clipping threshold) searches over an |x| histogram: max, percentile, entropy, mse.

With bin width ``w``, counts ``c[j]`` and ``T = sum(c)``:

* **max**: the exact max |x| tracked beside the histogram.
* **percentile** ``p``: the smallest ``a`` with ``#{|x| <= a} >= p/100 * T``, interpolated
  linearly inside the bin that crosses the target, clipped to the exact max.
* **entropy** (TensorRT's KL threshold search, Migacz, "8-bit Inference with TensorRT", GTC 2017;
  same candidates and tie rule as pytorch-quantization's ``_compute_amax_entropy``): set
  ``c[0] = c[1]`` (discount the spike of exact zeros); for every candidate ``i`` in
  ``[start_bin, L]`` (``L`` = one past the last non-empty bin) the reference is
  ``p = c[:i]`` with the outliers ``sum(c[i:])`` added to ``p[i-1]``; the candidate ``q`` merges
  ``c[:i]`` into ``K = 2**(bits-1)`` groups (bin ``j`` in group ``floor(j*K/i)``) and spreads each
  group's mass evenly over its non-empty bins. ``amax = i* * w`` for the last ``i*`` that
  minimises ``KL(p/|p| || q/|q|)``. With ``S``, ``Z``, ``H`` the prefix sums of ``c``,
  ``[c > 0]`` and ``c log c``, group ``g`` of candidate ``i`` has mass ``M = S[hi]-S[lo]`` over
  ``n = Z[hi]-Z[lo]`` bins and

      KL(i) = (H[i-1] + p_last log p_last - sum_g M_g log(M_g/n_g) - o_i log(M_K-1/n_K-1)) / T'
              - log T' + log S[i]

  (``o_i`` outliers, ``p_last = c[i-1] + o_i``, ``T'`` the total of the modified counts; infinite
  when ``c[i-1] = 0 < o_i``). This evaluates every candidate at once in O(#candidates * K).
* **mse**: the bin centre ``a`` (from ``start_bin`` up to the last non-empty bin) minimising
  ``sum_j c[j] * (x_j - fq(x_j; a))**2`` over bin centres ``x_j``, where ``fq`` is the narrow
  symmetric fake quantizer ``clamp(round(x*Q/a), -Q, Q) * a/Q`` (pytorch-quantization's
  ``_compute_amax_mse``).
"""
from __future__ import annotations

import numpy as np

from calib.histogram import Histogram
from calib.method import CalibMethod

_TIE_RTOL = 1e-12  # values this close to the minimum count as ties (summation-order noise) ...
_KL_TIE_ATOL = 1e-15  # ... and, for the dimensionless KL, values this close to 0 (mse scales with amax**2)


def _last_nonempty(counts: np.ndarray) -> int:
    nz = np.flatnonzero(counts)
    return int(nz[-1]) + 1 if nz.size else 0


def amax_percentile(h: Histogram, percentile: float) -> float:
    """The ``percentile`` quantile of |x| (see the module docstring)."""
    if h.exponent is None:
        return 0.0
    c = h.counts
    cum = np.cumsum(c)
    target = percentile / 100.0 * float(cum[-1])
    j = int(np.searchsorted(cum, target, side="left"))
    j = min(j, c.shape[0] - 1)
    before = float(cum[j - 1]) if j > 0 else 0.0
    frac = (target - before) / float(c[j]) if c[j] > 0 else 1.0
    return float(min((j + frac) * h.width, h.amax))


def entropy_divergences(counts: np.ndarray, levels: int, start_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """``(candidates, KL)`` of the entropy search on raw counts (vectorised; see the docstring)."""
    c = counts.astype(np.float64).copy()
    c[0] = c[1]
    stop = _last_nonempty(counts)
    cand = np.arange(start_bin, stop + 1, dtype=np.int64)
    if cand.size == 0:
        return cand, np.zeros(0)
    zero = np.zeros(1)
    S = np.concatenate([zero, np.cumsum(c)])
    Z = np.concatenate([zero, np.cumsum(c > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        clogc = np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0)
    H = np.concatenate([zero, np.cumsum(clogc)])
    total = S[-1]

    g = np.arange(levels + 1, dtype=np.int64)
    lo = (g[None, :] * cand[:, None] + levels - 1) // levels  # first bin of group g: ceil(g*i/K)
    M = S[lo[:, 1:]] - S[lo[:, :-1]]
    n = Z[lo[:, 1:]] - Z[lo[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        logq = np.where(n > 0, np.log(np.where(M > 0, M, 1.0) / np.where(n > 0, n, 1.0)), 0.0)
    out = total - S[cand]
    last = c[cand - 1]
    p_last = last + out
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
    cross = (M * logq).sum(axis=1) + out * logq[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (H[cand - 1] + plogp - cross) / total - np.log(total) + np.log(S[cand])
    kl = np.where((last == 0) & (out > 0), np.inf, kl)
    return cand, kl


def _last_argmin(values: np.ndarray, atol: float = 0.0) -> int:
    best = float(np.min(values))
    tol = _TIE_RTOL * abs(best) + atol if np.isfinite(best) else 0.0
    return int(np.flatnonzero(values <= best + tol)[-1])


def amax_entropy(h: Histogram, levels: int = 128, start_bin: int = 128) -> float:
    """TensorRT's KL-divergence threshold (see the module docstring); exact max if too few bins."""
    if h.exponent is None:
        return 0.0
    cand, kl = entropy_divergences(h.counts, levels, start_bin)
    if cand.size == 0 or not np.isfinite(kl).any():
        return h.amax
    return float(min(cand[_last_argmin(kl, _KL_TIE_ATOL)] * h.width, h.amax))


def mse_errors(counts: np.ndarray, width: float, qmax: int, start_bin: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(candidate amax, weighted squared error)`` of the mse search (see the module docstring)."""
    stop = _last_nonempty(counts)
    centers = (np.arange(stop, dtype=np.float64) + 0.5) * width
    cnt = counts[:stop].astype(np.float64)
    amaxes = centers[start_bin:]
    errs = np.empty(amaxes.shape[0])
    for s in range(0, amaxes.shape[0], chunk):
        a = amaxes[s : s + chunk, None]
        fq = np.clip(np.rint(centers[None, :] * (qmax / a)), -qmax, qmax) * (a / qmax)
        errs[s : s + chunk] = ((centers[None, :] - fq) ** 2 * cnt[None, :]).sum(axis=1)
    return amaxes, errs


def amax_mse(h: Histogram, num_bits: int = 8, start_bin: int = 128) -> float:
    """The bin centre minimising the count-weighted squared quantization error."""
    if h.exponent is None:
        return 0.0
    amaxes, errs = mse_errors(h.counts, h.width, (1 << (num_bits - 1)) - 1, start_bin)
    if amaxes.size == 0:
        return h.amax
    return float(min(amaxes[_last_argmin(errs)], h.amax))


def compute_amax(h: Histogram, method: CalibMethod | str) -> float:
    """Amax of histogram ``h`` by ``method``; never modifies ``h``."""
    m = CalibMethod.parse(method)
    if m.name == "max":
        return float(h.amax)
    if m.name == "percentile":
        return amax_percentile(h, m.percentile)
    if m.name == "entropy":
        return amax_entropy(h, m.levels, m.start_bin)
    if m.name == "auto":
        from calib.auto import auto_amax  # calib.auto builds on this module

        return auto_amax(h, percentile=m.percentile, num_bits=m.num_bits, start_bin=m.start_bin).amax
    return amax_mse(h, m.num_bits, m.start_bin)
