"""The ONNX Runtime backend: an engine is the ORT rendering of a Q/DQ ONNX plus a JSON sidecar.

``build`` reads the TensorRT-profile Q/DQ ONNX, applies :func:`qfold.onnx.qdq.render_for_ort`
(so the CPU provider runs every quantized Conv/Gemm as an int8 kernel) and writes
``<engine>.onnx`` and ``<engine>.onnx.json`` atomically. ``load`` opens an ``InferenceSession`` on
the CPU provider by default; ``device="cuda"`` asks for the TensorRT and CUDA providers (in that
order) when this onnxruntime has them, and errors clearly when it has neither.

CPU targets (docs/cpu-int8-targets.md): the rendering is made for a CPU class (``vnni``,
``portable``, ``arm64``; ``auto`` = the building CPU) and the class is recorded in the metadata.
Given calibration batches, ``build`` runs the engine on this CPU against its exact portable twin
and writes nothing when the integer kernels deviate; its deviation from the Q/DQ ONNX's float
semantics (the fake-quant model) is recorded and warned (:mod:`qfold.engine.ort_check`).
``load`` never runs int8 weights on a CPU whose kernels would saturate: with ``cpu_target="auto"``
it re-renders the engine in memory for ``portable`` (an exact pass) and warns; with an explicit
``vnni``/``arm64`` it refuses.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx

from qfold.engine.base import (
    EngineConfig,
    EngineInfo,
    read_engine,
    sha256_bytes,
    write_engine,
)
from qfold.engine.cpu import TARGET_CHOICES, CpuInfo, exact_on, resolve_target
from qfold.engine.ort_check import CheckResult, compare
from qfold.engine.ort_cpu import detect_cpu
from qfold.errors import EngineCheckError
from qfold.onnx.ort_target import int16_pair_sum_risks, weight_types, weights_to_uint8
from qfold.onnx.qdq import OrtRendering, render_for_ort, tensors_needing_amax_for_ort
from qfold.onnx.tensor_amax import recorded_tensor_amax

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: calibration rows the build self-check runs on (engine vs its portable twin, and vs the Q/DQ ONNX):
#: at most SELF_CHECK_SAMPLES, and no more than SELF_CHECK_VALUES input values in all (27 images of
#: 224x224x3), at least SELF_CHECK_MIN_SAMPLES. A saturating kernel shows on any input: what the
#: check needs is coverage of every layer, which a few large images give as well as many small ones.
SELF_CHECK_SAMPLES = 256
SELF_CHECK_VALUES = 1 << 22
SELF_CHECK_MIN_SAMPLES = 8


def self_check_rows(row_values: int) -> int:
    """How many calibration rows the self-check runs on, for rows of ``row_values`` input values each."""
    return max(SELF_CHECK_MIN_SAMPLES, min(SELF_CHECK_SAMPLES, SELF_CHECK_VALUES // max(1, row_values)))


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


def _session_options(config: EngineConfig, optimize: bool = True):
    so = _ort().SessionOptions()
    level = _ort().GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if config.intra_op_threads:
        so.intra_op_num_threads = config.intra_op_threads
    return so


def engine_target(model: onnx.ModelProto, recorded: str | None = None) -> str:
    """The CPU target an engine graph was rendered for: the recorded one, else read off the graph
    (uint8 weights: ``portable``; int8 weights: ``vnni``, whose graph ``arm64`` shares)."""
    if recorded is not None:
        return recorded
    return "vnni" if "int8" in weight_types(model) else "portable"


def for_this_cpu(model: onnx.ModelProto, target: str, requested: str = "auto",
                 cpu: CpuInfo | None = None) -> tuple[onnx.ModelProto, str | None]:
    """The engine graph to run on ``cpu`` (default: this one) and a warning, or None.

    ``requested`` is :attr:`EngineConfig.cpu_target` at load time (see there). Raises RuntimeError
    naming both CPUs and the fix when an explicit ``vnni``/``arm64`` cannot run exactly here.
    """
    if requested not in TARGET_CHOICES:
        raise ValueError(f"cpu_target must be one of {', '.join(TARGET_CHOICES)}, got {requested!r}.")
    cpu = cpu or detect_cpu()
    if requested == "portable" or (requested == "auto" and not exact_on(target, cpu)):
        if target == "portable":
            return model, None
        note = None
        if requested == "auto":
            note = (f"this engine was rendered for '{target}' CPUs (int8 weights), but this CPU is {cpu.describe()}, "
                    "whose u8 x s8 int8 kernels saturate int16 pair sums; running it re-rendered in memory for "
                    "'portable' (uint8 weights, bit-identical, exact here, slower than on a VNNI CPU). To skip this "
                    "step, build the engine with --cpu-target portable (EngineConfig(cpu_target='portable')) or "
                    "on a CPU of this class.")
        return weights_to_uint8(model), note
    if requested != "auto" and not exact_on(target, cpu):
        raise RuntimeError(
            f"cpu_target={requested!r}: this engine ('{target}' rendering, int8 weights) would saturate on this CPU "
            f"({cpu.describe()}): its u8 x s8 int8 kernels add pairs of products into int16. Load it with "
            "cpu_target='auto' or 'portable' (exact re-rendering in memory), or rebuild with --cpu-target portable.")
    return model, None


def ort_max_amax(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[np.ndarray]) -> dict[str, float]:
    """Max calibration of ``tensors`` (ONNX names) by running ``model`` in ORT on ``batches``.

    A fallback for :func:`qfold.onnx.qdq.tensors_needing_amax_for_ort` when no calibrator ran
    on the PyTorch side: :func:`ort_calibrate` with method ``max``.
    """
    return ort_calibrate(model, tensors, batches, "max")


def ort_calibrate(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[np.ndarray], method: str = "max", *, num_bins: int = 2048) -> dict[str, float]:
    """Calibrate ONNX tensors with :mod:`calib`'s streaming histograms by running ``model`` in ORT.

    Used for the tensors only the ONNX Runtime rendering quantizes (conv outputs on residual
    branches, :func:`qfold.onnx.qdq.tensors_needing_amax_for_ort`), with the same method as the
    PyTorch-side calibration. Graph optimizations are off so every named tensor exists.
    """
    return ort_calibrate_with_outputs(model, tensors, batches, method, num_bins=num_bins)[0]


def ort_calibrate_with_outputs(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[np.ndarray], method: str = "max", *,
                               num_bins: int = 2048, keep: int = 0) -> tuple[dict[str, float], list[np.ndarray]]:
    """:func:`ort_calibrate`, also returning the model's first output (float32) on the first ``keep`` batches.

    With optimizations off those outputs are what :meth:`OrtEngine.check` computes for its
    ``reference`` graph, so a build's rendering check on the same batches can take them instead of
    running the graph again. No tensor to calibrate: ``({}, [])`` without running the graph.
    """
    import torch

    from calib import CalibMethod, HistogramObserver

    names = list(dict.fromkeys(tensors))
    if not names:
        return {}, []
    ort = _ort()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False  # the arena grows with every batch's fetched tensors and never shrinks
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    first = sess.get_outputs()[0].name
    observers = {n: HistogramObserver(num_bins) for n in names}
    outputs: list[np.ndarray] = []
    for i, x in enumerate(batches):
        fetch = [*names, first] if i < keep else names
        got = sess.run(fetch, {in_name: np.ascontiguousarray(x, dtype=np.float32)})
        for n, v in zip(names, got):
            observers[n].update(torch.from_numpy(np.asarray(v)))
        if i < keep:
            outputs.append(np.array(got[-1], dtype=np.float32, copy=True))  # a copy: a view keeps the session's buffers alive
    parsed = CalibMethod.parse(method)
    return {n: o.compute_amax(parsed) for n, o in observers.items()}, outputs


def _replay(outputs: Sequence[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A stand-in for a model already run on the batches: returns ``outputs`` in order, checking
    each batch's row count."""
    it = iter(outputs)

    def run(x: np.ndarray) -> np.ndarray:
        out = next(it, None)
        if out is None or len(out) != len(x):
            raise ValueError("precomputed outputs do not match the check batches (count or rows differ)")
        return out
    return run


