"""Every exception and warning qfold raises, in one place (no imports from the rest of qfold).

Each message names the cause and the fix. The classes derive from the built-in type a caller
would already catch (``ValueError`` for bad input, ``ImportError`` for a missing backend,
``RuntimeError`` for a failed build or check), so ``except ValueError`` keeps working.

>>> issubclass(FoldError, ValueError) and issubclass(BackendUnavailableError, ImportError)
True
"""
from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """Bad input found before any work: the message names the cause and the fix."""


class InputWarning(UserWarning):
    """An input that works but is probably a mistake (say, a single calibration sample)."""


class OutputDirError(ValueError):
    """The output folder cannot be used: the message names the cause and the fix."""


class UntraceableModelError(TypeError):
    """torch.fx could not trace the model; the message names the module and what to do.

    Attributes:
        module_name: qualified name of the innermost module whose forward failed ("" for the
            root), or None when it could not be told.
    """

    def __init__(self, message: str, module_name: str | None = None) -> None:
        super().__init__(message)
        self.module_name = module_name


class FoldError(ValueError):
    """The model cannot be folded as asked; the message names the module and the fix."""


class BoundError(ValueError):
    """``bound_relu`` cannot run as asked; the message names the cause and the fix."""


class BackendUnavailableError(ImportError):
    """An engine backend cannot run here (a missing package or device); the message says what to do instead."""


class TensorRTUnavailableError(BackendUnavailableError):
    """TensorRT or a CUDA device is missing; the message says how to install or what to use instead."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; the message carries TensorRT's own errors."""


class EngineCheckError(RuntimeError):
    """The engine deviates from the fake-quant reference by more than the tolerance on this CPU."""


class QualityGateError(RuntimeError):
    """The engine's accuracy drop exceeds the configured budget (``eval.max_drop_pp``).

    ``report`` is the full accuracy report (a :class:`qfold.report.stages.AccuracyReport`);
    every artifact was written before this was raised.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


__all__ = [
    "BackendUnavailableError", "BoundError", "EngineBuildError", "EngineCheckError", "FoldError", "InputError",
    "InputWarning", "OutputDirError", "QualityGateError", "TensorRTUnavailableError", "UntraceableModelError",
]
