"""How an activation amax is chosen from a collected histogram (configuration only)."""
from __future__ import annotations

from dataclasses import dataclass

from calib.errors import CalibrationError

METHODS = ("max", "percentile", "entropy", "mse", "auto")


@dataclass(frozen=True)
class CalibMethod:
    """An amax search method and its parameters.

    Attributes:
        name: "max" (exact max |x|), "percentile" (the ``percentile`` quantile of |x|), "entropy"
            (TensorRT's KL-divergence threshold search), "mse" (least squared quantization error) or
            "auto" (per tensor, the candidate of the four with the least output-error estimate,
            :mod:`calib.auto`).
        percentile: for "percentile", in (0, 100]; 99.99 is pytorch-quantization's default.
        num_bits: quantized width; entropy merges into ``2**(num_bits-1)`` levels (128 for int8).
        start_bin: smallest candidate threshold, in histogram bins, for "entropy" and "mse"
            (TensorRT / pytorch-quantization use 128); at least ``2**(num_bits-1)``.
    """

    name: str = "entropy"
    percentile: float = 99.99
    num_bits: int = 8
    start_bin: int = 128

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise CalibrationError(
                f"unknown calibration method {self.name!r}; use one of {', '.join(METHODS)}"
            )
        if not 0.0 < float(self.percentile) <= 100.0:
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 2 <= self.num_bits <= 16:
            raise CalibrationError(f"num_bits must be in [2, 16], got {self.num_bits}")
        if self.start_bin < self.levels:
            raise CalibrationError(
                f"start_bin ({self.start_bin}) must be at least the number of quantized levels "
                f"2**(num_bits-1) = {self.levels}"
            )

    @property
    def levels(self) -> int:
        """Number of non-negative quantized levels the entropy search merges bins into."""
        return 1 << (self.num_bits - 1)

    @classmethod
    def parse(cls, method: "CalibMethod | str") -> "CalibMethod":
        """``method`` itself, or ``CalibMethod(name=method)`` for a string."""
        if isinstance(method, CalibMethod):
            return method
        if isinstance(method, str):
            return cls(name=method)
        raise CalibrationError(f"method must be a CalibMethod or a method name, got {type(method).__name__}")
