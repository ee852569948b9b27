"""The runner interface every engine backend implements: build, load, run.

An *engine* is a file (ONNX for ONNX Runtime, a serialized plan for TensorRT) with a JSON
metadata sidecar ``<engine>.json``; both are written atomically. Backends register by name in
``qfold.engine.BACKENDS`` and are imported lazily, so a missing optional dependency only errors
when that backend is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class EngineConfig:
    """How an engine is built.

    Attributes:
        backend: "onnxruntime" (default, any CPU) or "tensorrt".
        device: "cpu" or "cuda" (ONNX Runtime execution provider choice).
        intra_op_threads: 0 lets the runtime decide.
        batch_min, batch_opt, batch_max: dynamic-batch optimization profile (TensorRT).
        workspace_mib: TensorRT workspace memory-pool limit.
        fp16_fallback: run unquantized layers in FP16 (TensorRT; converts the ONNX).
        cpu_target: ONNX Runtime CPU rendering (:mod:`qfold.engine.cpu`). Building: ``auto`` (the
            CPU building it), ``vnni``, ``portable`` or ``arm64``. Loading: ``auto`` runs the engine
            exactly on this CPU (re-rendering in memory, with a warning, if it was built for
            another class), ``portable`` always runs u8 x u8, ``vnni``/``arm64`` run the file as
            rendered and refuse a CPU that would not compute it exactly.
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    intra_op_threads: int = 0
    batch_min: int = 1
    batch_opt: int = 32
    batch_max: int = 256
    workspace_mib: int = 1024
    fp16_fallback: bool = False
    cpu_target: str = "auto"


@dataclass
class EngineInfo:
    """Metadata written next to an engine file (``<engine>.json``)."""

    backend: str
    engine_path: str
    onnx_sha256: str
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """A loaded engine: numpy in, numpy out."""

    info: EngineInfo

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (N, ...) float32 and return the first output as float32."""
        ...


class Backend(Protocol):
    """Builds engine files from a Q/DQ ONNX and loads them."""

    name: str

    def build(self, onnx_path: Path, engine_path: Path, config: EngineConfig) -> EngineInfo:
        """Build ``engine_path`` (+ ``engine_path``.json) from ``onnx_path``; atomic."""
        ...

    def load(self, engine_path: Path, config: EngineConfig) -> Engine:
        """Load a built engine for inference."""
        ...
