"""Per-tensor activation observers (streaming histograms) and per-channel weight amax."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from calib.amax import compute_amax as _compute_amax
from calib.errors import CalibrationError
from calib.histogram import E_MIN, Histogram, exponent_for
from calib.method import CalibMethod


def weight_amax(w: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel ``max |w|`` along ``axis`` (0 for Conv/Linear, 1 for ConvTranspose).

    Returns a float32 tensor of shape ``(w.shape[axis],)`` on ``w``'s device. Zero channels give
    0.0 (``calib.spec.scale_from_amax`` turns that into a valid positive scale).
    """
    if not isinstance(w, torch.Tensor) or w.dim() == 0:
        raise CalibrationError("weight_amax needs a weight tensor with at least one dimension")
    if not -w.dim() <= axis < w.dim():
        raise CalibrationError(
            f"axis {axis} is out of range for a weight of shape {tuple(w.shape)}; "
            "use 0 for Conv/Linear weights and 1 for ConvTranspose weights"
        )
    w = w.detach()
    if not torch.isfinite(w).all():
        raise CalibrationError(f"weight of shape {tuple(w.shape)} contains NaN or Inf; fix the model first")
    flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    if flat.shape[1] == 0:
        return torch.zeros(w.shape[axis], dtype=torch.float32, device=w.device)
    return flat.abs().amax(dim=1).float()


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` as a 1-D tensor in memory order: a view for any dense layout (e.g.
    channels-last), where ``reshape(-1)`` would copy. Counts and extremes do not depend on order."""
    if not x.is_contiguous():
        x = x.permute(sorted(range(x.ndim), key=lambda d: -x.stride(d)))
    return x.reshape(-1)


class HistogramObserver:
    """Collects the |x| histogram of one tensor, batch after batch, in bounded memory.

    The method is chosen only when ``compute_amax`` is called, so one pass over the data serves
    max, percentile, entropy and mse. ``update`` accepts CPU or CUDA tensors; counting runs on
    the tensor's device and only ``num_bins`` integers come back to the host.

    Args:
        num_bins: histogram size (bounded; default 2048 like TensorRT).
    """

    def __init__(self, num_bins: int = 2048) -> None:
        try:
            self._hist = Histogram.empty(num_bins)
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None

    @property
    def histogram(self) -> Histogram:
        """The collected histogram (an immutable value)."""
        return self._hist

    @property
    def num_samples(self) -> int:
        """Number of values observed so far."""
        return self._hist.num_samples

    @property
    def num_bins(self) -> int:
        return self._hist.num_bins

    def update(self, x: torch.Tensor) -> None:
        """Count the values of ``x``. Raises CalibrationError if ``x`` has NaN or Inf."""
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"expected a torch.Tensor to observe, got {type(x).__name__}")
        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # exact for float16 / bfloat16 / small integers
        x = flat_view(x)
        lo, hi = torch.aminmax(x)  # one pass; NaN propagates
        m = max(-float(lo), float(hi))
        if not math.isfinite(m):
            what = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise CalibrationError(f"the tensor contains {what}; calibration data must be finite")
        e = exponent_for(max(self._hist.amax, m), self.num_bins)
        if e is None:
            counts = np.zeros(self.num_bins, np.int64)
            counts[0] = x.numel()
        else:
            # x * 2**-e is exact and |x * 2**-e| < num_bins, so |trunc(x * 2**-e)| is the bin index
            itype = torch.int16 if self.num_bins <= 32767 else torch.int32
            idx = (x * math.ldexp(1.0, -e)).to(itype).abs_()
            counts = torch.bincount(idx, minlength=self.num_bins).cpu().numpy()
        self._hist = self._hist.add_counts(counts, e, m, x.numel())

    def merge(self, other: "HistogramObserver") -> None:
        """Add ``other``'s data to this observer (exact; ``other`` is not changed)."""
        if not isinstance(other, HistogramObserver):
            raise CalibrationError(f"can only merge another HistogramObserver, got {type(other).__name__}")
        try:
            self._hist = self._hist.merge(other._hist)
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None

    def compute_amax(self, method: CalibMethod | str = "entropy") -> float:
        """Amax by ``method`` from the data so far; idempotent, never changes the observer."""
        if self.num_samples == 0:
            raise CalibrationError("this tensor was never observed: no data reached it during calibration")
        return _compute_amax(self._hist, method)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain CPU tensors: ``counts`` (int64), ``exponent`` (int64, E_MIN-1 for none), ``amax``, ``num_samples``."""
        h = self._hist
        return {
            "counts": torch.from_numpy(h.counts.copy()),
            "exponent": torch.tensor(E_MIN - 1 if h.exponent is None else h.exponent, dtype=torch.int64),
            "amax": torch.tensor(h.amax, dtype=torch.float64),
            "num_samples": torch.tensor(h.num_samples, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output, validating it."""
        try:
            counts = np.array(torch.as_tensor(state["counts"]).cpu().numpy(), dtype=np.int64)
            e = int(state["exponent"])
            amax = float(state["amax"])
            n = int(state["num_samples"])
        except KeyError as exc:
            raise CalibrationError(f"observer state is missing {exc.args[0]!r}; pass a HistogramObserver.state_dict()") from None
        exponent = None if e < E_MIN else e
        if not (math.isfinite(amax) and amax >= 0):
            raise CalibrationError(f"observer state has an invalid amax {amax}")
        if counts.ndim != 1 or (counts < 0).any() or int(counts.sum()) != n or exponent != exponent_for(amax, counts.shape[0]):
            raise CalibrationError("observer state is inconsistent (counts, exponent, amax and num_samples disagree)")
        self._hist = Histogram(counts, exponent, amax, n)

    def __repr__(self) -> str:
        return f"HistogramObserver(num_bins={self.num_bins}, num_samples={self.num_samples}, amax={self._hist.amax:g})"
