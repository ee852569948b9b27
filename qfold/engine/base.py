"""The runner interface every engine backend implements (build, load, run) and the engine files.

An *engine* is a file (ONNX for ONNX Runtime, a serialized plan for TensorRT) with a JSON
metadata sidecar ``<engine>.json`` that records the engine's sha256; both are written atomically
(:func:`write_engine`) and read back together (:func:`read_engine`). Backends register by name in
``qfold.engine.BACKENDS`` and are imported lazily, so a missing optional dependency only errors
when that backend is asked for.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from calib.atomic import atomic_write_bytes, atomic_write_text
from qfold.config import EngineConfig

__all__ = ["Backend", "Engine", "EngineConfig", "EngineInfo", "info_to_json", "metadata_path", "read_engine",
           "sha256_bytes", "sha256_file", "write_engine"]


@dataclass
class EngineInfo:
    """Metadata written next to an engine file (``<engine>.json``).

    Attributes:
        backend: the backend name that built it.
        engine_path: the engine file's name.
        onnx_sha256: sha256 of the Q/DQ ONNX it was built from.
        engine_sha256: sha256 of the engine file (checked on load).
        versions: library versions that built it.
        extra: backend-specific facts (CPU target and self-check; GPU, profiles and layer precisions).
    """

    backend: str
    engine_path: str
    onnx_sha256: str
    engine_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """A loaded engine: numpy in, numpy out."""

    info: EngineInfo

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (N, ...) float32 and return the first output as float32."""
        ...


class Backend(Protocol):
    """Builds engine files from a Q/DQ ONNX and loads them.

    ``suffix`` names the engine file (``engine<suffix>``). ``data`` are calibration batches: a
    backend whose rendering quantizes more tensors than the Q/DQ ONNX names calibrates them there,
    and checks the built engine on them; a backend that needs none ignores them.
    """

    name: str
    suffix: str

    def build(self, onnx_path: Path, engine_path: Path, config: EngineConfig,
              data: Sequence[np.ndarray] | None = None) -> EngineInfo:
        """Build ``engine_path`` (+ ``engine_path``.json) from ``onnx_path``; atomic."""
        ...

    def load(self, engine_path: Path, config: EngineConfig) -> Engine:
        """Load a built engine for inference."""
        ...


# ----------------------------------------------------------------------------- files and metadata


def metadata_path(engine_path: str | Path) -> Path:
    """The JSON sidecar of an engine file: ``model.plan`` -> ``model.plan.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def info_to_json(info: EngineInfo) -> str:
    """Deterministic JSON for ``info`` (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(asdict(info), sort_keys=True, indent=2) + "\n"


def write_engine(engine_path: str | Path, data: bytes, info: EngineInfo) -> Path:
    """Write the engine and then its metadata, each atomically; the metadata records the engine's sha256."""
    engine_path = Path(engine_path)
    if info.engine_sha256 != sha256_bytes(data):
        raise ValueError("EngineInfo.engine_sha256 does not match the engine being written")
    atomic_write_bytes(engine_path, data)
    atomic_write_text(metadata_path(engine_path), info_to_json(info))
    return engine_path


def read_engine(engine_path: str | Path) -> tuple[bytes, EngineInfo]:
    """Read an engine and its metadata; raises if either is missing or they do not belong together."""
    engine_path = Path(engine_path)
    meta = metadata_path(engine_path)
    if not engine_path.is_file() or not meta.is_file():
        missing = engine_path if not engine_path.is_file() else meta
        raise FileNotFoundError(f"{missing} does not exist; build the engine first (`qfold build`, or a backend's build())")
    data = engine_path.read_bytes()
    info = EngineInfo(**json.loads(meta.read_text(encoding="utf-8")))
    recorded = info.engine_sha256 or info.extra.get("engine_sha256")  # before 0.1.1 it sat in ``extra``
    if recorded != sha256_bytes(data):
        raise ValueError(f"{engine_path} does not match {meta} (sha256 differs); rebuild the engine")
    return data, info
