"""TensorRT backend: a Q/DQ ONNX -> a strongly typed TensorRT engine (10.x and 11.x) -> inference.

The only module that imports ``tensorrt``, and only inside functions: without it everything here
that needs no GPU (build planning, profiles, metadata, layer summaries) still works, and asking for
an engine raises :class:`TensorRTUnavailableError` saying how to install it.

Build rules (docs/tensorrt.md says where each comes from in TensorRT's headers and guides):

* INT8 comes only from the Q/DQ nodes (explicit quantization); no calibrator, ever.
* 11.x: every network is strongly typed, ``create_network(0)``, no precision flags (they are gone).
  10.x: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` and no precision flags. The weakly typed
  ``BuilderFlag.INT8`` (+ ``FP16``) path is used only in the explicit ``legacy_weak_typing`` mode,
  and only where those flags exist.
* FP16 fallback under strong typing means an FP16 ONNX (qfold.onnx.fp16); in legacy mode ``FP16``.
* ``BuilderFlag.TF32`` (on by default in 10.x and 11.x) is cleared, so FP32 layers compute in FP32.
* Workspace via ``set_memory_pool_limit(WORKSPACE)``; a timing cache ``<engine>.timing.cache``
  next to the engine, read before and written after each build; one optimization profile over
  the batch dimension (``EngineConfig.batch_min/opt/max``) when the batch is dynamic.
* The plan and its ``<engine>.json`` metadata are written atomically (calib.atomic); the metadata
  holds the TensorRT version, GPU name and compute capability, the ONNX and plan sha256, and the
  engine inspector's per-layer precisions summarised (INT8 layer count, float layers by name).
* Inference: ``set_input_shape``, ``set_tensor_address`` on 256-byte aligned torch CUDA tensors
  (misaligned batch chunks are copied; a rejected address raises), ``execute_async_v3`` on the
  engine's own torch stream.

The parts that need no TensorRT live in :mod:`qfold.engine.trt_plan` and are re-exported here.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from calib.atomic import atomic_write_bytes
from qfold.engine.base import (
    EngineConfig,
    EngineInfo,
    info_to_json,
    metadata_path,
    read_engine,
    sha256_bytes,
    sha256_file,
    write_engine,
)
from qfold.engine.trt_install import INSTALL_HINT
from qfold.engine.trt_plan import (
    BOOKKEEPING_LAYERS,
    TENSOR_ALIGNMENT,
    BuildPlan,
    LayerPrecisions,
    aligned_empty,
    aligned_tensor,
    batch_slices,
    check_compatible,
    format_parser_errors,
    is_aligned,
    plan_build,
    prepare_onnx,
    profile_shapes,
    summarize_layers,
    timing_cache_path,
    version_tuple,
)
from qfold.errors import EngineBuildError, TensorRTUnavailableError

__all__ = [
    "BACKEND",
    "BOOKKEEPING_LAYERS",
    "INSTALL_HINT",
    "BuildPlan",
    "EngineBuildError",
    "EngineConfig",
    "EngineInfo",
    "LayerPrecisions",
    "TensorRTBackend",
    "TensorRTEngine",
    "TensorRTUnavailableError",
    "aligned_empty",
    "aligned_tensor",
    "batch_slices",
    "check_available",
    "check_compatible",
    "format_parser_errors",
    "import_tensorrt",
    "info_to_json",
    "is_aligned",
    "metadata_path",
    "plan_build",
    "prepare_onnx",
    "profile_shapes",
    "read_engine",
    "sha256_bytes",
    "sha256_file",
    "summarize_layers",
    "timing_cache_path",
    "version_tuple",
    "write_engine",
]


# ----------------------------------------------------------------------------- TensorRT side


def check_available() -> None:
    """Raise :class:`TensorRTUnavailableError` unless ``tensorrt`` is installed and torch sees a CUDA device.

    Cheap (finds the package without importing it), so callers run it before any work:
    :func:`qfold.engine.require_backend` calls it for ``"tensorrt"``.
    """
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailableError(f"TensorRT is not installed: {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"no CUDA device is visible to torch: {INSTALL_HINT}")


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

    def __init__(self, engine: Any, info: EngineInfo, trt: Any, runtime: Any = None) -> None:
        import torch

        self.info = info
        self._trt, self._engine = trt, engine
        self._runtime = runtime  # the IRuntime that deserialized the engine lives as long as it
        self._bound: tuple[Any, dict[str, Any]] | None = None
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

    @property
    def stream(self) -> Any:
        """The torch CUDA stream every enqueue of this engine runs on (record timing events here)."""
        return self._stream

    @property
    def input_dtype(self) -> Any:
        """The torch dtype of the engine's input tensor."""
        return self._dtypes[self._in]

    def bind(self, x: Any) -> Any:
        """Set the input shape and the tensor addresses for one batch ``x`` (CUDA, the input dtype,
        at most the profile's max batch); return the output tensor that :meth:`enqueue` fills.

        ``x`` is copied when it is not contiguous at a 256-byte aligned address (a batch chunk is a
        view into the middle of the batch). The bound tensors stay alive until the next ``bind``.

        Raises:
            ValueError: TensorRT rejects the input shape.
            RuntimeError: TensorRT rejects a tensor address (``set_tensor_address`` returned False).
        """
        ctx = self._context
        x = aligned_tensor(x)
        if not ctx.set_input_shape(self._in, tuple(x.shape)):
            raise ValueError(f"TensorRT rejected input shape {tuple(x.shape)} for '{self._in}'")
        self._set_address(self._in, x)
        outs = {}
        for name in self._outputs:
            outs[name] = aligned_empty(tuple(ctx.get_tensor_shape(name)), self._dtypes[name], x.device)
            self._set_address(name, outs[name])
        self._bound = (x, outs)
        return outs[self._outputs[0]]

    def _set_address(self, name: str, tensor: Any) -> None:
        address = tensor.data_ptr()
        if not is_aligned(address):
            raise RuntimeError(f"tensor '{name}' sits at {address:#x}, not {TENSOR_ALIGNMENT}-byte aligned")
        if not self._context.set_tensor_address(name, address):
            raise RuntimeError(
                f"TensorRT rejected address {address:#x} for tensor '{name}' (set_tensor_address returned False); "
                "see the TensorRT log above"
            )

    def enqueue(self) -> None:
        """Queue one run of the bound tensors on :attr:`stream`, without waiting for it."""
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")

    def _run_batch(self, x: Any) -> Any:
        import torch

        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self.bind(x)
            self.enqueue()
        stream.synchronize()
        return out

    def engine_information(self, batch: int | None = None) -> str:
        """The engine inspector's JSON (``LayerInformationFormat.JSON``) at ``batch`` (default: the profile's max)."""
        shape = list(self._engine.get_tensor_shape(self._in))
        if shape[0] < 0:
            shape[0] = batch or self._max_batch
        if not self._context.set_input_shape(self._in, tuple(shape)):
            raise ValueError(f"TensorRT rejected input shape {tuple(shape)} for '{self._in}'")
        inspector = self._engine.create_engine_inspector()
        inspector.execution_context = self._context
        return str(inspector.get_engine_information(self._trt.LayerInformationFormat.JSON))

    def layer_precisions(self, batch: int | None = None) -> LayerPrecisions:
        """The inspector's per-layer precisions at ``batch`` (default: the profile's max)."""
        return summarize_layers(self.engine_information(batch))

    @property
    def input_name(self) -> str:
        """The name of the engine's one input tensor."""
        return self._in


