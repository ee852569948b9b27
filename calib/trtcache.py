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

Caches written by TensorRT also hold values without leading zeros, such as ``366: 0``;
trtexec reads the value with ``std::stoi(..., 16)`` and accepts it (samples/common/sampleEngines.cpp,
``readScalesFromCalibrationCache``, NVIDIA/TensorRT release/10.13). Real caches also hold ``0`` for
tensors that never carried data and ``7f800000`` (+inf) where calibration overflowed
(docs/tensorrt.md lists the public cache files the tests quote). The reader zero-pads short hex
and warns about zero and infinite scales instead of failing; negative or NaN scales stay errors.

Consumers: TensorRT 8.x-10.x implicit INT8 calibration (``IInt8Calibrator.read_calibration_cache``,
``trtexec --calib``). TensorRT 11 removed implicit calibration: its headers have no
``IInt8Calibrator`` and its trtexec no ``--calib`` (NVIDIA/TensorRT main = 11.1), so nothing in
TensorRT 11 reads this file whatever its header says. :func:`write_trt_cache_note` writes that
down next to a cache.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from calib.atomic import atomic_write_text
from calib.errors import CalibrationError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(?P<version>\d+)-(?P<algorithm>[A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


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
    """Inverse of :func:`scale_to_hex`; shorter hex (``"0"`` in TensorRT's caches) is zero-padded on the left.

    >>> hex_to_scale("0"), hex_to_scale("3c010204") == hex_to_scale("3C010204")
    (0.0, True)
    """
    return struct.unpack(">f", bytes.fromhex(text.rjust(8, "0")))[0]


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

    Values of 1 to 8 hex digits are read (TensorRT drops leading zeros). Zero and +inf scales,
    which TensorRT writes for tensors it could not calibrate, are returned as they are with one
    ``UserWarning`` naming them: such a tensor has no usable range.

    Raises:
        CalibrationError: naming the file and line of a bad header, a line without ``': '``, a value
            that is not 1-8 hex digits (a truncated or foreign file), a negative or NaN scale, or a
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
    unusable: list[str] = []
    for no, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        name, sep, value = line.rpartition(": ")
        if not sep or not name:
            raise CalibrationError(f"{path} line {no}: expected '<tensor name>: <hex scale>', got {line[:60]!r}")
        if not _HEX.match(value):
            raise CalibrationError(f"{path} line {no}: tensor {name!r} has value {value!r}, not 1-8 hex digits "
                                   "(truncated file?)")
        if len(value) < 8 and no == len(lines) and not text.endswith("\n"):
            raise CalibrationError(f"{path} line {no}: tensor {name!r} has value {value!r} and the file ends inside "
                                   "it without a newline (truncated file?)")
        scale = hex_to_scale(value)
        if math.isnan(scale) or scale < 0:
            raise CalibrationError(f"{path} line {no}: tensor {name!r} has scale {scale}, must be >= 0 and not NaN")
        if name in scales:
            raise CalibrationError(f"{path} line {no}: tensor {name!r} appears twice")
        if scale == 0 or math.isinf(scale):
            unusable.append(f"{name} ({scale})")
        scales[name] = scale
    if unusable:
        shown = ", ".join(unusable[:5]) + (f" and {len(unusable) - 5} more" if len(unusable) > 5 else "")
        warnings.warn(f"{path}: {len(unusable)} tensor(s) have a zero or infinite scale, i.e. no usable range "
                      f"(TensorRT writes these for tensors it could not calibrate): {shown}", UserWarning, stacklevel=2)
    return header, scales


#: what reads a cache, by TensorRT major version (see the module docstring for the sources)
TRT11_NOTE = (
    "TensorRT 11 removed implicit INT8 calibration (no IInt8Calibrator, no trtexec --calib): no TensorRT 11 "
    "API reads this cache, whatever its header says. On TensorRT 11 deploy the Q/DQ ONNX (explicit "
    "quantization); the cache serves TensorRT 8.x-10.x and tools that import caches into a Q/DQ graph."
)


def trt_cache_note(header: TrtCacheHeader) -> dict[str, object]:
    """Metadata for a cache with ``header``: its format, who can read it, and the TensorRT 11 caveat."""
    return {
        "format": "TensorRT calibration cache text: 'TRT-<version>-<algorithm>', then '<tensor>: <float32 scale bits, hex>'",
        "header": f"TRT-{header.version}-{header.algorithm}",
        "readers": "TensorRT 8.x-10.x implicit INT8 calibration (IInt8Calibrator.read_calibration_cache, trtexec --calib)",
        "tensorrt_11": TRT11_NOTE,
    }


def write_trt_cache_note(cache_path: str | os.PathLike) -> Path:
    """Write :func:`trt_cache_note` of the cache at ``cache_path`` to ``<cache_path>.json``, atomically."""
    header = _read_header(Path(cache_path))
    note = json.dumps(trt_cache_note(header), indent=2, sort_keys=True) + "\n"
    return atomic_write_text(Path(str(cache_path) + ".json"), note)


def _read_header(path: Path) -> TrtCacheHeader:
    first = path.read_text(encoding="utf-8").split("\n", 1)[0].rstrip("\r")
    m = _HEADER.match(first)
    if m is None:
        raise CalibrationError(f"{path} line 1: expected a header 'TRT-<version>-<Algorithm>', got {first[:60]!r}")
    return TrtCacheHeader(m.group("version"), m.group("algorithm"))
