"""Engine backends by name, imported lazily (a missing optional dependency errors only when asked for).

>>> sorted(BACKENDS)
['onnxruntime', 'tensorrt']
"""
from __future__ import annotations

import importlib
import importlib.util

from qfold.engine.base import (
    Backend,
    Engine,
    EngineConfig,
    EngineInfo,
)
from qfold.errors import BackendUnavailableError

#: backend name -> "module:attribute" of a zero-argument factory (a Backend class).
BACKENDS: dict[str, str] = {
    "onnxruntime": "qfold.engine.ort:OrtBackend",
    "tensorrt": "qfold.engine.trt:TensorRTBackend",
}


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        ImportError: the backend's dependency is missing (the message says what to install).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}.")
    module_name, _, attr = BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"engine backend {name!r} is unavailable ({exc}); {_hint(name)}.") from exc
    return getattr(module, attr)()


def _hint(name: str) -> str:
    if name == "tensorrt":
        from qfold.engine.trt_install import INSTALL_HINT

        return INSTALL_HINT
    return "pip install onnxruntime"


def require_backend(name: str) -> None:
    """Check, before any work, that backend ``name`` can run here; cheap (imports no engine library).

    ``"tensorrt"`` needs the ``tensorrt`` package and a CUDA device visible to torch;
    ``"onnxruntime"`` needs the ``onnxruntime`` package. The CLI and
    :func:`qfold.pipeline.run_ptq` call this first, so a missing TensorRT fails in a second with
    one message instead of after folding and calibrating.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        BackendUnavailableError: (an ImportError) what is missing, how to install it, and that
            ``--backend onnxruntime`` works everywhere.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}.")
    if name == "tensorrt":
        from qfold.engine.trt import check_available

        check_available()
    elif importlib.util.find_spec("onnxruntime") is None:
        raise BackendUnavailableError(f"engine backend {name!r} needs onnxruntime, which is not installed: {_hint(name)}")


__all__ = [
    "BACKENDS", "Backend", "BackendUnavailableError", "Engine", "EngineConfig", "EngineInfo", "get_backend",
    "require_backend",
]