class OrtEngine:
    """A loaded ONNX Runtime engine: ``run(x)`` takes and returns float32 numpy arrays.

    Attributes:
        info: the metadata.
        target: the CPU target of the engine file; ``running_as`` the one this session runs
            (``portable`` after an in-memory re-rendering).
        cpu: the CPU it runs on.
    """

    def __init__(self, model: onnx.ModelProto, info: EngineInfo, config: EngineConfig) -> None:
        ort = _ort()
        self.info = info
        self.cpu = detect_cpu()
        self.target = engine_target(model, info.extra.get("cpu_target"))
        runnable, note = model, None  # GPU providers have no int16 pair sums (and TensorRT wants int8 weights)
        if config.device == "cpu":
            runnable, note = for_this_cpu(model, self.target, config.cpu_target, self.cpu)
        if note:
            warnings.warn(note, RuntimeWarning, stacklevel=3)
        self.running_as = self.target if runnable is model else "portable"
        self._graph = model
        self._config = config
        self.session = ort.InferenceSession(runnable.SerializeToString(), _session_options(config),
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

    def check(self, batches: Iterable[np.ndarray], reference: onnx.ModelProto | None = None, *,
              outputs: Sequence[np.ndarray] | None = None, reference_outputs: Sequence[np.ndarray] | None = None) -> CheckResult | None:
        """This engine on this CPU against a reference (:mod:`qfold.engine.ort_check`).

        Default reference: the *portable twin*, the same graph with its int8 weights stored as
        uint8 ``w + 128`` (bit-identical numbers), run with the same optimizations. The two fuse into
        the same kernels and differ only in the u8 x s8 vs u8 x u8 multiply, which is exact
        everywhere in u8 x u8: so this isolates the one thing a CPU can break (int16 pair-sum
        saturation). With ``reference`` (the TensorRT-profile Q/DQ ONNX): that graph run as float
        ops, i.e. the fake-quant model, which the ORT rendering approximates (extra Q/DQ, and Q/DQ
        pairs ONNX Runtime's optimizer merges or drops).

        ``outputs`` / ``reference_outputs``: this engine's / the reference's outputs on ``batches``,
        one array per batch, when already computed (the build runs the engine once for both checks,
        and :func:`ort_calibrate` may already have run the reference graph on the same batches).
        """
        ort = _ort()
        engine = self.run if outputs is None else _replay(outputs)
        if reference_outputs is not None:
            return compare(engine, _replay(reference_outputs), batches,
                           reference_name="portable-twin" if reference is None else "qdq-onnx")
        if reference is None:
            twin = weights_to_uint8(self._graph)
            ref = ort.InferenceSession(twin.SerializeToString(), _session_options(self._config),
                                       providers=["CPUExecutionProvider"])
        else:
            ref = ort.InferenceSession(reference.SerializeToString(), _session_options(self._config, optimize=False),
                                       providers=["CPUExecutionProvider"])
        name = ref.get_inputs()[0].name
        return compare(engine, lambda x: ref.run(None, {name: x})[0], batches,
                       reference_name="portable-twin" if reference is None else "qdq-onnx")


class OrtBackend:
    """Backend "onnxruntime" (see :class:`qfold.engine.base.Backend`)."""

    name = "onnxruntime"
    suffix = ".ort.onnx"

    def build(self, onnx_path: Path, engine_path: Path, config: EngineConfig | None = None,
              data: Sequence[np.ndarray] | None = None, *,
              extra_amax: Mapping[str, float] | None = None,
              rendering: OrtRendering | None = None,
              check_data: Iterable[np.ndarray] | None = None,
              check_reference: Sequence[np.ndarray] | None = None) -> EngineInfo:
        """Render ``onnx_path`` for ORT and write ``engine_path`` + ``engine_path``.json atomically.

        ``data``: calibration batches. The tensors the ORT rendering quantizes beyond the TensorRT
        profile (:func:`qfold.onnx.qdq.tensors_needing_amax_for_ort`: conv outputs on residual
        branches, which TensorRT keeps in float) take the amax the calibration pass measured,
        recorded in the ONNX (:mod:`qfold.onnx.tensor_amax`); those not recorded get a ``max``
        amax from a run of the Q/DQ graph over ``data``. The first :func:`self_check_rows` rows are
        the self-check. ``extra_amax`` / ``check_data`` give those two directly instead. Tensors without an amax
        stay float and are listed in the metadata under ``extra.float_for_lack_of_amax``.
        ``config.cpu_target`` picks the CPU rendering (``auto``: this CPU's class). The self-check:
        the engine, run on this CPU as ``load`` runs it, must match its portable twin
        (:meth:`OrtEngine.check`), else :class:`EngineCheckError` and nothing is written; its
        deviation from the Q/DQ ONNX (fake-quant) is recorded and warned. ``check_reference``: the
        Q/DQ ONNX's first output on each check batch when already computed; with ``data``, the run
        that calibrates the extra tensors computes it (:func:`ort_calibrate_with_outputs`).
        """
        ort = _ort()
        config, rendering = config or EngineConfig(), rendering or OrtRendering()
        onnx_path, engine_path = Path(onnx_path), Path(engine_path)
        resolve_target(config.cpu_target, CpuInfo("", frozenset()))  # a bad name errors before any work
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model {onnx_path} does not exist; run `qfold export` first.")
        providers = providers_for(config.device)
        src = onnx_path.read_bytes()
        model = onnx.load_from_string(src)
        needed = tensors_needing_amax_for_ort(model)
        in_ort: list[str] = []  # tensors measured here, in ONNX Runtime, for lack of a recorded amax
        if extra_amax is None:  # what the calibration pass measured, written into the ONNX at export
            recorded = recorded_tensor_amax(model)
            extra_amax = {t: recorded[t] for t in needed if t in recorded}
            in_ort = [t for t in needed if t not in recorded] if data is not None else []
        if data is not None:
            derived = check_data is None
            if derived:
                check_data = _first_rows(data, self_check_rows(int(np.prod(data[0].shape[1:])) if len(data) else 1))
            if in_ort:
                # check batches that are whole first calibration batches (the batch size divides
                # the check rows): that calibration run of the Q/DQ graph is also the check's reference
                whole = derived and all(len(a) == len(b) for a, b in zip(check_data, data))
                measured, outs = ort_calibrate_with_outputs(model, in_ort, data, "max", keep=len(check_data) if whole else 0)
                extra_amax.update(measured)
                if check_reference is None and outs:
                    check_reference = outs
        cpu = detect_cpu()
        target = resolve_target(config.cpu_target, cpu)
        rendered = render_for_ort(model, extra_amax, rendering, target)
        risks = int16_pair_sum_risks(rendered, target)
        if risks:  # the rendering guarantees none; a failure here is a bug, never a silent engine
            raise RuntimeError(f"the '{target}' rendering has int8 weights that can saturate int16 pair sums: {risks[:3]}")
        engine = rendered.SerializeToString(deterministic=True)
        check = rendering_check = None
        if check_data is not None:
            with warnings.catch_warnings():  # a foreign target runs re-rendered here, as load would run it
                warnings.simplefilter("ignore", RuntimeWarning)
                probe = OrtEngine(rendered, EngineInfo(self.name, engine_path.name, "", extra={"cpu_target": target}),
                                  replace(config, cpu_target="auto"))
            check_data = [np.ascontiguousarray(x, dtype=np.float32) for x in check_data]
            outs = [probe.run(x) for x in check_data]  # the engine runs once for both checks
            check = probe.check(check_data, outputs=outs)  # the integer kernels vs the graph they run: what a CPU can break
            rendering_check = probe.check(check_data, model, outputs=outs,  # the rendering vs fake-quant: reported, warned
                                          reference_outputs=check_reference)
            if rendering_check is not None and not rendering_check.passed:
                warnings.warn(f"the ONNX Runtime rendering deviates from the fake-quant model by more than "
                              f"{rendering_check.tolerance_steps:g} output steps ({rendering_check.summary()}); the "
                              f"'engine' stage of the accuracy report measures the engine itself", RuntimeWarning, stacklevel=2)
            if check is not None and not check.passed:
                raise EngineCheckError(
                    f"engine self-check failed on this CPU ({cpu.describe()}, target '{target}'): {check.summary()}. "
                    f"Nothing was written. The engine does not compute what was calibrated here; build with "
                    f"--cpu-target portable (EngineConfig(cpu_target='portable')), and if that fails too, report it "
                    f"with these numbers.")
        info = EngineInfo(
            backend=self.name,
            engine_path=engine_path.name,
            onnx_sha256=sha256_bytes(src),
            engine_sha256=sha256_bytes(engine),
            versions={"onnxruntime": ort.__version__, "onnx": onnx.__version__},
            extra={
                "providers": providers,
                "rendering": asdict(rendering),
                "extra_amax": {k: float(v) for k, v in sorted((extra_amax or {}).items())},
                "float_for_lack_of_amax": [t for t in needed if t not in (extra_amax or {})],
                "extra_amax_measured_in_onnxruntime": in_ort,
                "engine_config": asdict(config),
                "cpu_target": target,
                "built_on_cpu": {"int8_class": cpu.int8_class, "describe": cpu.describe()},
                "self_check": None if check is None else check.to_dict(),
                "rendering_check": None if check is None else rendering_check.to_dict(),
            },
        )
        write_engine(engine_path, engine, info)
        return info

    def load(self, engine_path: Path, config: EngineConfig | None = None) -> OrtEngine:
        """Open a built engine; its sidecar metadata must exist and match the file."""
        data, info = read_engine(engine_path)
        return OrtEngine(onnx.load_from_string(data), info, config or EngineConfig())


def _first_rows(batches: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """The first ``n`` rows of ``batches``, in the same batches (the last one cut)."""
    out: list[np.ndarray] = []
    left = n
    for b in batches:
        if left <= 0:
            break
        out.append(b[:left])
        left -= len(out[-1])
    return out
