"""Configuration: one frozen dataclass per step, used alike by the Python API, the CLI, TOML and QAT.

Every field has a default, so ``PTQConfig()`` is a complete, sensible configuration; a TOML file
(or CLI flags) override fields section by section. Unknown sections or keys are errors. The step
functions take their own section (``bound_relu(..., config=BoundConfig())``,
``export_onnx(..., config=ExportConfig())``, ``backend.build(..., config=EngineConfig())``), and
the lists of allowed values are defined here once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from calib.method import METHODS as CALIB_METHODS

BOUND_MODES = ("preserve", "swap", "off")
BACKENDS = ("onnxruntime", "tensorrt")
CPU_TARGETS = ("auto", "vnni", "portable", "arm64")  # qfold.engine.cpu.TARGET_CHOICES (docs/cpu-int8-targets.md)
EXPORTERS = ("torchscript", "dynamo")
#: Opsets the exporters can write (Q/DQ per-channel needs >= 13; the TorchScript exporter stops at 20).
OPSET_RANGE = {"torchscript": (13, 20), "dynamo": (18, 23)}
FALLBACK_MODES = ("off", "auto")
#: the bound's quantile: the cap of 6 maps to this per-channel quantile of the pre-activation.
QUANTILE_RANGE = "(0.5, 1]"



def _one_of(key: str, value: Any, choices: tuple) -> None:
    """Raise ValueError naming ``key`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")


__all__ = [
    "BoundConfig", "CalibConfig", "EngineConfig", "EvalConfig", "ExportConfig", "FoldConfig", "PTQConfig",
    "from_dict", "load_config", "read_toml", "to_toml",
]


@dataclass(frozen=True)
class FoldConfig:
    """Step 1: structural re-parameterization, then BatchNorm folding (``strict``: a BN left is an error)."""

    reparameterize: bool = True
    strict: bool = False


@dataclass(frozen=True)
class BoundConfig:
    """Step 2: ReLU -> ReLU6 (:func:`qfold.bound.bound_relu`).

    Attributes:
        mode: "preserve" (rescale so the function is kept; needs calibration data), "swap"
            (literal ReLU -> ReLU6) or "off" (the pipeline skips the step).
        quantile: per-channel quantile of the pre-activation that the cap of 6 is mapped to, in (0.5, 1].
        bins: histogram bins per channel for the streaming quantile (a power of two).
        max_scale: upper bound of a channel scale (guards nearly dead channels).
        values: the caps' statistics come from the first calibration rows that give every ReLU
            channel at least this many values, whatever the batch size (the bound report: the
            whole batches holding them); 0: all rows. The statistics pass runs the unbounded model, which calibration cannot
            share (it observes the rescaled one), so this pass is the price of the bound. The
            site with the smallest map sets the rows: 84 images of 224x224 for resnet18 (7x7
            maps), all 512 of the 28x28 example (4x4 maps). With 4,096 values the 0.9999 cap is
            about the sample's maximum (a clipped fraction near 2.4e-4 instead of 1e-4).

    The bound reads the calibration data in ``calib.batch_size`` batches.
    """

    mode: str = "preserve"
    quantile: float = 0.9999
    bins: int = 2048
    max_scale: float = 1e6
    values: int = 4096

    def __post_init__(self) -> None:
        _one_of("bound.mode", self.mode, BOUND_MODES)
        if not 0.5 < self.quantile <= 1.0:
            raise ValueError(f"bound.quantile must be in {QUANTILE_RANGE}, got {self.quantile}")
        if self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"bound.bins must be a power of two >= 2, got {self.bins}")
        if not self.max_scale >= 1.0:
            raise ValueError(f"bound.max_scale must be >= 1, got {self.max_scale}")
        if self.values < 0:
            raise ValueError(f"bound.values must be >= 0 (0: every calibration sample), got {self.values}")


@dataclass(frozen=True)
class CalibConfig:
    """Step 3: activation calibration (weights are always per-channel max).

    The default is ``max``: after the function-preserving ReLU6 bound every post-activation tensor
    is capped at a high per-channel quantile, which is what makes max calibration outlier-free
    (measured best or equal on every reference model, BENCHMARKS.md). ``entropy`` (TensorRT's
    KL search) collapses on activations with large spikes, such as those a constant image
    background produces; with ``bound.mode = "off"`` prefer ``percentile`` or ``mse``. ``auto``
    chooses per tensor (:mod:`calib.auto`).

    ``batch_size``: rows per forward; None (the default) measures it: as many rows as keep the
    largest layer output of a batch within 16 MiB, at most 256 (:mod:`qfold.inputs.rows`). Small
    batches keep a convolution's activations in cache (BENCHMARKS.md, issue 17). The amax do not
    depend on the split (streaming histograms count the same values in any split).
    """

    method: str = "max"
    percentile: float = 99.99
    num_bins: int = 2048
    batch_size: int | None = None
    max_samples: int | None = None

    def __post_init__(self) -> None:
        _one_of("calib.method", self.method, CALIB_METHODS)
        if not 0 < self.percentile <= 100:
            raise ValueError(f"calib.percentile must be in (0, 100], got {self.percentile}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"calib.batch_size must be >= 1 (or unset: automatic), got {self.batch_size}")
        if self.num_bins < 256:
            raise ValueError(f"calib.num_bins must be >= 256 (the entropy search needs them), got {self.num_bins}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"calib.max_samples must be >= 1 (or left out for all samples), got {self.max_samples}")


@dataclass(frozen=True)
class ExportConfig:
    """Step 4: the Q/DQ ONNX export (:func:`qfold.onnx.export_onnx`).

    Attributes:
        opset: default-domain opset, >= 13 (per-channel Q/DQ needs ``axis``), within the
            exporter's range (:data:`OPSET_RANGE`).
        keep_float: patterns of layers kept in float (the quantization plan leaves them out).
        exporter: "torchscript" (the legacy ``dynamo=False`` exporter: deterministic, exports
            fake-quant ops as Q/DQ) or "dynamo" (``torch.export``-based).
        dynamic_batch: make dimension 0 of every input and output symbolic (``batch``).
        input_names, output_names: ONNX graph I/O names.
        normalize: put Q/DQ in TensorRT's form (:func:`qfold.onnx.qdq.normalize_qdq`) and write the
            per-layer precision map ``<stem>.precision.json`` next to the model.
    """

    opset: int = 17
    keep_float: tuple[str, ...] = ()
    exporter: str = "torchscript"
    dynamic_batch: bool = True
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)
    normalize: bool = True

    def __post_init__(self) -> None:
        _one_of("export.exporter", self.exporter, EXPORTERS)
        lo, hi = OPSET_RANGE[self.exporter]
        if self.opset < 13:
            raise ValueError(f"export.opset must be >= 13 (per-channel Q/DQ needs the axis attribute), got {self.opset}")
        if not lo <= self.opset <= hi:
            raise ValueError(f"export.opset must be in {lo}..{hi} for the {self.exporter} exporter, got {self.opset}")
        for name in ("keep_float", "input_names", "output_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class EngineConfig:
    """Step 5: how an engine is built and loaded (:mod:`qfold.engine`).

    Attributes:
        backend: "onnxruntime" (default, any CPU) or "tensorrt".
        device: "cpu" or "cuda" (ONNX Runtime execution provider choice).
        fp16_fallback: run unquantized layers in FP16 (TensorRT; converts the ONNX).
        cpu_target: ONNX Runtime CPU rendering (:mod:`qfold.engine.cpu`). Building: ``auto`` (the
            CPU building it), ``vnni``, ``portable`` or ``arm64``. Loading: ``auto`` runs the engine
            exactly on this CPU (re-rendering in memory, with a warning, if it was built for
            another class), ``portable`` always runs u8 x u8, ``vnni``/``arm64`` run the file as
            rendered and refuse a CPU that would not compute it exactly.
        intra_op_threads: 0 lets the runtime decide.
        batch_min, batch_opt, batch_max: dynamic-batch optimization profile (TensorRT).
        workspace_mib: TensorRT workspace memory-pool limit.
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    fp16_fallback: bool = False
    cpu_target: str = "auto"
    intra_op_threads: int = 0
    batch_min: int = 1
    batch_opt: int = 32
    batch_max: int = 256
    workspace_mib: int = 1024

    def __post_init__(self) -> None:
        _one_of("engine.backend", self.backend, BACKENDS)
        _one_of("engine.cpu_target", self.cpu_target, CPU_TARGETS)


@dataclass(frozen=True)
class EvalConfig:
    """Step 6: evaluation; ``max_drop_pp`` fails the run when the engine's top-1 drop exceeds it.

    ``stage_samples`` (default: all) measures the ``folded`` and ``bounded`` stages and the
    per-layer report on the first that many evaluation samples only, for speed; the fake-quant
    and engine stages always see every sample. The report says how many each stage saw.
    ``batch_size``: rows per forward, None (the default) measured as for ``calib.batch_size``
    (5 rows for a resnet at 224x224, 256 for 28x28 digits).

    ``fallback = "auto"`` searches the fewest layers to keep float (FP16 on TensorRT) so the
    engine's measured drop is within ``max_drop_pp`` (:mod:`qfold.budget.fallback`); ``sensitivity``
    adds the per-layer sensitivity table and plot to the report (always on with the search).
    """

    batch_size: int | None = None
    max_drop_pp: float | None = None
    layer_report: bool = True
    plots: bool = True
    stage_samples: int | None = None
    fallback: str = "off"
    sensitivity: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1 (or unset: automatic), got {self.batch_size}")
        if self.stage_samples is not None and self.stage_samples < 1:
            raise ValueError(f"eval.stage_samples must be >= 1 (or unset for all samples), got {self.stage_samples}")
        _one_of("eval.fallback", self.fallback, FALLBACK_MODES)
        if self.fallback == "auto" and self.max_drop_pp is None:
            raise ValueError("eval.fallback = 'auto' needs eval.max_drop_pp (the budget the search meets; CLI --max-drop PP)")


@dataclass(frozen=True)
class PTQConfig:
    """The whole post-training-quantization run.

    ``channels_last`` (default on): run qfold's own PyTorch passes (the bound's statistics,
    calibration, the stage report) on channels-last copies of the models: 1.4x (resnet18) to 2.2x
    (mobilenet_v2, depthwise convs) faster forwards on x86 CPUs. Convolutions then sum in another
    order, so amax values and report numbers move in the last float32 digits (up to 3e-6 relative
    on resnet18's amax); turn it off to reproduce files made before it was the default.
    """

    fold: FoldConfig = field(default_factory=FoldConfig)
    bound: BoundConfig = field(default_factory=BoundConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True
    channels_last: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists), the form written to manifests and TOML."""

        def conv(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = {k: conv(x) for k, x in dataclasses.asdict(v).items()} if dataclasses.is_dataclass(v) else v
        return out

    def replace(self, **sections: dict[str, Any]) -> PTQConfig:
        """A copy with fields of the named sections overridden: ``cfg.replace(calib={"method": "max"})``."""
        return from_dict({**self.to_dict(), **{k: {**self.to_dict().get(k, {}), **v} for k, v in sections.items()}})


def from_dict(data: dict[str, Any]) -> PTQConfig:
    """Build a PTQConfig from nested dicts; unknown sections or keys raise ValueError naming them.

    Values are checked against the field types (:func:`qfold.inputs.validate.check_types`): a wrong type
    raises ValueError naming the key, the expected type and the value.
    """
    from qfold.inputs.validate import check_types

    kwargs: dict[str, Any] = {}
    sections = {f.name: f for f in fields(PTQConfig)}
    for name, value in data.items():
        if name not in sections:
            raise ValueError(f"unknown configuration section {name!r}; known: {sorted(sections)}")
        f = sections[name]
        if isinstance(value, dict):
            cls = f.default_factory  # type: ignore[misc]
            known = {x.name for x in fields(cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise ValueError(f"unknown key(s) {bad} in section [{name}]; known: {sorted(known)}")
            kwargs[name] = cls(**check_types(name, cls, value))
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            raise ValueError(f"[{name}] must be a section (a TOML table such as [{name}] with keys), got {type(value).__name__} {value!r}")
        else:
            kwargs[name] = check_types("", PTQConfig, {name: value})[name]
    return PTQConfig(**kwargs)


def read_toml(path: str | Path, what: str = "configuration file") -> dict[str, Any]:
    """Parse a TOML file; a missing file or bad syntax raises an error naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid TOML: {exc}") from exc


def load_config(path: str | Path) -> PTQConfig:
    """Read a TOML configuration (missing sections and keys take their defaults)."""
    return from_dict(read_toml(path))


def to_toml(config: PTQConfig) -> str:
    """Render a configuration as TOML (None values are omitted, as TOML has no null)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []
    top = config.to_dict()
    for k, v in top.items():
        if not isinstance(v, dict) and v is not None:
            lines.append(f"{k} = {fmt(v)}")
    for k, v in top.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {fmt(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines).lstrip("\n") + "\n"
