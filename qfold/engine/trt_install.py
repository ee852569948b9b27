"""How to install TensorRT for qfold, decided without TensorRT: the wheel for this CUDA, and the hint text.

Facts (docs/tensorrt.md, section "Installing"):

* TensorRT's Python wheels are published on NVIDIA's package index, ``https://pypi.nvidia.com``.
  The ``tensorrt`` name on the public index is a small front package that pulls ``tensorrt-cu13``
  (the CUDA 13 build) by default in current releases (the 10.16 and 11.x install guides say so);
  ``tensorrt-cu12`` is the CUDA 12 build.
  Their libraries (``tensorrt-cuXX-libs``) come from NVIDIA's index (TensorRT install guide,
  "Method 1: Python Package Index (pip)", 10.16.1 and 11.4.x pages).
* The wheel's CUDA major must match the CUDA that torch was built with (they share the process and
  the CUDA runtime), and the driver must support that CUDA major (``nvidia-smi`` prints the highest
  CUDA version the driver supports).
* qfold is not published on the public index: ``pip install qfold[tensorrt]`` would fetch whatever
  package of that name the index holds, not this project. Install qfold from its checkout:
  ``pip install -e ".[tensorrt]"``.

This module never imports ``tensorrt``, ``torch`` or CUDA; ``python -m qfold.engine.trt_install``
prints the wheel for the torch and driver on this machine (``tools/gpu_check.sh`` uses it).
"""
from __future__ import annotations

import re
import subprocess
import sys

NVIDIA_INDEX = "https://pypi.nvidia.com"
#: the install command for a qfold checkout (run from its root); ``tensorrt`` is the CUDA 13 build
INSTALL_COMMAND = f'pip install -e ".[tensorrt]" --extra-index-url {NVIDIA_INDEX}'
#: the same for torch built with CUDA 12 (or a driver without CUDA 13): the CUDA 12 wheel, not the extra
INSTALL_COMMAND_CU12 = f"pip install -e . tensorrt-cu12 --extra-index-url {NVIDIA_INDEX}"
#: what every "TensorRT is missing" error ends with
INSTALL_HINT = (
    "the TensorRT backend needs an NVIDIA GPU and TensorRT 10.x or 11.x: from a qfold checkout run "
    f"`{INSTALL_COMMAND}` (CUDA 13), or `{INSTALL_COMMAND_CU12}` when torch or the driver is CUDA 12 "
    "(docs/tensorrt.md); or use `--backend onnxruntime`, which works everywhere"
)
SUPPORTED_CUDA_MAJORS = (12, 13)


def cuda_major(version: str | None) -> int | None:
    """``"12.4"`` -> 12; None or unreadable -> None."""
    if not version:
        return None
    m = re.match(r"\s*(\d+)", str(version))
    return int(m.group(1)) if m else None


def tensorrt_wheel(torch_cuda: str | None, driver_cuda: str | None) -> str:
    """The TensorRT wheel for torch's CUDA (``torch.version.cuda``) and the driver's CUDA (``nvidia-smi``).

    Raises:
        ValueError: torch is a CPU build, its CUDA major has no TensorRT wheel, or the driver is
            older than torch's CUDA major (the message says what to change).

    >>> tensorrt_wheel("12.8", "13.0")
    'tensorrt-cu12'
    >>> tensorrt_wheel("13.0", "13.1")
    'tensorrt-cu13'
    """
    major = cuda_major(torch_cuda)
    if major is None:
        raise ValueError("torch is a CPU build (torch.version.cuda is None): install a CUDA build of torch first")
    if major not in SUPPORTED_CUDA_MAJORS:
        raise ValueError(
            f"torch is built for CUDA {torch_cuda}; TensorRT 10.x/11.x wheels exist for CUDA "
            f"{' and '.join(map(str, SUPPORTED_CUDA_MAJORS))} only: install a torch built for one of them"
        )
    drv = cuda_major(driver_cuda)
    if drv is not None and drv < major:
        raise ValueError(
            f"the NVIDIA driver supports CUDA {driver_cuda} but torch needs CUDA {major}: "
            f"upgrade the driver, or install a torch built for CUDA {drv} and use tensorrt-cu{drv}"
        )
    return f"tensorrt-cu{major}"


def driver_cuda_version() -> str | None:
    """The highest CUDA version the installed driver supports, from ``nvidia-smi``'s header; None without one."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*([0-9.]+)", out)
    return m.group(1) if m else None


def main() -> int:
    """Print the TensorRT wheel for this machine's torch and driver; exit 1 with the reason when there is none."""
    try:
        import torch
    except ImportError:
        print("torch is not installed", file=sys.stderr)
        return 1
    try:
        print(tensorrt_wheel(torch.version.cuda, driver_cuda_version()))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


__all__ = ["INSTALL_COMMAND", "INSTALL_COMMAND_CU12", "INSTALL_HINT", "NVIDIA_INDEX", "cuda_major", "driver_cuda_version", "tensorrt_wheel"]

if __name__ == "__main__":
    raise SystemExit(main())
