"""Streaming |x| histograms with power-of-two bin widths: bounded, exact to merge, order-free.

A histogram of ``N`` bins has bin width ``w = 2**e`` and counts

    counts[j] = #{ x : j*w <= |x| < (j+1)*w },      j = 0 .. N-1

The exponent is a function of the running exact maximum ``m`` only:

    e(m) = max(E_MIN, smallest integer e with m < N * 2**e)

so the data always fills between N/2 and N bins. When a larger maximum arrives the width is
doubled (``d`` times) by summing adjacent bins, ``counts'[j] = sum(counts[j*2**d:(j+1)*2**d])``.
Because ``|x| / 2**e`` is exact in binary floating point and ``floor(floor(v)/2) = floor(v/2)``,
re-binning loses nothing: a histogram is the same integer array whichever order or batch size
the data came in, and two histograms merge exactly by coarsening both to the larger exponent and
adding counts. Memory is ``N`` integers per tensor whatever the amount of data.

Reference: TensorRT / pytorch-quantization collect |x| histograms of 2048 bins for the entropy
search (pytorch_quantization.calib.HistogramCalibrator); unlike theirs, the bin count here never
grows and merges are exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

E_MIN = -126  # 2**-E_MIN must stay a finite float32 multiplier (no overflow of |x| * 2**-e)


def exponent_for(amax: float, num_bins: int) -> int | None:
    """Smallest power-of-two exponent ``e >= E_MIN`` with ``amax < num_bins * 2**e``; None for 0."""
    if amax == 0.0:
        return None
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be finite and >= 0, got {amax}")
    _, e2 = math.frexp(amax)  # amax in [2**(e2-1), 2**e2)
    e = e2 - int(math.log2(num_bins)) - 1
    while not amax < math.ldexp(num_bins, e):
        e += 1
    while e > E_MIN and amax < math.ldexp(num_bins, e - 1):
        e -= 1
    return max(e, E_MIN)


def coarsen(counts: np.ndarray, d: int) -> np.ndarray:
    """Counts re-binned to ``2**d`` times the width (same length; the top bins become empty)."""
    if d < 0:
        raise ValueError(f"a histogram can only be coarsened (d >= 0), got d={d}")
    n = counts.shape[0]
    if d == 0:
        return counts.copy()
    out = np.zeros_like(counts)
    if d >= 63 or (1 << d) >= n:
        out[0] = counts.sum()
        return out
    f = 1 << d
    pad = (-n) % f
    c = np.concatenate([counts, np.zeros(pad, counts.dtype)]) if pad else counts
    merged = c.reshape(-1, f).sum(axis=1)
    out[: merged.shape[0]] = merged
    return out


@dataclass(frozen=True, eq=False)
class Histogram:
    """An immutable |x| histogram (see the module docstring for the binning).

    Attributes:
        counts: int64 array of ``num_bins`` counts.
        exponent: bin width is ``2**exponent``; None while only zeros were seen (all in bin 0).
        amax: exact max |x| seen.
        num_samples: number of values counted.
    """

    counts: np.ndarray
    exponent: int | None
    amax: float
    num_samples: int

    def __post_init__(self) -> None:
        counts = np.array(self.counts, dtype=np.int64)  # a private copy, made read-only
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)

    @staticmethod
    def empty(num_bins: int = 2048) -> "Histogram":
        """A histogram of ``num_bins`` bins that has seen nothing."""
        if num_bins < 256:
            raise ValueError(f"num_bins must be at least 256 (the entropy search needs them), got {num_bins}")
        return Histogram(np.zeros(num_bins, np.int64), None, 0.0, 0)

    @property
    def num_bins(self) -> int:
        return int(self.counts.shape[0])

    @property
    def width(self) -> float:
        """Bin width ``2**exponent`` (0.0 while only zeros were seen)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    def rebinned(self, exponent: int | None) -> np.ndarray:
        """Counts at a bin width ``2**exponent`` no finer than this histogram's."""
        if exponent is None or self.exponent is None:
            if self.exponent is not None:
                raise ValueError("cannot refine a histogram to a narrower bin width")
            return self.counts.copy()  # only bin 0 is populated
        return coarsen(self.counts, exponent - self.exponent)

    def merge(self, other: "Histogram") -> "Histogram":
        """The histogram of both data sets (exact: equal to collecting them together)."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins")
        amax = max(self.amax, other.amax)
        e = exponent_for(amax, self.num_bins)
        return Histogram(self.rebinned(e) + other.rebinned(e), e, amax, self.num_samples + other.num_samples)

    def add_counts(self, counts: np.ndarray, exponent: int | None, amax: float, n: int) -> "Histogram":
        """Merge in a batch already binned at ``exponent`` (which must be ``exponent_for(amax)``)."""
        return self.merge(Histogram(np.asarray(counts, np.int64), exponent, float(amax), int(n)))
