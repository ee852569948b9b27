"""Slow, obviously-correct reference implementations kept for the tests (never used by calib)."""
from __future__ import annotations

import math

import numpy as np


def kl_divergence(p: list[float], q: list[float]) -> float:
    """KL(p/|p| || q/|q|) by its definition; inf where p > 0 and q == 0."""
    sp, sq = sum(p), sum(q)
    total = 0.0
    for pi, qi in zip(p, q):
        if pi == 0:
            continue
        if qi == 0:
            return math.inf
        total += (pi / sp) * math.log((pi / sp) / (qi / sq))
    return total


def entropy_reference(counts: np.ndarray, levels: int = 128, start_bin: int = 128) -> tuple[list[int], list[float]]:
    """TensorRT's KL search, candidate by candidate, in plain Python loops.

    For each candidate i: p = bins[:i] with the outliers added to the last bin; q merges bins[:i]
    into ``levels`` groups (bin j in group floor(j*levels/i)) and spreads each group's mass evenly
    over the group's non-empty bins.
    """
    bins = [float(v) for v in counts]
    bins[0] = bins[1]
    nonzero = [j for j, v in enumerate(counts) if v != 0]
    stop = nonzero[-1] + 1 if nonzero else 0
    cands, kls = [], []
    for i in range(start_bin, stop + 1):
        p = bins[:i]
        p[-1] += sum(bins[i:])
        group = [(j * levels) // i for j in range(i)]
        mass = [0.0] * levels
        nbins = [0] * levels
        for j in range(i):
            if bins[j] != 0:
                mass[group[j]] += bins[j]
                nbins[group[j]] += 1
        q = [mass[group[j]] / nbins[group[j]] if bins[j] != 0 else 0.0 for j in range(i)]
        cands.append(i)
        kls.append(kl_divergence(p, q))
    return cands, kls


def last_argmin(values: list[float], rtol: float = 1e-12, atol: float = 1e-15) -> int:
    """Index of the last value within rtol*|min| + atol of the minimum (ties -> largest amax)."""
    best = min(values)
    tol = rtol * abs(best) + atol if math.isfinite(best) else 0.0
    return max(k for k, v in enumerate(values) if v <= best + tol)


def mse_on_samples(x: np.ndarray, amax: float, qmax: int = 127) -> float:
    """Mean squared error of narrow symmetric fake quantization of the raw samples."""
    s = amax / qmax
    return float(np.mean((x - np.clip(np.rint(x / s), -qmax, qmax) * s) ** 2))


def quantile_samples(kind: str, n: int) -> np.ndarray:
    """n deterministic 'samples' at the quantiles (k+0.5)/n of a symmetric distribution (float32)."""
    import torch

    u = (np.arange(n, dtype=np.float64) + 0.5) / n
    if kind == "uniform":  # U(-1, 1)
        x = 2 * u - 1
    elif kind == "gaussian":  # N(0, 1)
        x = torch.special.ndtri(torch.from_numpy(u)).numpy()
    elif kind == "laplace":  # Laplace(0, b=1)
        x = np.where(u < 0.5, np.log(2 * u), -np.log(2 * (1 - u)))
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def abs_quantile(kind: str, p: float) -> float:
    """The p-quantile of |X| for the distributions of quantile_samples."""
    import torch

    if kind == "uniform":
        return p
    if kind == "gaussian":
        return float(torch.special.ndtri(torch.tensor((1 + p) / 2, dtype=torch.float64)))
    if kind == "laplace":
        return -math.log(1 - p)
    raise ValueError(kind)
