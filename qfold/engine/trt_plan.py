"""The pure half of the TensorRT backend: everything :mod:`qfold.engine.trt` decides without TensorRT.

Build planning for the installed TensorRT version (:func:`plan_build`, :class:`BuildPlan`,
:func:`version_tuple`), the dynamic-batch optimization profile (:func:`profile_shapes`,
:func:`batch_slices`), parser error messages (:func:`format_parser_errors`), the engine
inspector's per-layer precisions on TensorRT 10.x and 11.x (:func:`summarize_layers`,
:class:`LayerPrecisions`), 256-byte aligned tensor addresses (:func:`is_aligned`,
:func:`aligned_tensor`, :func:`aligned_empty`; these import torch lazily), and the engine files
and metadata (paths, sha256, atomic write/read, compatibility check, the ONNX bytes to parse).
This module never imports ``tensorrt``; :mod:`qfold.engine.trt` re-exports all of it.
"""
from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qfold.engine.base import EngineConfig, EngineInfo
from qfold.engine.trt_install import INSTALL_COMMAND

BOOKKEEPING_LAYERS = frozenset({"Reformat", "NoOp", "Constant"})  # move data, compute nothing


# ----------------------------------------------------------------------------- pure planning


@dataclass(frozen=True)
class BuildPlan:
    """How the network and builder config are set up for one TensorRT version.

    Attributes:
        strongly_typed_flag: pass ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (10.x only;
            11.x is always strongly typed and the flag is deprecated there).
        builder_flags: names of ``BuilderFlag`` members to set (legacy weak typing only).
        fp16_onnx: convert the ONNX's unquantized parts to FP16 before parsing.
        cleared_flags: names of ``BuilderFlag`` members to clear: ``TF32``, which is on by
            default in 10.x and 11.x ("Enabled by default", include/NvInfer.h, BuilderFlag::kTF32,
            NVIDIA/TensorRT release/10.13 and main = 11.1), so that layers the inspector reports as
            FP32 really compute in FP32 (TF32 rounds inner-product inputs to 10-bit mantissas).
    """

    strongly_typed_flag: bool
    builder_flags: tuple[str, ...]
    fp16_onnx: bool
    cleared_flags: tuple[str, ...] = ()


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; reading stops at the first non-numeric part."""
    parts: list[int] = []
    for p in version.split("."):
        digits = p[: len(p) - len(p.lstrip("0123456789"))]  # leading digits: "0rc1" -> "0"
        if digits:
            parts.append(int(digits))
        if not digits or digits != p:
            break
    if not parts:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return tuple(parts)


def plan_build(
    version: str,
    *,
    has_strongly_typed: bool,
    builder_flags: Collection[str],
    fp16_fallback: bool,
    legacy_weak_typing: bool = False,
) -> BuildPlan:
    """Decide network flags and builder flags from what the installed TensorRT has.

    Args:
        version: ``tensorrt.__version__``.
        has_strongly_typed: ``NetworkDefinitionCreationFlag`` has ``STRONGLY_TYPED``.
        builder_flags: the names ``BuilderFlag`` defines (11.x has no INT8/FP16).
        fp16_fallback: run unquantized layers in FP16.
        legacy_weak_typing: 10.x only: weakly typed network with ``INT8`` (+ ``FP16``) flags.
    """
    major = version_tuple(version)[0]
    if major < 10:
        raise ValueError(f"TensorRT {version} is too old: qfold needs TensorRT 10.x or 11.x ({INSTALL_COMMAND})")
    clear = ("TF32",) if "TF32" in builder_flags else ()
    if legacy_weak_typing:
        if major >= 11 or "INT8" not in builder_flags:
            raise ValueError(
                f"legacy_weak_typing needs BuilderFlag.INT8, which TensorRT {version} does not have (removed in 11.0); "
                "build strongly typed instead (the default) and use fp16_fallback for FP16 layers"
            )
        extra = ("FP16",) if fp16_fallback and "FP16" in builder_flags else ()
        return BuildPlan(strongly_typed_flag=False, builder_flags=("INT8", *extra), fp16_onnx=False, cleared_flags=clear)
    if major < 11 and not has_strongly_typed:
        raise ValueError(
            f"TensorRT {version} has no strongly typed networks; upgrade TensorRT or pass legacy_weak_typing=True"
        )
    return BuildPlan(strongly_typed_flag=major < 11, builder_flags=(), fp16_onnx=fp16_fallback, cleared_flags=clear)


def profile_shapes(
    name: str, shape: Sequence[int], config: EngineConfig
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) shapes for input ``name`` with dynamic batch, or None when it is static.

    Only dimension 0 may be dynamic (-1); the batch range comes from ``config``.
    """
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape[1:]):
        raise ValueError(
            f"input '{name}' has shape {shape} with a dynamic non-batch dimension; qfold's TensorRT profile varies "
            "the batch only: export the ONNX with fixed channel and spatial sizes (dynamic_axes on dim 0 only)"
        )
    if not shape or shape[0] >= 0:
        return None
    lo, opt, hi = config.batch_min, config.batch_opt, config.batch_max
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"EngineConfig needs 1 <= batch_min <= batch_opt <= batch_max, got {lo}, {opt}, {hi}")
    rest = shape[1:]
    return (lo, *rest), (opt, *rest), (hi, *rest)


