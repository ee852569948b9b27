"""Per-tensor choice among the amax searches: score every candidate by an output-error estimate.

Each fixed method (max, percentile, mse, entropy) gives one candidate amax from the same
histogram; ``auto`` keeps the candidate with the smallest score. With bin centres ``x_j``, counts
``c_j``, ``T = sum(c)`` and the narrow symmetric fake quantizer ``fq`` of amax ``a`` (the ``mse``
method's model), the signed error of bin ``j`` is ``e_j(a) = x_j - fq(x_j; a)`` (rounding inside
the range, clipping ``x_j - a`` above it), and::

    MSE(a) = sum_j c_j e_j**2 / T          M(a) = sum_j c_j e_j / T
    score(a) = MSE(a) + (coherence - 1) * M(a)**2

Why the second term: a layer ``y = W x`` fed the quantized tensor sees the error ``W e``. The
zero-mean part of ``e`` (rounding noise, spread of the clipped excess) adds up incoherently,
``||w||**2 * (MSE - M**2)`` per output, but the mean error ``M`` (clipping always shrinks |x|, so
it has one sign wherever the tensor does, e.g. after a ReLU) adds up coherently over the fan-in,
``(sum w)**2 * M**2``. So the expected output error is proportional to ``score`` with
``coherence = sum_out (sum w)**2 / sum_out ||w||**2`` of the layers that read the tensor (1 for
a tensor nothing multiplies: plain MSE). A plain MSE rule prefers tight clipping that the
network's sums amplify; this term charges clipping for what it does downstream.

Max is always a candidate and the default: another candidate replaces it only when its score is
at least ``min_gain`` (default 20 %) below max's. The estimate comes from calibration data only and
is blind to what the network does further down; measured on the reference models, choices
that gain less than that are as likely to cost output SQNR as to gain it, while max, which clips
nothing seen in calibration, is the robust default after the ReLU6 bound. Among candidates within
1e-9 relative of the best score the larger amax wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib.amax import amax_entropy, amax_mse, amax_percentile
from calib.histogram import Histogram

CANDIDATES = ("max", "percentile", "mse", "entropy")
_TIE_RTOL = 1e-9


@dataclass(frozen=True)
class AutoChoice:
    """The chosen candidate of one tensor and every candidate's amax and score."""

    method: str
    amax: float
    candidates: dict[str, float]
    scores: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready (floats as Python floats, keys sorted by the writer)."""
        return {"method": self.method, "amax": self.amax, "candidates": dict(self.candidates), "scores": dict(self.scores)}


def error_moments(h: Histogram, amax: float, qmax: int = 127) -> tuple[float, float]:
    """``(MSE(a), M(a))`` of fake-quantizing the histogram's bin centres with amax ``a``."""
    if h.exponent is None or h.num_samples == 0:
        return 0.0, 0.0
    c = h.counts.astype(np.float64)
    nz = np.flatnonzero(c)
    stop = int(nz[-1]) + 1
    x = (np.arange(stop, dtype=np.float64) + 0.5) * h.width
    x = np.minimum(x, h.amax)  # the top bin's centre may lie above the exact max
    c = c[:stop]
    a = max(float(amax), 1e-30)
    fq = np.clip(np.rint(x * (qmax / a)), -qmax, qmax) * (a / qmax)
    e = x - fq
    total = float(c.sum())
    return float((c * e * e).sum() / total), float((c * e).sum() / total)


def candidate_amax(h: Histogram, percentile: float = 99.99, num_bits: int = 8, start_bin: int = 128) -> dict[str, float]:
    """Amax of every candidate method from the one histogram (no data pass)."""
    levels = 1 << (num_bits - 1)
    return {
        "max": float(h.amax),
        "percentile": amax_percentile(h, percentile),
        "mse": amax_mse(h, num_bits, start_bin),
        "entropy": amax_entropy(h, levels, start_bin),
    }


def auto_amax(h: Histogram, coherence: float = 1.0, *, min_gain: float = 0.2, percentile: float = 99.99,
              num_bits: int = 8, start_bin: int = 128) -> AutoChoice:
    """The candidate amax with the least ``score`` (see the module docstring).

    Args:
        h: the tensor's |x| histogram.
        coherence: ``sum_out (sum w)**2 / sum_out ||w||**2`` of the layers reading the tensor
            (>= 0; 1 weighs the mean error like the rest, i.e. plain MSE).
        min_gain: the relative score reduction, in [0, 1), a candidate needs to replace max.
    """
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
    if not np.isfinite(coherence) or coherence < 0:
        raise ValueError(f"coherence must be finite and >= 0, got {coherence}")
    cands = candidate_amax(h, percentile, num_bits, start_bin)
    qmax = (1 << (num_bits - 1)) - 1
    scores = {}
    for name, a in cands.items():
        mse, mean = error_moments(h, a, qmax)
        scores[name] = mse + (coherence - 1.0) * mean * mean
    best = min(scores.values())
    tol = _TIE_RTOL * abs(best)
    tied = [n for n in CANDIDATES if scores[n] <= best + tol]
    pick = max(tied, key=lambda n: (cands[n], -CANDIDATES.index(n)))  # larger amax; then candidate order
    if scores[pick] > (1.0 - min_gain) * scores["max"]:
        pick = "max"
    return AutoChoice(pick, cands[pick], cands, scores)
