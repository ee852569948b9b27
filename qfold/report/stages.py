"""Accuracy loss against the FP32 training graph: per stage, per layer, as JSON, Markdown and plots.

Every stage (folded, bounded, fake-quant, engine) is compared with the *original* model in eval
mode on the same inputs. Metrics come from :mod:`qfold.report.metrics`; this module only runs models,
accumulates and reports.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from calib.atomic import atomic_write_bytes, atomic_write_text
from qfold.capture import trace
from qfold.errors import QualityGateError
from qfold.fx import channels_last
from qfold.inputs.rows import rows
from qfold.quant.prepare import quantizer_name
from qfold.report import metrics as metrics

STAGE_ORDER = ("folded", "bounded", "fake_quant", "engine")


@dataclass(frozen=True)
class StageMetrics:
    """One stage against the FP32 reference (accuracies are fractions in [0, 1])."""

    top1: float | None
    top5: float | None
    agreement: float
    sqnr_db: float
    max_abs_err: float


@dataclass(frozen=True)
class LayerMetrics:
    """One quantized layer's output, fake-quant vs FP32 (same input to both whole models)."""

    name: str
    type: str
    sqnr_db: float
    input_amax: float | None = None


@dataclass
class AccuracyReport:
    """Stage metrics, per-layer metrics (worst first) and the FP32 reference's own accuracy."""

    reference: dict[str, float | None]
    stages: dict[str, StageMetrics] = field(default_factory=dict)
    layers: list[LayerMetrics] = field(default_factory=list)
    stage_samples: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: ``stages.<stage>.{top1, top5, agreement, sqnr_db, max_abs_err}``, ``layers[]``.

        ``stage_samples`` (stage or "layers" -> samples) only when some were measured on a subset.
        """
        out = {
            "reference": self.reference,
            "stages": {k: asdict(v) for k, v in self.stages.items()},
            "layers": [asdict(layer) for layer in self.layers],
        }
        if self.stage_samples:
            out["stage_samples"] = dict(self.stage_samples)
        return out

    def drop_pp(self, stage: str = "engine") -> float | None:
        """Top-1 drop in percentage points of ``stage`` against the reference on the same samples
        (a stage measured on a subset: the reference's top-1 there, ``reference["subset"]``)."""
        s = self.stages.get(stage)
        part = self.stage_samples.get(stage, self.reference.get("samples")) != self.reference.get("samples")
        ref = self.reference.get("subset", {}) if part else self.reference
        if s is None or s.top1 is None or ref.get("top1") is None:
            return None
        return 100.0 * (ref["top1"] - s.top1)

    def check_budget(self, max_drop_pp: float | None, details: str | Path = "accuracy.md") -> None:
        """Raise :class:`qfold.errors.QualityGateError` (carrying this report) when the engine's
        top-1 drop exceeds ``max_drop_pp``; ``details`` names where the full report is."""
        drop = self.drop_pp("engine")
        if max_drop_pp is not None and drop is not None and drop > max_drop_pp:
            raise QualityGateError(f"engine top-1 drop {drop:.2f} pp exceeds the budget of {max_drop_pp:.2f} pp by "
                                   f"{drop - max_drop_pp:.2f} pp (see {details})", self)

    def to_markdown(self, worst: int = 10) -> str:
        """A human-readable summary: a table of stages and the worst layers."""
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        ref = self.reference
        lines = [
            "# Accuracy loss against the FP32 training graph",
            "",
            f"FP32 reference: top-1 {pct(ref.get('top1'))}, top-5 {pct(ref.get('top5'))}, {ref.get('samples')} samples.",
            "",
            *([f"Measured on a subset for speed (samples per stage): {', '.join(f'{k} {v}' for k, v in self.stage_samples.items())}.", ""] if self.stage_samples else []),
            "| stage | top-1 | top-5 | top-1 drop (pp) | agreement | SQNR (dB) | max abs err |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, s in self.stages.items():
            drop = self.drop_pp(name)
            lines.append(
                f"| {name} | {pct(s.top1)} | {pct(s.top5)} | {'n/a' if drop is None else f'{drop:+.2f}'} | "
                f"{pct(s.agreement)} | {s.sqnr_db:.2f} | {s.max_abs_err:.4g} |"
            )
        if self.layers:
            lines += ["", f"## Worst {min(worst, len(self.layers))} quantized layers (output SQNR, fake-quant vs FP32)", ""]
            lines += ["| layer | type | SQNR (dB) | input amax |", "|---|---|---|---|"]
            for layer in self.layers[:worst]:
                amax = "-" if layer.input_amax is None else f"{layer.input_amax:.4g}"
                lines.append(f"| {layer.name} | {layer.type} | {layer.sqnr_db:.2f} | {amax} |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path, stem: str = "accuracy") -> list[Path]:
        """Write ``<stem>.json`` and ``<stem>.md`` atomically; returns the paths."""
        out = Path(out_dir)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"  # +-inf SQNR (identical outputs) as Infinity, read back by json.loads
        return [atomic_write_text(out / f"{stem}.json", text), atomic_write_text(out / f"{stem}.md", self.to_markdown())]


def run_logits(fn: Callable[[torch.Tensor], torch.Tensor | np.ndarray], x: torch.Tensor, batch_size: int, progress: bool = False, desc: str = "") -> np.ndarray:
    """Concatenated float64 outputs of ``fn`` over ``x`` in batches."""
    from tqdm.auto import tqdm

    outs = []
    starts = range(0, x.shape[0], batch_size)
    with torch.inference_mode():
        for i in tqdm(starts, desc=desc or "evaluate", disable=not progress, leave=False):
            outs.append(_as_float64(fn(x[i : i + batch_size])))
    return np.concatenate(outs)


def _as_float64(out: torch.Tensor | np.ndarray) -> np.ndarray:
    out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return out.astype(np.float64)


def reference_metrics(ref: np.ndarray, labels: torch.Tensor | None) -> dict[str, float | None]:
    """The FP32 reference's own accuracy."""
    y = None if labels is None else labels.numpy()
    return {
        "top1": None if y is None else metrics.topk_accuracy(ref, y, 1),
        "top5": None if y is None or ref.shape[1] < 5 else metrics.topk_accuracy(ref, y, 5),
        "samples": int(ref.shape[0]),
    }


def stage_metrics(ref: np.ndarray, out: np.ndarray, labels: torch.Tensor | None) -> StageMetrics:
    """Metrics of one stage's outputs ``out`` against the reference outputs ``ref``."""
    y = None if labels is None else labels.numpy()
    return StageMetrics(
        top1=None if y is None else metrics.topk_accuracy(out, y, 1),
        top5=None if y is None or out.shape[1] < 5 else metrics.topk_accuracy(out, y, 5),
        agreement=metrics.top1_agreement(ref, out),
        sqnr_db=metrics.sqnr_db(ref, out),
        max_abs_err=metrics.max_abs_err(ref, out),
    )


class _OutputEnergy:
    """Streams sum(ref^2) and sum((ref-test)^2) per layer from forward hooks on two models."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        # a module called several times per forward (a reused conv) has one output per call, in order
        self.ref: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.signal = dict.fromkeys(names, 0.0)
        self.noise = dict.fromkeys(names, 0.0)

    def hook_ref(self, name: str):
        def fn(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            self.ref[name].append(out.detach().clone())  # a copy: later in-place ops may overwrite the output

        return fn

    def hook_test(self, name: str):
        def fn(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            if not self.ref[name]:
                raise RuntimeError(f"layer {name!r} ran more often in the fake-quant model than in the float model")
            signal, noise = metrics.energies(self.ref[name].pop(0), out)
            self.signal[name] += signal
            self.noise[name] += noise

        return fn

    def sqnr(self, name: str) -> float:
        return metrics.sqnr_db_from_energy(self.signal[name], self.noise[name])


def layer_sqnr(float_model: nn.Module, fq_model: nn.Module, names: list[str], x: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Output SQNR (dB) of each named layer: ``fq_model`` vs ``float_model`` on the same inputs.

    Both models must have a module at each name (the fake-quant model keeps the float model's
    names: a quantized layer is wrapped under its own name). Hooks are removed on exit.
    """
    return paired_logits(float_model, fq_model, names, x, batch_size)[2]


def paired_logits(
    float_model: nn.Module, fq_model: nn.Module, names: list[str], x: torch.Tensor, batch_size: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One pass of both models over ``x``: their outputs (as :func:`run_logits`) and :func:`layer_sqnr`.

    Each batch runs through ``float_model`` then ``fq_model``, so the per-layer comparison needs
    one batch of layer outputs in memory, and neither model has to run over ``x`` again for its
    own stage metrics.
    """
    from tqdm.auto import tqdm

    acc = _OutputEnergy(names)
    handles = []
    outs: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    try:
        for n in names:
            handles.append(float_model.get_submodule(n).register_forward_hook(acc.hook_ref(n)))
            handles.append(fq_model.get_submodule(n).register_forward_hook(acc.hook_test(n)))
        with torch.inference_mode():
            for i in tqdm(range(0, x.shape[0], batch_size), desc="bounded + fake-quant", disable=not progress, leave=False):
                xb = x[i : i + batch_size]
                for model, store in zip((float_model, fq_model), outs):
                    store.append(_as_float64(model(xb)))
                for n in names:  # calls of the float model that the fake-quant model did not match
                    acc.ref[n].clear()
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(outs[0]), np.concatenate(outs[1]), {n: acc.sqnr(n) for n in names}


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as a byte-reproducible PNG (no software/date metadata), atomically, and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def save_plots(report: AccuracyReport, histograms: dict[str, tuple[np.ndarray, np.ndarray, float]], out_dir: str | Path, worst: int = 4) -> list[Path]:
    """PNG plots: per-layer SQNR, and activation histograms with the chosen amax for the worst layers.

    ``histograms`` maps a layer name to ``(counts, bin_edges, amax)`` of its input activation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, paths = Path(out_dir), []

    def _save(fig, name: str) -> None:
        paths.append(save_figure(fig, out / name))

    if report.layers:
        layers = sorted(report.layers, key=lambda layer: layer.name)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4))
        vals = [min(layer.sqnr_db, 80.0) for layer in layers]
        ax.bar(range(len(layers)), vals, color=["tab:red" if v < 20 else "tab:blue" for v in vals])
        ax.set_xticks(range(len(layers)), [layer.name for layer in layers], rotation=75, fontsize=7)
        ax.set_ylabel("output SQNR (dB), fake-quant vs FP32")
        ax.set_title("Per-layer SQNR (higher is better)")
        fig.tight_layout()
        _save(fig, "layer_sqnr.png")
    picked = [layer.name for layer in report.layers if layer.name in histograms][:worst]
    if picked:
        fig, axes = plt.subplots(1, len(picked), figsize=(4 * len(picked), 3.2), squeeze=False)
        for ax, name in zip(axes[0], picked):
            counts, edges, amax = histograms[name]
            ax.stairs(np.maximum(counts, 0.5), edges, fill=True)
            ax.set_yscale("log")
            ax.axvline(amax, color="tab:red", label=f"amax {amax:.3g}")
            ax.set_title(name, fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("Input activation |x| histograms of the worst layers")
        fig.tight_layout()
        _save(fig, "activation_histograms.png")
    return paths


# ----------------------------------------------------------------------------- the stages of a PTQ run


def layer_inputs(plan: Any, fq: fx.GraphModule) -> dict[str, str]:
    """quantized layer name -> key of the quant point feeding it (``plan``: a :class:`qfold.quant.QuantPlan`)."""
    node_to_layer = {n.name: n.target for n in fq.graph.nodes if n.op == "call_module"}
    out: dict[str, str] = {}
    for key, p in plan.points.items():
        for c in p.consumers:
            if node_to_layer.get(c) in plan.layers:
                out[node_to_layer[c]] = key
    return out


def evaluate_stages(model: nn.Module, res: Any, engine: Any, x: torch.Tensor, y: torch.Tensor | None, config: Any) -> AccuracyReport:
    """Every stage against the original model, and every quantized layer's SQNR.

    ``res`` is a :class:`qfold.pipeline.PTQResult` (its ``folded``, ``bounded``, ``fake_quant``,
    ``plan`` and ``amax``), ``config`` a :class:`qfold.config.PTQConfig` (its ``eval`` section
    and ``progress``); ``engine`` has ``run(numpy batch) -> numpy``.

    Each model runs once over ``x``: the FP32 reference (reused by every comparison), the folded
    model, the bounded and fake-quant models together (their per-layer outputs give the layer
    report in the same pass) and the engine. ``eval.stage_samples`` limits the folded and bounded
    stages and the layer report to the first samples.
    """
    bs, prog = rows(config.eval.batch_size, model, x), config.progress
    n = x.shape[0] if config.eval.stage_samples is None else min(config.eval.stage_samples, x.shape[0])
    ref = run_logits(channels_last(model) if config.channels_last else model, x, bs, prog, "FP32")
    report = AccuracyReport(reference=reference_metrics(ref, y))
    ys = None if y is None else y[:n]
    has_bound = res.bounded is not res.folded
    names = sorted(res.plan.layers) if config.eval.layer_report else []
    outs = {} if names and not has_bound else {"folded": run_logits(res.folded, x[:n], bs, prog, "folded")}
    float_model = res.bounded if has_bound else res.folded  # the last float stage, paired with fake-quant
    if names and not isinstance(float_model, fx.GraphModule):
        float_model = trace(float_model)
    if names or has_bound:
        float_out, fq_head, sq = paired_logits(float_model, res.fake_quant, names, x[:n], bs, prog)
        outs["bounded" if has_bound else "folded"] = float_out
        fq_out = fq_head if n == x.shape[0] else np.concatenate([fq_head, run_logits(res.fake_quant, x[n:], bs, prog, "fake_quant")])
    else:
        fq_out, sq = run_logits(res.fake_quant, x, bs, prog, "fake_quant"), {}
    for name, out in outs.items():
        report.stages[name] = stage_metrics(ref[:n], out, ys)
    report.stages["fake_quant"] = stage_metrics(ref, fq_out, y)
    run_engine = lambda xb: engine.run(xb.numpy().astype(np.float32))  # noqa: E731
    report.stages["engine"] = stage_metrics(ref, run_logits(run_engine, x, bs, prog, "engine"), y)
    if n < x.shape[0]:
        report.reference["subset"] = reference_metrics(ref[:n], ys)  # what the subset stages' drops compare with
        report.stage_samples = {**dict.fromkeys(outs, n), "fake_quant": x.shape[0], "engine": x.shape[0], **({"layers": n} if names else {})}
    if names:
        inputs = layer_inputs(res.plan, res.fake_quant)
        report.layers = sorted(
            (LayerMetrics(k, res.plan.layers[k].type, sq[k], res.amax.get(inputs.get(k, ""))) for k in names),
            key=lambda layer: (layer.sqnr_db, layer.name),
        )
    return report


def input_histograms(res: Any, cres: Any) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    out = {}
    for layer, key in layer_inputs(res.plan, res.fake_quant).items():
        obs = cres.observers.get(quantizer_name(key))
        if obs is None:
            continue
        h = obs.histogram
        edges = np.arange(h.num_bins + 1) * h.width
        last = int(np.nonzero(h.counts)[0][-1]) + 2 if h.counts.any() else 2
        out[layer] = (h.counts[:last].astype(float), edges[: last + 1], res.amax[key])
    return out
