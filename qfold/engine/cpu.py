"""Which int8 rendering a CPU computes exactly: detection from ``/proc/cpuinfo`` and the target names.

Pure (no ONNX, no onnxruntime): parsing is a function of the ``/proc/cpuinfo`` text and the machine
name, so it is tested against recorded flag sets. Flags can be missing (macOS, Windows) or not the
CPU the process really runs on (user-mode emulators pass the host's ``/proc/cpuinfo`` through), so
:func:`detect` also takes a *probe*: :func:`qfold.engine.ort_cpu.u8s8_saturates` runs ONNX Runtime's
own u8 x s8 kernels on inputs that saturate int16 pair sums, and its answer wins over the flags. Why the classes exist (docs/cpu-int8-targets.md):

* x86-64 **without** an int8 dot-product instruction (AVX2 only, or AVX512 without VNNI) multiplies
  u8 activations by s8 weights with ``vpmaddubsw``, which adds *pairs* of products into a
  **saturating int16** (255 * 127 * 2 = 64,770 > 32,767). Both operands unsigned (u8 x u8, weights
  stored as ``w + 128`` with zero point 128, the same numbers) use kernels that do not saturate.
* x86-64 with AVX512-VNNI, AVX-VNNI or AMX-INT8 accumulates u8 x s8 straight into int32.
* ARM64 uses ``sdot``/``udot``/``smmla`` or widening multiplies into int32: no int16 pair sums.

Targets (what :func:`qfold.onnx.ort_render.render_weights_for_target` renders):

``vnni``      u8 activations x s8 weights: ONNX Runtime's fast path; exact with VNNI/AMX.
``arm64``     the same graph as ``vnni``; exact on ARM64.
``portable``  u8 activations x u8 weights (zero point 128): exact on every CPU, slower where VNNI exists.
"""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

#: every rendering target (``auto`` resolves to one of them, see :func:`resolve_target`).
TARGETS = ("vnni", "portable", "arm64")
#: what a user may ask for (``EngineConfig.cpu_target``, ``--cpu-target``).
TARGET_CHOICES = ("auto",) + TARGETS
#: the x86 flags of an instruction that accumulates u8 x s8 products straight into int32.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: weight storage per target: signed int8 (zero point 0) or unsigned (zero point 128).
WEIGHT_TYPE = {"vnni": "int8", "arm64": "int8", "portable": "uint8"}

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM64 = ("aarch64", "arm64", "armv8", "armv8l")


@dataclass(frozen=True)
class CpuInfo:
    """What is known about a CPU's int8 capability.

    Attributes:
        machine: ``platform.machine()`` lower-cased (``x86_64``, ``aarch64``, ...).
        flags: x86 ``flags`` or ARM ``Features`` of the first processor in ``/proc/cpuinfo``.
        model: the ``model name`` line (informational; may be generic, e.g. "AMD EPYC").
        source: where the flags came from, or why there are none.
        u8s8_saturates: what the kernel probe measured (None: not probed).
    """

    machine: str
    flags: frozenset[str]
    model: str = ""
    source: str = "/proc/cpuinfo"
    u8s8_saturates: bool | None = None

    @property
    def is_x86(self) -> bool:
        return self.machine in _X86

    @property
    def is_arm64(self) -> bool:
        return self.machine in _ARM64

    @property
    def known(self) -> bool:
        """True when the flags were read (an x86 CPU without flags is treated as the worst case)."""
        return bool(self.flags)

    @property
    def int8_class(self) -> str:
        """The rendering target that is both exact and fastest on this CPU (a probe beats the flags)."""
        if self.u8s8_saturates:
            return "portable"
        if self.is_arm64:
            return "arm64"
        if self.is_x86 and (any(f in self.flags for f in VNNI_FLAGS) or self.u8s8_saturates is False):
            return "vnni"
        return "portable"

    def describe(self) -> str:
        """One line naming the CPU's int8 class, e.g. ``x86_64 with AVX2, no VNNI (AMD EPYC)``."""
        f = self.flags
        if self.is_arm64:
            extras = [n for n, k in (("dot product", "asimddp"), ("i8mm", "i8mm")) if k in f]
            what = "ARM64" + (" with " + ", ".join(extras) if extras else "")
        elif self.is_x86 and not self.known:
            what = f"{self.machine} (int8 instructions unknown: {self.source})"
        elif self.is_x86:
            vnni = [k for k in VNNI_FLAGS if k in f]
            simd = "AVX512" if "avx512f" in f else "AVX2" if "avx2" in f else "SSE" if "sse4_1" in f else "no AVX2"
            what = f"{self.machine} with {simd}, " + ("VNNI (" + ", ".join(vnni) + ")" if vnni else "no VNNI")
        else:
            what = self.machine or "unknown machine"
        if self.u8s8_saturates is not None:
            what += "; ONNX Runtime u8 x s8 kernels " + ("SATURATE" if self.u8s8_saturates else "exact") + " here"
        return what + (f" ({self.model})" if self.model else "")


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` text (first processor's ``flags`` or ``Features`` line) for ``machine``."""
    flags: frozenset[str] = frozenset()
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return CpuInfo(machine.lower(), flags, model, "/proc/cpuinfo" if flags else "/proc/cpuinfo has no flags line")


def detect(cpuinfo_path: str | Path = "/proc/cpuinfo", machine: str | None = None,
           saturation_probe: Callable[[], bool] | None = None) -> CpuInfo:
    """The running CPU. Without a readable ``/proc/cpuinfo`` (macOS, Windows, containers hiding it)
    the flags are empty, so an x86 CPU falls back to the conservative ``portable`` class unless
    ``saturation_probe`` (True: u8 x s8 kernels saturate here) says otherwise."""
    machine = (machine or platform.machine() or "").lower()
    try:
        info = parse_cpuinfo(Path(cpuinfo_path).read_text(errors="replace"), machine)
    except OSError as exc:
        info = CpuInfo(machine, frozenset(), "", f"{cpuinfo_path} unreadable ({exc.__class__.__name__})")
    if saturation_probe is not None:
        info = replace(info, u8s8_saturates=bool(saturation_probe()))
    return info


def resolve_target(requested: str, cpu: CpuInfo | None = None) -> str:
    """``auto`` -> ``cpu``'s class (default: :func:`detect`, flags only); a named target is checked
    and returned as is."""
    if requested not in TARGET_CHOICES:
        raise ValueError(f"cpu_target must be one of {', '.join(TARGET_CHOICES)}, got {requested!r}.")
    if requested != "auto":
        return requested
    return (cpu or detect()).int8_class


def exact_on(target: str, cpu: CpuInfo) -> bool:
    """True when an engine rendered for ``target`` computes its graph exactly on ``cpu``
    (s8 weights are wrong only on x86 without an int32-accumulating int8 dot product)."""
    if target not in TARGETS:
        raise ValueError(f"unknown cpu target {target!r}; known: {', '.join(TARGETS)}.")
    return WEIGHT_TYPE[target] == "uint8" or cpu.int8_class in ("vnni", "arm64")
