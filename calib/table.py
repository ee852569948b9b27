"""Versioned JSON calibration tables, and the hashes that tie a table to its data and model.

File layout (``schema`` 1), keys sorted, floats as shortest round-trip decimals, so the same
table always gives the same bytes::

    {"amax": {"<tensor>": float | [float, ...]}, "meta": {...}, "method": "entropy", "schema": 1}
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calib.atomic import atomic_write_text
from calib.errors import CalibrationError
from calib.spec import INT8_PER_TENSOR, QuantSpec, scale_from_amax
from calib.trtcache import write_trt_cache

SCHEMA = 1


def _update_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy of the data


def hash_model(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, torch.Tensor):
            _update_tensor(h, name, t)
    return h.hexdigest()


def hash_batches(batches: Iterable[Any]) -> str:
    """sha256 of calibration batches in order (tensors, tuples/lists and dicts of tensors)."""
    h = hashlib.sha256()

    def visit(prefix: str, b: Any) -> None:
        if isinstance(b, torch.Tensor):
            _update_tensor(h, prefix, b)
        elif isinstance(b, np.ndarray):
            _update_tensor(h, prefix, torch.from_numpy(np.ascontiguousarray(b)))
        elif isinstance(b, (tuple, list)):
            for i, v in enumerate(b):
                visit(f"{prefix}.{i}", v)
        elif isinstance(b, dict):
            for k in sorted(b):
                visit(f"{prefix}.{k}", b[k])
        else:
            h.update(f"{prefix}={b!r}".encode())

    for i, b in enumerate(batches):
        visit(str(i), b)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions that can change calibration numbers."""
    import calib

    return {"calib": calib.__version__, "numpy": np.__version__, "python": platform.python_version(), "torch": torch.__version__}


def _check_amax(name: str, v: Any) -> float | list[float]:
    vals = [v] if not isinstance(v, (list, tuple)) else list(v)
    out = []
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise CalibrationError(f"amax of tensor {name!r} must be finite numbers >= 0, got {x!r}")
        out.append(float(x))
    if isinstance(v, (list, tuple)):
        if not out:
            raise CalibrationError(f"amax of tensor {name!r} is an empty list")
        return out
    return out[0]


@dataclass(frozen=True)
class CalibTable:
    """amax per tensor (a float per tensor, or a per-channel list), the method and metadata.

    ``meta`` is free-form JSON (suggested keys: ``spec``, ``data_sha256``, ``model_sha256``,
    ``versions``; see :func:`hash_batches`, :func:`hash_model`, :func:`versions`).
    """

    amax: dict[str, float | list[float]]
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "amax", {str(k): _check_amax(k, v) for k, v in self.amax.items()})

    def to_json(self) -> str:
        """The file text (deterministic)."""
        doc = {"schema": SCHEMA, "method": self.method, "amax": self.amax, "meta": self.meta}
        try:
            return json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"calibration table meta must be plain JSON (str, number, list, dict): {exc}") from None

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the table atomically (the old file stays whole if anything fails)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "CalibTable":
        """Read a table written by :meth:`save_json`; errors name the file and the line."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"calibration table {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}); truncated or corrupt file?") from None
        if not isinstance(doc, dict) or "schema" not in doc:
            raise CalibrationError(f"{path}: not a calib table (no 'schema' key)")
        if doc["schema"] != SCHEMA:
            raise CalibrationError(f"{path}: table schema {doc['schema']!r}, this calib reads schema {SCHEMA}; use a matching calib version")
        missing = [k for k in ("amax", "method") if k not in doc]
        if missing or not isinstance(doc["amax"], dict):
            raise CalibrationError(f"{path}: missing or malformed keys {missing or ['amax']}")
        return cls(doc["amax"], str(doc["method"]), doc.get("meta", {}))

    def scales(self, spec: QuantSpec = INT8_PER_TENSOR) -> dict[str, float | list[float]]:
        """``scale_from_amax`` of every entry (float32 values as Python floats)."""
        out: dict[str, float | list[float]] = {}
        for k, v in self.amax.items():
            s = scale_from_amax(np.asarray(v), spec)
            out[k] = s.tolist() if isinstance(v, list) else float(s)
        return out

    def save_trt_cache(self, path: str | os.PathLike, *, trt_version: str = "100300", algorithm: str = "EntropyCalibration2") -> Path:
        """Write the per-tensor entries as a TensorRT calibration cache (per-channel ones are skipped)."""
        scales = {k: v for k, v in self.scales().items() if not isinstance(v, list)}
        return write_trt_cache(path, scales, trt_version=trt_version, algorithm=algorithm)
