"""TensorRT backend: a Q/DQ ONNX -> a strongly typed TensorRT engine (10.x and 11.x) -> inference.

The only module that imports ``tensorrt``, and only inside functions: without it everything here
that needs no GPU (build planning, profiles, metadata, layer summaries) still works, and asking for
an engine raises :class:`TensorRTUnavailableError` saying how to install it.

Build rules (../shared/research/tensorrt-and-calibration.md sections 2 and 4):

* INT8 comes only from the Q/DQ nodes (explicit quantization); no calibrator, ever.
* 11.x: every network is strongly typed, ``create_network(0)``, no precision flags (they are gone).
  10.x: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` and no precision flags. The weakly typed
  ``BuilderFlag.INT8`` (+ ``FP16``) path is used only in the explicit ``legacy_weak_typing`` mode,
  and only where those flags exist.
* FP16 fallback under strong typing means an FP16 ONNX (qfold.fp16); in legacy mode ``FP16``.
* Workspace via ``set_memory_pool_limit(WORKSPACE)``; a timing cache ``<engine>.timing.cache``
  next to the engine, read before and written after each build; one optimization profile over
  the batch dimension (``EngineConfig.batch_min/opt/max``) when the batch is dynamic.
* The plan and its ``<engine>.json`` metadata are written atomically (calib.atomic); the metadata
  holds the TensorRT version, GPU name and compute capability, the ONNX and plan sha256, and the
  engine inspector's per-layer precisions summarised (INT8 layer count, float layers by name).
* Inference: ``set_input_shape``, ``set_tensor_address`` on torch CUDA tensors, ``execute_async_v3``
  on a torch stream.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calib.atomic import atomic_write_bytes, atomic_write_text
from qfold.engine.base import EngineConfig, EngineInfo

INSTALL_HINT = (
    "the TensorRT backend needs the `tensorrt` package and an NVIDIA GPU: install it with "
    "`pip install qfold[tensorrt]` (TensorRT's wheels come from NVIDIA's Python package index), "
    "or use `--backend onnxruntime`, which works everywhere"
)
BOOKKEEPING_LAYERS = frozenset({"Reformat", "NoOp", "Constant"})  # move data, compute nothing


class TensorRTUnavailableError(ImportError):
    """TensorRT or a CUDA device is missing; the message says how to install or what to use instead."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; the message carries TensorRT's own errors."""


# ----------------------------------------------------------------------------- pure planning


@dataclass(frozen=True)
class BuildPlan:
    """How the network and builder config are set up for one TensorRT version.

    Attributes:
        strongly_typed_flag: pass ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (10.x only;
            11.x is always strongly typed and the flag is deprecated there).
        builder_flags: names of ``BuilderFlag`` members to set (legacy weak typing only).
        fp16_onnx: convert the ONNX's unquantized parts to FP16 before parsing.
    """

    strongly_typed_flag: bool
    builder_flags: tuple[str, ...]
    fp16_onnx: bool


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
        raise ValueError(f"TensorRT {version} is too old: qfold needs TensorRT 10.x or 11.x (`pip install qfold[tensorrt]`)")
    if legacy_weak_typing:
        if major >= 11 or "INT8" not in builder_flags:
            raise ValueError(
                f"legacy_weak_typing needs BuilderFlag.INT8, which TensorRT {version} does not have (removed in 11.0); "
                "build strongly typed instead (the default) and use fp16_fallback for FP16 layers"
            )
        extra = ("FP16",) if fp16_fallback and "FP16" in builder_flags else ()
        return BuildPlan(strongly_typed_flag=False, builder_flags=("INT8", *extra), fp16_onnx=False)
    if major < 11 and not has_strongly_typed:
        raise ValueError(
            f"TensorRT {version} has no strongly typed networks; upgrade TensorRT or pass legacy_weak_typing=True"
        )
    return BuildPlan(strongly_typed_flag=major < 11, builder_flags=(), fp16_onnx=fp16_fallback)


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


def _precision_of(fmt: str) -> str:
    f = fmt.lower()
    if "n/a" in f:
        return "unknown"
    if "int8" in f:
        return "int8"
    if "fp16" in f or "half" in f or "bf16" in f or "bfloat" in f:
        return "fp16"
    if "fp32" in f or "float" in f:
        return "fp32"
    return "other"


