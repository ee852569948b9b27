"""The post-training-quantization path, composed: fold -> bound -> calibrate -> export -> build -> evaluate.

Each step lives in its own package (fold, bound, quant, onnx, engine, report); this module only
calls them in order, each with its own section of :class:`qfold.config.PTQConfig`, keeps every
intermediate model (the stages the accuracy report compares) and names the artifacts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
import torch.nn as nn

import calib
from calib.atomic import atomic_write_text
from qfold.bound import bound_relu, bound_relu_deferred
from qfold.budget.fallback import budget_artifacts, plan_fallback
from qfold.config import PTQConfig
from qfold.engine import get_backend, require_backend
from qfold.errors import QualityGateError
from qfold.fold import fold_batchnorm
from qfold.fx import channels_last
from qfold.inputs import FALLBACK_ROWS, batches, rows, with_rows
from qfold.inputs.validate import check_ptq_inputs
from qfold.onnx import attach_tensor_amax, export_onnx
from qfold.onnx.export import precision_map_path
from qfold.onnx.qdq import check_trt_rules
from qfold.outdir import final_path, owned
from qfold.quant import QuantPlan
from qfold.quant.calibrate import calibrate_model, calibration_table, write_trt_cache
from qfold.quant.prepare import act_quantizers
from qfold.reparam import reparameterize
from qfold.report import stages as ev


@dataclass
class PTQResult:
    """Everything a PTQ run produced: the stage models, the reports and the artifact paths."""

    folded: nn.Module
    bounded: nn.Module
    fake_quant: fx.GraphModule
    plan: QuantPlan
    amax: dict[str, float]
    reports: dict[str, Any] = field(default_factory=dict)
    accuracy: ev.AccuracyReport | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)


def fold_stage(model: nn.Module, config: PTQConfig, example: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Re-parameterize branches (optional), then fold BatchNorm; ``example`` lets the fold measure tensor ranks."""
    reports: dict[str, Any] = {}
    if config.fold.reparameterize:
        model, reports["reparam"] = reparameterize(model, example_inputs=example)
    folded, reports["fold"] = fold_batchnorm(model, strict=config.fold.strict, example_inputs=example)
    return folded, reports


def bound_stage(folded: nn.Module, calib_x: torch.Tensor, config: PTQConfig, *, defer_report: bool = False) -> tuple[nn.Module, Any]:
    """ReLU -> ReLU6 (nothing with mode "off"); ``defer_report``: a pending report :func:`calibrate_stage` completes."""
    bound = bound_relu_deferred if defer_report else bound_relu
    return (folded, None) if config.bound.mode == "off" else bound(folded, list(batches(calib_x, rows(config.calib.batch_size, folded, calib_x))), config=config.bound)


def calibrate_stage(model: nn.Module, calib_x: torch.Tensor, config: PTQConfig, *,
                    bound_report: Any = None) -> tuple[fx.GraphModule, QuantPlan, calib.CalibResult]:
    """Plan Q/DQ, insert quantizers, observe the float network, set every amax; the pass completes ``bound_report``."""
    return calibrate_model(model, calib_x, config.calib, config.export.keep_float, progress=config.progress,
                           watch=None if bound_report is None else bound_report.observe)


def export_stage(fq: fx.GraphModule, example: torch.Tensor, out_dir: Path, config: PTQConfig,
                 layers: dict[str, Any] | None = None, cres: calib.CalibResult | None = None) -> tuple[Path, list]:
    """Export the fake-quant model to a TensorRT-profile Q/DQ ONNX; returns its path and rule violations.
    ``cres``: the calibration's amax of the tensors only the ORT rendering quantizes go into the ONNX."""
    path = export_onnx(fq, example, out_dir / "model_qdq.onnx", config.export, layers=layers)
    attach_tensor_amax(path, fq, cres.extra.get("node_amax", {}), example) if cres is not None else None
    return path, check_trt_rules(onnx.load(str(path)))