def batch_slices(n: int, max_batch: int) -> list[slice]:
    """Split ``n`` rows into consecutive slices of at most ``max_batch`` (the profile's max)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [slice(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


def format_parser_errors(errors: Sequence[str], onnx_path: str | Path) -> str:
    """One message from the ONNX parser's errors, with the usual causes of Q/DQ parse failures."""
    lines = "\n".join(f"  [{i}] {e}" for i, e in enumerate(errors)) or "  (the parser reported no message)"
    return (
        f"TensorRT could not parse {onnx_path}:\n{lines}\n"
        "Q/DQ graphs for TensorRT need opset >= 13, INT8 zero points equal to 0, strictly positive scales, "
        "an explicit `axis` on per-channel weight Q/DQ and per-tensor activations"
    )


# ----------------------------------------------------------------------------- layer precisions


@dataclass(frozen=True)
class LayerPrecisions:
    """The engine inspector's layers summarised by the precision they compute in.

    A layer's precision is that of its first input (the data it computes on): an INT8 conv reads
    INT8 whatever it writes. Reformat/NoOp/Constant layers are left out.

    Attributes:
        int8: how many layers run in INT8.
        float_layers: names of the layers that run in FP16/BF16/FP32 (the fallback), engine order.
        fp16: how many of those are FP16 or BF16.
        fp32: how many of those are FP32.
        other: layers whose type was neither (FP8, INT32 shape arithmetic, ...).
    """

    int8: int
    float_layers: tuple[str, ...]
    fp16: int
    fp32: int
    other: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["float_layers"] = list(self.float_layers)
        return d


#: keys that carry a tensor's data type in the inspector's per-layer JSON, newest schema first:
#: TensorRT 11.x splits the 10.x ``Format/Datatype`` string into ``Format`` and ``Datatype``
#: (migration guide "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"; NVIDIA/TensorRT
#: main, .agents/skills/trt-perf-analysis/schemas/analyze-data.schema.json, tensor properties).
#: ``DataType`` is the spelling 11.x uses for its new "I/O Tensors" records; accepted as well.
TYPE_KEYS = ("Datatype", "DataType", "Format/Datatype")


def _precision_of(text: str) -> str:
    """``"Row major linear FP32"`` / ``"Float"`` / ``"Int8"`` ... -> int8, fp16, fp32, other or unknown."""
    f = text.lower()
    if "n/a" in f:
        return "unknown"
    if any(k in f for k in ("fp8", "float8", "e4m3", "e5m2", "fp4", "int4", "uint8")):
        return "other"
    if "int8" in f:
        return "int8"
    if any(k in f for k in ("fp16", "half", "bf16", "bfloat")):
        return "fp16"
    if "fp32" in f or "float" in f:
        return "fp32"
    return "other"


def tensor_type(tensor: Mapping[str, Any]) -> str | None:
    """The data-type text of one inspector tensor record (10.x or 11.x schema), or None when it has none."""
    for key in TYPE_KEYS:
        value = tensor.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def summarize_layers(engine_information: str | Mapping[str, Any]) -> LayerPrecisions:
    """Summarise ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    Reads the TensorRT 10.x schema (``"Format/Datatype": "Row major linear FP32"``) and the 11.x
    one (``"Datatype"`` next to ``"Format"``). Needs an engine built with
    ``ProfilingVerbosity.DETAILED`` and, for a dynamic batch, an inspector whose execution context
    has its input shapes set (otherwise types read "N/A").

    Raises:
        ValueError: no ``Layers`` list, names only (not DETAILED), a layer whose tensors carry no
            type field (an inspector schema qfold does not know: counting it as zero INT8 layers
            would be wrong), or "N/A" types.
    """
    data = json.loads(engine_information) if isinstance(engine_information, str) else engine_information
    layers = data.get("Layers")
    if not isinstance(layers, list):
        raise ValueError("engine information has no 'Layers' list; pass the inspector's JSON output")  # noqa: TRY004
    int8, fp16, fp32, other = 0, 0, 0, 0
    float_names: list[str] = []
    for layer in layers:
        if not isinstance(layer, Mapping):
            raise ValueError(  # noqa: TRY004 (valid JSON, wrong verbosity: a value problem)
                "engine information lists layer names only; build with ProfilingVerbosity.DETAILED to see precisions"
            )
        if layer.get("LayerType") in BOOKKEEPING_LAYERS:
            continue
        tensors = [t for t in (layer.get("Inputs") or layer.get("Outputs") or []) if isinstance(t, Mapping)]
        text = tensor_type(tensors[0]) if tensors else None
        if text is None:
            if not tensors:
                other += 1  # no data tensor at all (e.g. a layer producing a shape): nothing to classify
                continue
            raise ValueError(
                f"layer '{layer.get('Name')}' has tensors without a type field (looked for {', '.join(TYPE_KEYS)}; "
                f"found keys {sorted(tensors[0])}); this TensorRT's inspector JSON schema is not one qfold reads"
            )
        p = _precision_of(text)
        if p == "unknown":
            raise ValueError(
                f"layer '{layer.get('Name')}' has no concrete type ({text!r}); give the inspector an execution "
                "context whose input shapes are set"
            )
        if p == "int8":
            int8 += 1
        elif p in ("fp16", "fp32"):
            float_names.append(str(layer.get("Name", "?")))
            fp16 += p == "fp16"
            fp32 += p == "fp32"
        else:
            other += 1
    return LayerPrecisions(int8, tuple(float_names), fp16, fp32, other)