def summarize_layers(engine_information: str | Mapping[str, Any]) -> LayerPrecisions:
    """Summarise ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    Needs an engine built with ``ProfilingVerbosity.DETAILED`` and, for a dynamic batch, an
    inspector whose execution context has its input shapes set (otherwise formats read "N/A").
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
        inputs = layer.get("Inputs") or layer.get("Outputs") or []
        fmt = str(inputs[0].get("Format/Datatype", "")) if inputs and isinstance(inputs[0], Mapping) else ""
        p = _precision_of(fmt)
        if p == "unknown":
            raise ValueError(
                f"layer '{layer.get('Name')}' has no concrete format ({fmt!r}); give the inspector an execution "
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


# ----------------------------------------------------------------------------- files and metadata


def metadata_path(engine_path: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def timing_cache_path(engine_path: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.timing.cache`` (reused by the next build of that engine)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".timing.cache")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def info_to_json(info: EngineInfo) -> str:
    """Deterministic JSON for ``info`` (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(asdict(info), sort_keys=True, indent=2) + "\n"


def write_engine(engine_path: str | Path, plan: bytes, info: EngineInfo) -> Path:
    """Write the plan and then its metadata, each atomically; the metadata records the plan's sha256."""
    engine_path = Path(engine_path)
    if info.extra.get("engine_sha256") != sha256_bytes(plan):
        raise ValueError("EngineInfo.extra['engine_sha256'] does not match the plan being written")
    atomic_write_bytes(engine_path, plan)
    atomic_write_text(metadata_path(engine_path), info_to_json(info))
    return engine_path


def read_engine(engine_path: str | Path) -> tuple[bytes, EngineInfo]:
    """Read a plan and its metadata; raises if either is missing or they do not belong together."""
    engine_path = Path(engine_path)
    meta = metadata_path(engine_path)
    if not engine_path.is_file() or not meta.is_file():
        missing = engine_path if not engine_path.is_file() else meta
        raise FileNotFoundError(f"{missing} does not exist; build the engine first (qfold build --backend tensorrt)")
    plan = engine_path.read_bytes()
    info = EngineInfo(**json.loads(meta.read_text(encoding="utf-8")))
    if info.extra.get("engine_sha256") != sha256_bytes(plan):
        raise ValueError(f"{engine_path} does not match {meta} (sha256 differs); rebuild the engine")
    return plan, info


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

    from qfold.fp16 import convert_float_to_fp16

    model = onnx.load(str(onnx_path), load_external_data=True)
    return convert_float_to_fp16(model, keep_io_types=True).SerializeToString()


# ----------------------------------------------------------------------------- TensorRT side


def import_tensorrt() -> Any:
    """``import tensorrt`` with an actionable error; also requires a CUDA device."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from exc
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"no CUDA device is visible to torch: {INSTALL_HINT}")
    return trt


def _gpu() -> tuple[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _make_logger(trt: Any, verbose: bool) -> Any:
    class _Logger(trt.ILogger):  # collects errors so they can go into the exception message
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            if verbose or level <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT {severity.name}] {msg}")

    return _Logger()


class TensorRTEngine:
    """A deserialized engine with one input; numpy or torch CUDA tensors in, first output out."""

    def __init__(self, engine: Any, info: EngineInfo, trt: Any) -> None:
        import torch

        self.info = info
        self._trt, self._engine = trt, engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        if len(self._inputs) != 1:
            raise ValueError(f"qfold's TensorRT runner feeds one input; this engine has {self._inputs}")
        self._in = self._inputs[0]
        shape = tuple(engine.get_tensor_shape(self._in))
        self._max_batch = engine.get_tensor_profile_shape(self._in, 0)[2][0] if shape[0] < 0 else shape[0]
        self._dtypes = {n: torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(n)))).dtype for n in names}
        self._stream = torch.cuda.Stream()

    def run_torch(self, x: Any) -> Any:
        """Run ``x`` (a torch tensor, any device) and return the first output on CUDA."""
        import torch

        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"run needs a batch (N, ...) with N >= 1, got shape {tuple(x.shape)}")
        x = x.to(device="cuda", dtype=self._dtypes[self._in])
        parts = [self._run_batch(x[s]) for s in batch_slices(x.shape[0], self._max_batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one float32 batch ``(N, ...)`` and return the first output as float32 numpy."""
        import torch

        out = self.run_torch(torch.from_numpy(np.ascontiguousarray(x)))
        return out.float().cpu().numpy()

    def _run_batch(self, x: Any) -> Any:
        import torch

        ctx, stream = self._context, self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            x = x.contiguous()
            if not ctx.set_input_shape(self._in, tuple(x.shape)):
                raise ValueError(f"TensorRT rejected input shape {tuple(x.shape)} for '{self._in}'")
            ctx.set_tensor_address(self._in, x.data_ptr())
            outs = {}
            for name in self._outputs:
                outs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtypes[name], device="cuda")
                ctx.set_tensor_address(name, outs[name].data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        stream.synchronize()
        return outs[self._outputs[0]]

    def layer_precisions(self, batch: int | None = None) -> LayerPrecisions:
        """The inspector's per-layer precisions at ``batch`` (default: the profile's max)."""
        shape = list(self._engine.get_tensor_shape(self._in))
        if shape[0] < 0:
            shape[0] = batch or self._max_batch
        self._context.set_input_shape(self._in, tuple(shape))
        inspector = self._engine.create_engine_inspector()
        inspector.execution_context = self._context
        return summarize_layers(inspector.get_engine_information(self._trt.LayerInformationFormat.JSON))


class TensorRTBackend:
    """The ``tensorrt`` backend of :mod:`qfold.engine.base` (explicit Q/DQ INT8, strongly typed)."""

    name = "tensorrt"

    def __init__(self, *, legacy_weak_typing: bool = False, verbose: bool = False) -> None:
        self.legacy_weak_typing = legacy_weak_typing
        self.verbose = verbose

    def build(self, onnx_path: Path, engine_path: Path, config: EngineConfig) -> EngineInfo:
        """Build ``engine_path`` (+ metadata, + timing cache) from the Q/DQ ONNX at ``onnx_path``."""
        onnx_path, engine_path = Path(onnx_path), Path(engine_path)
        trt = import_tensorrt()
        plan_cfg = plan_build(
            trt.__version__,
            has_strongly_typed=hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
            builder_flags=set(trt.BuilderFlag.__members__),
            fp16_fallback=config.fp16_fallback,
            legacy_weak_typing=self.legacy_weak_typing,
        )
        onnx_bytes = prepare_onnx(onnx_path, fp16=plan_cfg.fp16_onnx)
        logger = _make_logger(trt, self.verbose)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan_cfg.strongly_typed_flag else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_bytes, str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(format_parser_errors(errors, onnx_path))

        bconf = builder.create_builder_config()
        bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
        if hasattr(bconf, "profiling_verbosity"):
            bconf.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        for flag in plan_cfg.builder_flags:
            bconf.set_flag(getattr(trt.BuilderFlag, flag))
        cache_file = timing_cache_path(engine_path)
        self._attach_timing_cache(bconf, cache_file)
        profiles = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shapes = profile_shapes(tensor.name, tuple(tensor.shape), config)
            if shapes is not None:
                profiles[tensor.name] = [list(s) for s in shapes]
        if profiles:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profiles.items():
                profile.set_shape(name, lo, opt, hi)
            bconf.add_optimization_profile(profile)

        serialized = builder.build_serialized_network(network, bconf)
        if serialized is None:
            detail = "\n".join(f"  {e}" for e in logger.errors) or "  (no error was logged; rerun with verbose=True)"
            raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}:\n{detail}")
        plan = memoryview(serialized).tobytes()
        atomic_write_bytes(cache_file, memoryview(bconf.get_timing_cache().serialize()).tobytes())

        gpu, cc = _gpu()
        info = EngineInfo(
            backend=self.name,
            engine_path=engine_path.name,
            onnx_sha256=sha256_file(onnx_path),
            versions={"tensorrt": trt.__version__},
            extra={
                "gpu": gpu,
                "compute_capability": cc,
                "engine_sha256": sha256_bytes(plan),
                "strongly_typed": not self.legacy_weak_typing,
                "builder_flags": list(plan_cfg.builder_flags),
                "engine_config": asdict(config),
                "profiles": profiles,
                "timing_cache": cache_file.name,
            },
        )
        engine = TensorRTEngine(trt.Runtime(logger).deserialize_cuda_engine(plan), info, trt)
        info.extra["layers"] = engine.layer_precisions(config.batch_opt).to_dict()
        write_engine(engine_path, plan, info)
        return info

    @staticmethod
    def _attach_timing_cache(bconf: Any, cache_file: Path) -> None:
        """Reuse the cache next to the engine; start empty if it is unreadable or from another GPU/version."""
        cache = None
        if cache_file.is_file():
            try:
                cache = bconf.create_timing_cache(cache_file.read_bytes())
            except Exception:  # noqa: BLE001 (a truncated or foreign cache; TensorRT's error type varies)
                cache = None
        if cache is None or not bconf.set_timing_cache(cache, ignore_mismatch=False):
            bconf.set_timing_cache(bconf.create_timing_cache(b""), ignore_mismatch=False)

    def load(self, engine_path: Path, config: EngineConfig) -> TensorRTEngine:
        """Load an engine built by :meth:`build` on this TensorRT version and GPU architecture."""
        trt = import_tensorrt()
        plan, info = read_engine(engine_path)
        check_compatible(info, trt.__version__, _gpu()[1])
        logger = _make_logger(trt, self.verbose)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            detail = "; ".join(logger.errors) or "no error was logged"
            raise EngineBuildError(f"TensorRT could not deserialize {engine_path}: {detail}")
        return TensorRTEngine(engine, info, trt)


TrtBackend = TensorRTBackend  # the name qfold.engine.BACKENDS refers to
BACKEND = TensorRTBackend()
