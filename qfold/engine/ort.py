"""The ONNX Runtime backend: an engine is the ORT rendering of a Q/DQ ONNX plus a JSON sidecar.

``build`` reads the TensorRT-profile Q/DQ ONNX, applies :func:`qfold.onnx_qdq.render_for_ort`
(so the CPU provider runs every quantized Conv/Gemm as an int8 kernel) and writes
``<engine>.onnx`` and ``<engine>.onnx.json`` atomically. ``load`` opens an ``InferenceSession`` on
the CPU provider by default; ``device="cuda"`` asks for the TensorRT and CUDA providers (in that
order) when this onnxruntime has them, and errors clearly when it has neither.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from calib.atomic import atomic_write_bytes, atomic_write_text
from qfold.engine.base import EngineConfig, EngineInfo
from qfold.onnx_qdq import OrtRendering, render_for_ort, tensors_needing_amax_for_ort

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _ort():
    import onnxruntime  # lazy: the backend registry imports this module only when asked

    return onnxruntime


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device`` ("cpu" or "cuda"), always ending with the CPU provider."""
    ort = _ort()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ValueError(f"EngineConfig.device must be 'cpu' or 'cuda', got {device!r}.")
    available = ort.get_available_providers()
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    if not gpu:
        raise RuntimeError(f"device='cuda' but this onnxruntime has only {available}; "
                           "pip install onnxruntime-gpu, or use device='cpu'.")
    return gpu + ["CPUExecutionProvider"]


def _session_options(config: EngineConfig):
    so = _ort().SessionOptions()
    so.graph_optimization_level = _ort().GraphOptimizationLevel.ORT_ENABLE_ALL
    if config.intra_op_threads:
        so.intra_op_num_threads = config.intra_op_threads
    return so


def ort_max_amax(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[np.ndarray]) -> dict[str, float]:
    """Max calibration of ``tensors`` (ONNX names) by running ``model`` in ORT on ``batches``.

    A fallback for :func:`qfold.onnx_qdq.tensors_needing_amax_for_ort` when no calibrator ran
    on the PyTorch side: :func:`ort_calibrate` with method ``max``.
    """
    return ort_calibrate(model, tensors, batches, "max")


def ort_calibrate(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[np.ndarray], method: str = "max", *, num_bins: int = 2048) -> dict[str, float]:
    """Calibrate ONNX tensors with :mod:`calib`'s streaming histograms by running ``model`` in ORT.

    Used for the tensors only the ONNX Runtime rendering quantizes (conv outputs on residual
    branches, :func:`qfold.onnx_qdq.tensors_needing_amax_for_ort`), with the same method as the
    PyTorch-side calibration. Graph optimizations are off so every named tensor exists.
    """
    import torch

    from calib import CalibMethod, HistogramObserver

    names = list(dict.fromkeys(tensors))
    if not names:
        return {}
    ort = _ort()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    observers = {n: HistogramObserver(num_bins) for n in names}
    for x in batches:
        for n, v in zip(names, sess.run(names, {in_name: np.ascontiguousarray(x, dtype=np.float32)})):
            observers[n].update(torch.from_numpy(np.asarray(v)))
    parsed = CalibMethod.parse(method)
    return {n: o.compute_amax(parsed) for n, o in observers.items()}


class OrtEngine:
    """A loaded ONNX Runtime engine: ``run(x)`` takes and returns float32 numpy arrays."""

    def __init__(self, engine_path: Path, info: EngineInfo, config: EngineConfig) -> None:
        ort = _ort()
        self.info = info
        self.session = ort.InferenceSession(str(engine_path), _session_options(config),
                                            providers=providers_for(config.device))
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (N, ...) and return the first output as float32."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"engine input must be a float array, got {x.dtype}; convert with x.astype(np.float32).")
            x = x.astype(np.float32)
        return np.asarray(self.session.run(None, {self._input: np.ascontiguousarray(x)})[0], dtype=np.float32)


class OrtBackend:
    """Backend "onnxruntime" (see :class:`qfold.engine.base.Backend`)."""

    name = "onnxruntime"

    def build(self, onnx_path: Path, engine_path: Path, config: EngineConfig | None = None,
              extra_amax: Mapping[str, float] | None = None,
              rendering: OrtRendering | None = None) -> EngineInfo:
        """Render ``onnx_path`` for ORT and write ``engine_path`` + ``engine_path``.json atomically.

        ``extra_amax``: amax for :func:`qfold.onnx_qdq.tensors_needing_amax_for_ort`; tensors
        without one stay float and are listed in the metadata under ``extra.float_for_lack_of_amax``.
        """
        ort = _ort()
        config, rendering = config or EngineConfig(), rendering or OrtRendering()
        onnx_path, engine_path = Path(onnx_path), Path(engine_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model {onnx_path} does not exist; run `qfold export` first.")
        providers = providers_for(config.device)
        src = onnx_path.read_bytes()
        model = onnx.load_from_string(src)
        needed = tensors_needing_amax_for_ort(model)
        rendered = render_for_ort(model, extra_amax, rendering)
        data = rendered.SerializeToString(deterministic=True)
        info = EngineInfo(
            backend=self.name,
            engine_path=engine_path.name,
            onnx_sha256=hashlib.sha256(src).hexdigest(),
            versions={"onnxruntime": ort.__version__, "onnx": onnx.__version__},
            extra={
                "engine_sha256": hashlib.sha256(data).hexdigest(),
                "providers": providers,
                "rendering": asdict(rendering),
                "extra_amax": {k: float(v) for k, v in sorted((extra_amax or {}).items())},
                "float_for_lack_of_amax": [t for t in needed if t not in (extra_amax or {})],
                "engine_config": asdict(config),
            },
        )
        atomic_write_bytes(engine_path, data)
        atomic_write_text(metadata_path(engine_path), json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
        return info

    def load(self, engine_path: Path, config: EngineConfig | None = None) -> OrtEngine:
        """Open a built engine; its sidecar metadata must exist and match the file."""
        config = config or EngineConfig()
        engine_path = Path(engine_path)
        meta = metadata_path(engine_path)
        if not engine_path.is_file() or not meta.is_file():
            raise FileNotFoundError(f"engine {engine_path} or its metadata {meta} is missing; build it with "
                                    "OrtBackend().build(...) / `qfold build`.")
        info = EngineInfo(**json.loads(meta.read_text()))
        digest = hashlib.sha256(engine_path.read_bytes()).hexdigest()
        if info.extra.get("engine_sha256") not in (None, digest):
            raise ValueError(f"engine {engine_path} does not match its metadata (sha256 differs); rebuild it.")
        return OrtEngine(engine_path, info, config)


def metadata_path(engine_path: str | Path) -> Path:
    """The JSON sidecar of an engine file: ``<engine>.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")