def build_engine_stage(onnx_path: Path, out: Path, config: PTQConfig, calib_x: torch.Tensor | None = None) -> Any:
    """Build ``out/engine<suffix>`` with the configured backend (calibration batches to hand) and load it."""
    backend = get_backend(config.engine.backend)
    data = None if calib_x is None else [b.numpy() for b in batches(calib_x, config.calib.batch_size or FALLBACK_ROWS)]
    backend.build(onnx_path, engine_path := out / f"engine{backend.suffix}", config.engine, data)
    return backend.load(engine_path, replace(config.engine, cpu_target="auto"))  # what this CPU computes


def run_ptq(model: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor | None = None, eval_y: torch.Tensor | None = None,
            *, config: PTQConfig = PTQConfig(), out_dir: str | Path = "qfold-out") -> PTQResult:
    """Quantize ``model`` post-training and measure the cost, writing every artifact to ``out_dir``.

    Args:
        model: the FP32 model in eval mode (never modified).
        calib_x: calibration inputs (N, ...), float.
        eval_x, eval_y: evaluation inputs and optional integer labels (default: the calibration inputs).
        config: every option, see :class:`qfold.config.PTQConfig`.
        out_dir: folder for every artifact, owned by the run (:mod:`qfold.outdir`: all files appear at the end).

    Raises:
        qfold.errors.BackendUnavailableError: first, when the configured engine backend cannot run here.
        ValueError: bad input (model, data, labels, output folder), before any work.
        QualityGateError: after writing everything, when ``config.eval.max_drop_pp`` is exceeded.
    """
    require_backend(config.engine.backend)  # before any work
    if config.calib.max_samples is not None and calib_x is not None:
        calib_x = calib_x[: config.calib.max_samples]
    check_ptq_inputs(model, calib_x, eval_x, eval_y, config.eval.max_drop_pp)
    with owned(out_dir, keep_on=(QualityGateError,)) as run:
        res = _run_ptq_into(model, calib_x, calib_x if eval_x is None else eval_x, eval_y, config, run.path)
    res.artifacts = {k: run.final(p) for k, p in res.artifacts.items()}
    return res


def _run_ptq_into(model: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor | None,
                  config: PTQConfig, out: Path) -> PTQResult:
    config = with_rows(config, model, calib_x, eval_x)  # batch sizes unset: cache-sized batches
    folded, reports = fold_stage(model, config, calib_x[:2])
    folded = channels_last(folded) if config.channels_last else folded  # later stages copy it: all channels-last
    bounded, pending = bound_stage(folded, calib_x, config, defer_report=True)
    fallback, config = plan_fallback(model, bounded, calib_x, eval_x, eval_y, config)  # eval.fallback "auto": float layers
    fq, plan, cres = calibrate_stage(bounded, calib_x, config, bound_report=pending)
    reports["bound"] = None if pending is None else pending.report()
    if fallback is not None:
        plan.float_layers.update({n: f"fallback search, {why}" for n, why in fallback.reasons.items()})
    res = PTQResult(folded, bounded, fq, plan, {k: float(q.amax) for k, q in act_quantizers(fq).items()}, reports)
    art = res.artifacts
    art["calibration_json"] = calibration_table(fq, cres, calib_x, model).save_json(out / "calibration.json")
    art["onnx"], violations = export_stage(fq, calib_x[:1], out, config, plan.precision_map(), cres)
    res.reports["trt_rule_violations"], art["precision_map"] = [str(v) for v in violations], precision_map_path(art["onnx"])
    art["trt_cache"], art["trt_cache_note"] = write_trt_cache(out / "calibration.trtcache", art["onnx"], config.calib.method)
    engine = build_engine_stage(art["onnx"], out, config, calib_x)
    art["engine"] = out / Path(engine.info.engine_path).name

    res.accuracy = ev.evaluate_stages(model, res, engine, eval_x, eval_y, config)
    art.update({p.name: p for p in res.accuracy.save(out)})
    if config.eval.plots:
        art.update({p.name: p for p in ev.save_plots(res.accuracy, ev.input_histograms(res, cres), out)})
    if fallback is not None or config.eval.sensitivity:
        art.update({p.name: p for p in budget_artifacts(fallback, res, config, out, eval_x, eval_y, model)})
    data = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in res.reports.items() if v is not None}
    art["reports"] = atomic_write_text(out / "reports.json", json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    res.accuracy.check_budget(config.eval.max_drop_pp, final_path(out) / "accuracy.md")  # QualityGateError
    return res
