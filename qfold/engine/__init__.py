"""Engine backends by name, imported lazily (a missing optional dependency errors only when asked for).

>>> sorted(BACKENDS)
['onnxruntime', 'tensorrt']
"""
from __future__ import annotations

import importlib

from qfold.engine.base import Backend, Engine, EngineConfig, EngineInfo

#: backend name -> "module:attribute" of a zero-argument factory (a Backend class).
BACKENDS: dict[str, str] = {
    "onnxruntime": "qfold.engine.ort:OrtBackend",
    "tensorrt": "qfold.engine.trt:TrtBackend",
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
        hint = "pip install 'qfold[tensorrt]' on a CUDA machine" if name == "tensorrt" else "pip install onnxruntime"
        raise ImportError(f"engine backend {name!r} is unavailable ({exc}); {hint}.") from exc
    return getattr(module, attr)()


__all__ = ["BACKENDS", "Backend", "Engine", "EngineConfig", "EngineInfo", "get_backend"]
