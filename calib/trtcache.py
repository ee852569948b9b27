"""TensorRT calibration-cache text files, read and write.

Format (what trtexec's ``readScalesFromCalibrationCache`` and ModelOpt's
``import_scales_from_calib_cache`` parse)::

    TRT-<version>-<Algorithm>
    <tensor name>: <8 lowercase hex digits>
    ...

The hex is the IEEE-754 float32 bit pattern of the *scale* (``amax / 127``), written as a
big-endian integer: ``scale = 1/127`` is ``3c010204``. ``<version>`` is 4 digits on TensorRT 7/8
(8.6.1 -> 8601) and 6 on TensorRT 10 (10.3.0 -> 100300). Tensor names may contain ':' (the value
follows the last ': '). Lines are written in the order given, so read -> write is byte-exact.
"""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from calib.atomic import atomic_write_text
from calib.errors import CalibrationError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(?P<version>\d+)-(?P<algorithm>[A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{8}$")


@dataclass(frozen=True)
class TrtCacheHeader:
    """The first line of a cache: ``TRT-<version>-<algorithm>``."""

    version: str
    algorithm: str


def scale_to_hex(scale: float) -> str:
    """Big-endian float32 bits of ``scale`` as 8 lowercase hex digits.

    >>> scale_to_hex(1 / 127)
    '3c010204'
    """
    try:
        bits = struct.pack(">f", scale)
    except OverflowError:
        raise CalibrationError(f"scale {scale} does not fit a float32") from None
    return bits.hex()


def hex_to_scale(text: str) -> float:
    """Inverse of :func:`scale_to_hex`."""
    return struct.unpack(">f", bytes.fromhex(text))[0]


def write_trt_cache(
    path: str | os.PathLike,
    scales: dict[str, float],
    *,
    trt_version: str = "100300",
    algorithm: str = "EntropyCalibration2",
) -> Path:
    """Write ``{tensor name: scale}`` as a TensorRT calibration cache, atomically.

    Scales (not amax) must be finite and > 0 as float32; per-channel scales cannot be stored in
    this format (TensorRT caches hold activations only).
    """
    if not re.fullmatch(r"\d+", str(trt_version)):
        raise CalibrationError(f"trt_version must be digits such as '100300' (TensorRT 10.3.0) or '8601', got {trt_version!r}")
    if algorithm not in ALGORITHMS:
        raise CalibrationError(f"unknown TensorRT calibration algorithm {algorithm!r}; use one of {ALGORITHMS}")
    lines = [f"TRT-{trt_version}-{algorithm}"]
    for name, scale in scales.items():
        if not isinstance(name, str) or not name or any(ch in name for ch in "\r\n"):
            raise CalibrationError(f"tensor name {name!r} cannot be written to a cache line (empty or has a newline)")
        if isinstance(scale, (list, tuple)) or getattr(scale, "ndim", 0):
            raise CalibrationError(f"tensor {name!r}: a TensorRT cache holds one per-tensor scale, got several")
        s = float(scale)
        h = scale_to_hex(s) if math.isfinite(s) else ""
        if not h or not hex_to_scale(h) > 0:
            raise CalibrationError(f"tensor {name!r}: scale {s} must be finite and > 0 in float32; use calib.scale_from_amax")
        lines.append(f"{name}: {h}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_trt_cache(path: str | os.PathLike) -> tuple[TrtCacheHeader, dict[str, float]]:
    """Read a cache written by TensorRT or :func:`write_trt_cache`: ``(header, {name: scale})``.

    Raises:
        CalibrationError: naming the file and line of a bad header, a line without ``': '``, a value
            that is not 8 hex digits (a truncated file), a non-positive or non-finite scale, or a
            duplicated tensor.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"calibration cache {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not a text calibration cache ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise CalibrationError(f"{path}: empty file; expected a 'TRT-<version>-<Algorithm>' header on line 1")
    m = _HEADER.match(lines[0].rstrip("\r"))
    if m is None:
        raise CalibrationError(f"{path} line 1: expected a header 'TRT-<version>-<Algorithm>', got {lines[0][:60]!r}")
    header = TrtCacheHeader(m.group("version"), m.group("algorithm"))
    scales: dict[str, float] = {}
    for no, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        name, sep, value = line.rpartition(": ")
        if not sep or not name:
            raise CalibrationError(f"{path} line {no}: expected '<tensor name>: <8 hex digits>', got {line[:60]!r}")
        if not _HEX.match(value):
            raise CalibrationError(f"{path} line {no}: tensor {name!r} has value {value!r}, not 8 hex digits (truncated file?)")
        scale = hex_to_scale(value)
        if not (math.isfinite(scale) and scale > 0):
            raise CalibrationError(f"{path} line {no}: tensor {name!r} has scale {scale}, must be finite and > 0")
        if name in scales:
            raise CalibrationError(f"{path} line {no}: tensor {name!r} appears twice")
        scales[name] = scale
    return header, scales
