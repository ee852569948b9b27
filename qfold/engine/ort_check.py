"""The engine self-check: does the ONNX Runtime engine, on this CPU, compute what was calibrated?

Two references (:meth:`qfold.engine.ort.OrtEngine.check`):

* the engine's *portable twin* (the same graph with its int8 weights stored as uint8 ``w + 128``,
  the same numbers, run with the same optimizations): the two fuse into the same kernels and differ
  only in the u8 x s8 multiply, which a CPU without VNNI computes with saturating int16 pair sums.
  This check fails a build, and ``qfold eval`` runs it on the CPU at hand;
* the TensorRT-profile Q/DQ ONNX run with graph optimizations off, i.e. the fake-quant model. The
  ORT rendering approximates it (extra Q/DQ on tensors TensorRT keeps float; Q/DQ pairs ONNX
  Runtime's optimizer merges or drops), so this one is recorded and warned about, not fatal.

One output step is ``max|reference| / 127`` over the checked batches (an int8 step of the output).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from qfold.report.metrics import sqnr_db_from_energy

#: the build fails when the engine's largest deviation from the reference exceeds this many output
#: steps. Saturating kernels measured tens to hundreds of steps on the example ResNet (13.6 dB); a
#: correct engine stays within ~1-2 (BENCHMARKS.md, "CPU targets").
TOLERANCE_STEPS = 4.0
#: ...unless the engine's SQNR against the reference is at least this: a deviation of a few outputs
#: by a handful of steps with the rest exact is not saturation, which moves every output (13.6 dB on
#: the example ResNet).
MIN_SQNR_DB = 30.0


@dataclass(frozen=True)
class CheckResult:
    """Engine vs reference on a few batches.

    Attributes:
        samples: inputs compared.
        max_abs_err: largest ``|engine - reference|``.
        step: one output step, ``max|reference| / 127``.
        max_err_steps: ``max_abs_err / step``.
        sqnr_db: SQNR of the engine against the reference.
        agreement: fraction of rows whose argmax (last axis) agrees.
        tolerance_steps: the limit ``max_err_steps`` is held to.
        reference: what the reference was (``"qdq-onnx"`` or ``"portable-twin"``).
    """

    samples: int
    max_abs_err: float
    step: float
    max_err_steps: float
    sqnr_db: float
    agreement: float
    tolerance_steps: float
    reference: str

    @property
    def passed(self) -> bool:
        return bool(self.max_err_steps <= self.tolerance_steps or self.sqnr_db > MIN_SQNR_DB)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        return (f"engine vs {self.reference} on {self.samples} calibration inputs: max error {self.max_err_steps:.2f} "
                f"output steps (limit {self.tolerance_steps:g}, or SQNR above {MIN_SQNR_DB:g} dB), SQNR {self.sqnr_db:.2f} dB, "
                f"argmax agreement {self.agreement:.2%}")


def compare(engine: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray],
            batches: Iterable[np.ndarray], *, reference_name: str = "qdq-onnx",
            tolerance_steps: float | None = None) -> CheckResult | None:
    """Run both on every batch and measure the deviation; None when ``batches`` is empty.

    ``tolerance_steps`` defaults to :data:`TOLERANCE_STEPS` (read at call time)."""
    tolerance_steps = TOLERANCE_STEPS if tolerance_steps is None else tolerance_steps
    got, want = [], []
    for x in batches:
        x = np.ascontiguousarray(x, dtype=np.float32)
        got.append(np.asarray(engine(x), np.float64))
        want.append(np.asarray(reference(x), np.float64))
    if not got:
        return None
    g, w = np.concatenate(got), np.concatenate(want)
    if not np.isfinite(g).all():
        return CheckResult(len(g), float("inf"), 0.0, float("inf"), float("-inf"), 0.0, tolerance_steps, reference_name)
    err = float(np.abs(g - w).max())
    step = float(np.abs(w).max()) / 127
    steps = err / step if step > 0 else (0.0 if err == 0 else float("inf"))
    sq = sqnr_db_from_energy(float((w * w).sum()), float(((g - w) ** 2).sum()))
    agree = float((g.reshape(len(g), -1).argmax(-1) == w.reshape(len(w), -1).argmax(-1)).mean())
    return CheckResult(len(g), err, step, steps, sq, agree, tolerance_steps, reference_name)