class TensorRTBackend:
    """The ``tensorrt`` backend of :mod:`qfold.engine.base` (explicit Q/DQ INT8, strongly typed)."""

    name = "tensorrt"
    suffix = ".plan"

    def __init__(self, *, legacy_weak_typing: bool = False, verbose: bool = False) -> None:
        self.legacy_weak_typing = legacy_weak_typing
        self.verbose = verbose

    def build(self, onnx_path: Path, engine_path: Path, config: EngineConfig,
              data: Sequence[np.ndarray] | None = None) -> EngineInfo:
        """Build ``engine_path`` (+ metadata, + timing cache) from the Q/DQ ONNX at ``onnx_path``.

        ``data`` is not needed: TensorRT's INT8 comes only from the Q/DQ nodes (explicit quantization).
        """
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
        for flag in plan_cfg.cleared_flags:  # TF32: on by default; FP32 layers must compute in FP32
            bconf.clear_flag(getattr(trt.BuilderFlag, flag))
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
            engine_sha256=sha256_bytes(plan),
            versions={"tensorrt": trt.__version__},
            extra={
                "gpu": gpu,
                "compute_capability": cc,
                "strongly_typed": not self.legacy_weak_typing,
                "builder_flags": list(plan_cfg.builder_flags),
                "cleared_builder_flags": list(plan_cfg.cleared_flags),
                "tf32": "TF32" in set(trt.BuilderFlag.__members__) and "TF32" not in plan_cfg.cleared_flags,
                "engine_config": asdict(config),
                "profiles": profiles,
                "timing_cache": cache_file.name,
            },
        )
        runtime = trt.Runtime(logger)
        cuda_engine = runtime.deserialize_cuda_engine(plan)
        if cuda_engine is None:  # "the engine, or nullptr if it could not be deserialized" (NvInferRuntime.h)
            detail = "; ".join(logger.errors) or "no error was logged"
            raise EngineBuildError(f"TensorRT built {engine_path.name} but could not deserialize it: {detail}")
        engine = TensorRTEngine(cuda_engine, info, trt, runtime)
        try:  # cosmetic: a failure here must not throw away the engine TensorRT has built
            info.extra["layers"] = engine.layer_precisions(config.batch_opt).to_dict()
        except Exception as exc:  # noqa: BLE001 (inspector errors vary by TensorRT version)
            warnings.warn(f"{engine_path.name}: could not summarise layer precisions ({exc}); the engine is "
                          "written without them", RuntimeWarning, stacklevel=2)
            info.extra["layers"] = {"error": f"{type(exc).__name__}: {exc}"}
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
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            detail = "; ".join(logger.errors) or "no error was logged"
            raise EngineBuildError(f"TensorRT could not deserialize {engine_path}: {detail}")
        return TensorRTEngine(engine, info, trt, runtime)

BACKEND = TensorRTBackend()