# ----------------------------------------------------------------------------- tensor addresses

#: ``IExecutionContext::setTensorAddress``: "The pointer must have at least 256-byte alignment"
#: (include/NvInferRuntime.h, NVIDIA/TensorRT release/10.0, release/10.13 and main = 11.1).
TENSOR_ALIGNMENT = 256


def is_aligned(address: int, alignment: int = TENSOR_ALIGNMENT) -> bool:
    """True when ``address`` is a multiple of ``alignment`` bytes."""
    return address % alignment == 0


def aligned_tensor(x: Any, alignment: int = TENSOR_ALIGNMENT) -> Any:
    """``x`` itself when it is contiguous at an aligned address, else a contiguous aligned copy.

    A batch chunk ``x[i:j]`` is a view starting ``i`` rows into ``x``; ``.contiguous()`` returns it
    as is, at an address TensorRT may reject. The copy is carved out of a slightly larger buffer
    so that it is aligned on any device and allocator (torch's CPU allocator aligns to 64 bytes
    only). Works on CPU and CUDA tensors alike.
    """
    if x.is_contiguous() and is_aligned(x.data_ptr(), alignment):
        return x
    return aligned_empty(tuple(x.shape), x.dtype, x.device, alignment).copy_(x)


def aligned_empty(shape: Sequence[int], dtype: Any, device: Any, alignment: int = TENSOR_ALIGNMENT) -> Any:
    """An uninitialised contiguous tensor whose first element sits at an ``alignment``-byte address."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    if alignment % itemsize:
        raise ValueError(f"alignment {alignment} is not a multiple of the {dtype} element size {itemsize}")
    n = 1
    for d in shape:
        n *= int(d)
    buf = torch.empty(n + alignment // itemsize, dtype=dtype, device=device)
    skip = (-buf.data_ptr() % alignment) // itemsize
    out = buf[skip:skip + n].view(tuple(shape))
    if not is_aligned(out.data_ptr(), alignment):  # cannot happen: itemsize divides alignment
        raise RuntimeError(f"could not place a {dtype} tensor at a {alignment}-byte aligned address")
    return out


# ----------------------------------------------------------------------------- files and metadata


def timing_cache_path(engine_path: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.timing.cache`` (reused by the next build of that engine)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".timing.cache")


def check_compatible(info: EngineInfo, trt_version: str, compute_capability: str) -> None:
    """Engines only load on the TensorRT version and GPU architecture that built them."""
    built_v, built_cc = info.versions.get("tensorrt"), info.extra.get("compute_capability")
    if built_v != trt_version or built_cc != compute_capability:
        raise ValueError(
            f"{info.engine_path} was built with TensorRT {built_v} for compute capability {built_cc}; this machine "
            f"has TensorRT {trt_version} and compute capability {compute_capability}. Rebuild the engine here "
            "(TensorRT plans are not portable across versions or GPU architectures)"
        )


def prepare_onnx(onnx_path: str | Path, *, fp16: bool) -> bytes:
    """The ONNX bytes TensorRT parses: the file as is, or its FP16-fallback conversion."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist; export the Q/DQ ONNX first")
    if not fp16:
        return onnx_path.read_bytes()
    import onnx

    from qfold.onnx.fp16 import convert_float_to_fp16

    model = onnx.load(str(onnx_path), load_external_data=True)
    return convert_float_to_fp16(model, keep_io_types=True).SerializeToString()
