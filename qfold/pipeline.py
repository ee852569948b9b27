"""The post-training-quantization path, composed: fold -> bound -> calibrate -> export -> build -> evaluate.

Each step lives in its own module; this one only calls them in order, keeps every intermediate
model (they are the stages the accuracy report compares) and writes the artifacts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn

import calib
from calib.atomic import atomic_write_text
from qfold import evaluate as ev
from qfold.config import PTQConfig
from qfold.graph import is_eval, trace
from qfold.outdir import final_path, owned
from qfold.quant import QuantPlan, plan_quantization, prepare_fake_quant
from qfold.quant.prepare import act_quantizers, quant_layers, quantization_disabled, quantizer_name
from qfold.sources import batches
from qfold.validate import InputWarning, check_model_and_data


#: calibration inputs the engine self-check runs after an ONNX Runtime build.
SELF_CHECK_SAMPLES = 256


class QualityGateError(RuntimeError):
    """The engine's accuracy drop exceeds the configured budget (``eval.max_drop_pp``).

    ``report`` is the full accuracy report; every artifact was written before this was raised.
    """

    def __init__(self, message: str, report: ev.AccuracyReport | None = None) -> None:
        super().__init__(message)
        self.report = report


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


def _check_inputs(model: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor | None = None,
                  eval_y: torch.Tensor | None = None, config: PTQConfig = PTQConfig()) -> None:
    if not is_eval(model):
        raise ValueError("the model is in training mode; call model.eval() before post-training quantization")
    for w in check_model_and_data(model, calib_x, eval_x, eval_y, max_drop_pp=config.eval.max_drop_pp):
        warnings.warn(w, InputWarning, stacklevel=3)


def fold_stage(model: nn.Module, config: PTQConfig, example: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Re-parameterize branches (optional), then fold BatchNorm. Returns the model and the reports.

    ``example`` (a small input batch) lets the fold measure tensor ranks, so a ``Linear ->
    BatchNorm1d`` on a 3-D input is checked rather than assumed 2-D.
    """
    from qfold.fold import fold_batchnorm
    from qfold.reparam import reparameterize

    reports: dict[str, Any] = {}
    if config.fold.reparameterize:
        model, reports["reparam"] = reparameterize(model, example_inputs=example)
    folded, reports["fold"] = fold_batchnorm(model, strict=config.fold.strict, example_inputs=example)
    return folded, reports


def bound_stage(folded: nn.Module, calib_x: torch.Tensor, config: PTQConfig, *, defer_report: bool = False) -> tuple[nn.Module, Any]:
    """ReLU -> ReLU6 in the configured mode (or nothing with mode "off").

    ``defer_report``: return a :class:`qfold.bound.PendingReport` instead of the report, completed
    by :func:`calibrate_stage`'s pass over the same data (``bound_report=``): one pass fewer.
    """
    if config.bound.mode == "off":
        return folded, None
    from qfold.bound import BoundConfig, bound_relu, bound_relu_deferred

    data = list(batches(calib_x, config.calib.batch_size))
    if defer_report:
        return bound_relu_deferred(folded, data, config=BoundConfig(mode=config.bound.mode, quantile=config.bound.quantile))
    return bound_relu(folded, data, mode=config.bound.mode, quantile=config.bound.quantile)


def calibrate_stage(model: nn.Module, calib_x: torch.Tensor, config: PTQConfig, *,
                    bound_report: Any = None) -> tuple[fx.GraphModule, QuantPlan, calib.CalibResult]:
    """Plan Q/DQ, insert quantizers, observe the float network and set every amax.

    ``bound_report``: the :class:`qfold.bound.PendingReport` of ``bound_stage(..., defer_report=True)``
    for ``model``; the calibration pass (the bounded model, quantizers off) completes it.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model, example_inputs=calib_x[: config.calib.batch_size])
    plan = plan_quantization(gm, config.export.keep_float)
    fq = prepare_fake_quant(gm, plan)
    if not plan.points:
        raise ValueError("nothing to quantize: the model has no Conv/ConvTranspose/Linear layer outside keep_float")
    method = calib.CalibMethod(config.calib.method, percentile=config.calib.percentile)
    names = [quantizer_name(k) for k in sorted(plan.points)]
    watch = bound_report.observe(fq) if bound_report is not None else contextlib.nullcontext()
    with quantization_disabled(fq), watch, torch.inference_mode():
        result = calib.calibrate(
            fq, batches(calib_x, config.calib.batch_size), names, method=method,
            progress=config.progress, num_bins=config.calib.num_bins,
        )
    amax = {k: result.amax[quantizer_name(k)] for k in sorted(plan.points)}
    for group in plan.groups:  # tensors meeting at a concat share one scale
        shared = max(amax[k] for k in group)
        amax.update(dict.fromkeys(group, shared))
    quantizers = act_quantizers(fq)
    for k, a in amax.items():
        quantizers[k].set_amax(a)
    for layer in quant_layers(fq).values():
        layer.refresh_weight_amax()
    if config.calib.method == "auto":  # per tensor, the candidate with the least output-error estimate
        from qfold.calib_auto import refine_auto

        refine_auto(fq, plan, result, calib_x, config.calib.batch_size)
    return fq, plan, result


def _hash_tensor(x: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _hash_model(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def calibration_table(fq: fx.GraphModule, result: calib.CalibResult, amax: dict[str, float], calib_x: torch.Tensor, model: nn.Module) -> calib.CalibTable:
    """The versioned JSON table: activation amax per quant point, weight amax per layer and channel."""
    weights = {name: [float(v) for v in layer.weight_amax] for name, layer in quant_layers(fq).items()}
    return calib.CalibTable(
        amax=dict(sorted(amax.items())),
        method=result.method.name,
        meta={
            "method": {"name": result.method.name, "percentile": result.method.percentile},
            "weights": weights,
            "spec": {"bits": 8, "narrow": True, "scale": "amax/127", "activations": "per-tensor", "weights": "per-channel"},
            "data_sha256": _hash_tensor(calib_x),
            "model_sha256": _hash_model(model),
            "samples": int(calib_x.shape[0]),
            "batches": result.num_batches,
            "versions": {"torch": torch.__version__.split("+")[0], "calib": "1"},
            **({"auto": result.extra["auto"]} if "auto" in result.extra else {}),  # per-tensor choices of method "auto"
        },
    )


def export_stage(fq: fx.GraphModule, example: torch.Tensor, out_dir: Path, config: PTQConfig) -> tuple[Path, list]:
    """Export the fake-quant model to a TensorRT-profile Q/DQ ONNX; returns its path and rule violations."""
    from qfold.export import ExportConfig, export_onnx
    from qfold.onnx_qdq import check_trt_rules

    path = export_onnx(fq, example, out_dir / "model_qdq.onnx", ExportConfig(opset=config.export.opset, exporter=config.export.exporter))
    return path, check_trt_rules(onnx.load(str(path)))


def run_ptq(
    model: nn.Module,
    calib_x: torch.Tensor,
    eval_x: torch.Tensor | None = None,
    eval_y: torch.Tensor | None = None,
    *,
    config: PTQConfig = PTQConfig(),
    out_dir: str | Path = "qfold-out",
) -> PTQResult:
    """Quantize ``model`` post-training and measure the cost, writing every artifact to ``out_dir``.

    Args:
        model: the FP32 model in eval mode (never modified).
        calib_x: calibration inputs (N, ...), float.
        eval_x, eval_y: evaluation inputs and optional integer labels (default: the calibration inputs).
        config: every option, see :class:`qfold.config.PTQConfig`.
        out_dir: folder for the Q/DQ ONNX, calibration files, engine, reports and plots.

    The run owns ``out_dir`` (:mod:`qfold.outdir`): its files appear there together when it ends,
    replacing those of an earlier qfold run; a failed run leaves the folder as it was.

    Raises:
        qfold.engine.BackendUnavailableError: first, when the configured engine backend cannot run here.
        QualityGateError: after writing everything, when ``config.eval.max_drop_pp`` is exceeded.
        ValueError: bad input (model, data, labels, output folder), before any work.
    """
    from qfold.engine import require_backend

    require_backend(config.engine.backend)  # before any work (raises BackendUnavailableError)
    if config.calib.max_samples is not None and calib_x is not None:
        calib_x = calib_x[: config.calib.max_samples]
    _check_inputs(model, calib_x, eval_x, eval_y, config)
    with owned(out_dir, keep_on=(QualityGateError,)) as run:
        res = _run_ptq_into(model, calib_x, eval_x, eval_y, config, run.path)
    res.artifacts = {k: run.final(p) for k, p in res.artifacts.items()}
    return res


def _run_ptq_into(model: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor | None, eval_y: torch.Tensor | None,
                  config: PTQConfig, out: Path) -> PTQResult:
    eval_x = calib_x if eval_x is None else eval_x

    folded, reports = fold_stage(model, config, calib_x[:2])
    if config.channels_last:  # every later stage model copies this one, so they all run channels-last
        folded = channels_last(folded)
    bounded, pending = bound_stage(folded, calib_x, config, defer_report=True)
    fallback = None
    if config.eval.fallback == "auto":  # find the layers to keep float so the engine meets the budget
        from qfold.fallback import search_fallback, with_float_layers

        fallback = search_fallback(model, bounded, calib_x, eval_x, eval_y, config)
        config = with_float_layers(config, fallback.float_layers)
    fq, plan, cres = calibrate_stage(bounded, calib_x, config, bound_report=pending)
    reports["bound"] = None if pending is None else pending.report()
    if fallback is not None:
        plan.float_layers.update({n: f"fallback search, {why}" for n, why in fallback.reasons.items()})
    amax = {k: float(q.amax) for k, q in act_quantizers(fq).items()}
    res = PTQResult(folded, bounded, fq, plan, amax, reports)

    table = calibration_table(fq, cres, amax, calib_x, model)
    res.artifacts["calibration_json"] = table.save_json(out / "calibration.json")
    onnx_path, violations = export_stage(fq, calib_x[:1], out, config)
    res.artifacts["onnx"] = onnx_path
    res.reports["trt_rule_violations"] = [str(v) for v in violations]
    from qfold.export import precision_map_path
    from qfold.onnx_qdq import activation_scales, precision_map

    qdq_model = onnx.load(str(onnx_path))
    algo = {"entropy": "EntropyCalibration2"}.get(config.calib.method, "MinMaxCalibration")
    res.artifacts["trt_cache"] = calib.write_trt_cache(out / "calibration.trtcache", activation_scales(qdq_model), algorithm=algo)
    res.artifacts["trt_cache_note"] = calib.write_trt_cache_note(res.artifacts["trt_cache"])  # readers; none on TRT 11
    precision = {"layers": plan.precision_map(), "onnx_nodes": precision_map(qdq_model)}
    text = json.dumps(precision, indent=2, sort_keys=True) + "\n"  # supersedes the export's node-only map
    res.artifacts["precision_map"] = atomic_write_text(precision_map_path(onnx_path), text)

    engine = build_engine_stage(onnx_path, out, config, calib_x)
    res.artifacts["engine"] = out / Path(engine.info.engine_path).name

    res.accuracy = evaluate_stages(model, res, engine, eval_x, eval_y, config)
    res.artifacts.update({p.name: p for p in res.accuracy.save(out)})
    if config.eval.plots:
        hists = _input_histograms(res, cres)
        res.artifacts.update({p.name: p for p in ev.save_plots(res.accuracy, hists, out)})
    if fallback is not None:
        from qfold.fallback import write_artifacts

        res.reports["fallback"] = {k: v for k, v in fallback.to_dict().items() if k != "steps"}
        res.artifacts.update({p.name: p for p in write_artifacts(fallback, config, out)})
    elif config.eval.sensitivity:
        from qfold.sensitivity import layer_sensitivity

        sens = layer_sensitivity(fq, plan, eval_x, eval_y, reference=model, batch_size=min(config.eval.batch_size, 64))
        res.artifacts.update({p.name: p for p in sens.save(out, plot=config.eval.plots)})
    _write_fold_reports(res, out)
    drop = res.accuracy.drop_pp("engine")
    budget = config.eval.max_drop_pp
    if budget is not None and drop is not None and drop > budget:
        raise QualityGateError(
            f"engine top-1 drop {drop:.2f} pp exceeds the budget of {budget:.2f} pp by {drop - budget:.2f} pp (see {final_path(out) / 'accuracy.md'})",
            res.accuracy,
        )
    return res


def channels_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose 4-D parameters and buffers are channels-last (``config.channels_last``).

    Convolutions with channels-last weights give channels-last outputs from NCHW inputs too, so
    the data need not be converted. A copy, because ``Module.to`` re-lays shared Parameters in
    place (a folded model may share layers with the user's)."""
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def build_engine_stage(onnx_path: Path, out: Path, config: PTQConfig, calib_x: torch.Tensor | None = None):
    """Build and load the engine with the configured backend.

    For ONNX Runtime, the tensors its int8 rendering quantizes beyond the TensorRT profile (conv
    outputs on residual branches) are calibrated on ``calib_x`` with ``max``: TensorRT keeps them
    in float, so the rendering should clip nothing there. Without calibration data those layers
    stay in float. The first ``SELF_CHECK_SAMPLES`` calibration inputs are the build's self-check
    (:mod:`qfold.engine.ort_check`): the engine's integer kernels must compute exactly on this CPU.
    """
    from qfold.engine import get_backend
    from qfold.engine.base import EngineConfig

    ecfg = EngineConfig(backend=config.engine.backend, device=config.engine.device, fp16_fallback=config.engine.fp16_fallback,
                        cpu_target=config.engine.cpu_target)
    backend = get_backend(ecfg.backend)
    suffix = {"onnxruntime": ".ort.onnx", "tensorrt": ".plan"}[ecfg.backend]
    engine_path = out / f"engine{suffix}"
    if ecfg.backend == "onnxruntime" and calib_x is not None:
        from qfold.engine.ort import ort_calibrate_with_outputs
        from qfold.onnx_qdq import tensors_needing_amax_for_ort

        qdq = onnx.load(str(onnx_path))
        data = [b.numpy() for b in batches(calib_x, config.calib.batch_size)]  # views, no copies
        check = [b.numpy() for b in batches(calib_x[:SELF_CHECK_SAMPLES], config.calib.batch_size)]
        # the self-check's batches are the first calibration batches when the batch size divides
        # the check's size: then ort_calibrate's run of the Q/DQ graph is also the check's reference
        same = all(len(a) == len(b) for a, b in zip(check, data))
        extra, outs = ort_calibrate_with_outputs(qdq, tensors_needing_amax_for_ort(qdq), iter(data), "max",
                                                 num_bins=config.calib.num_bins, keep=len(check) if same else 0)
        ref = outs if outs and same else None
        backend.build(onnx_path, engine_path, ecfg, extra_amax=extra, check_data=check,  # self-check (qfold.engine.ort_check)
                      check_reference=ref)
    else:
        backend.build(onnx_path, engine_path, ecfg)
    return backend.load(engine_path, dataclasses.replace(ecfg, cpu_target="auto"))  # evaluate what this CPU computes


def _layer_inputs(plan: QuantPlan, fq: fx.GraphModule) -> dict[str, str]:
    """quantized layer name -> key of the quant point feeding it."""
    node_to_layer = {n.name: n.target for n in fq.graph.nodes if n.op == "call_module"}
    out: dict[str, str] = {}
    for key, p in plan.points.items():
        for c in p.consumers:
            if node_to_layer.get(c) in plan.layers:
                out[node_to_layer[c]] = key
    return out


def evaluate_stages(model: nn.Module, res: PTQResult, engine: Any, x: torch.Tensor, y: torch.Tensor | None, config: PTQConfig) -> ev.AccuracyReport:
    """Every stage against the original model, and every quantized layer's SQNR.

    Each model runs once over ``x``: the FP32 reference (reused by every comparison), the folded
    model, the bounded and fake-quant models together (their per-layer outputs give the layer
    report in the same pass) and the engine. ``eval.stage_samples`` limits the folded and bounded
    stages and the layer report to the first samples.
    """
    bs, prog = config.eval.batch_size, config.progress
    n = x.shape[0] if config.eval.stage_samples is None else min(config.eval.stage_samples, x.shape[0])
    ref = ev.run_logits(channels_last(model) if config.channels_last else model, x, bs, prog, "FP32")
    report = ev.AccuracyReport(reference=ev.reference_metrics(ref, y))
    ys = None if y is None else y[:n]
    has_bound = res.bounded is not res.folded
    names = sorted(res.plan.layers) if config.eval.layer_report else []
    outs = {} if names and not has_bound else {"folded": ev.run_logits(res.folded, x[:n], bs, prog, "folded")}
    float_model = res.bounded if has_bound else res.folded  # the last float stage, paired with fake-quant
    if names and not isinstance(float_model, fx.GraphModule):
        float_model = trace(float_model)
    if names or has_bound:
        float_out, fq_head, sq = ev.paired_logits(float_model, res.fake_quant, names, x[:n], bs, prog)
        outs["bounded" if has_bound else "folded"] = float_out
        fq_out = fq_head if n == x.shape[0] else np.concatenate([fq_head, ev.run_logits(res.fake_quant, x[n:], bs, prog, "fake_quant")])
    else:
        fq_out, sq = ev.run_logits(res.fake_quant, x, bs, prog, "fake_quant"), {}
    for name, out in outs.items():
        report.stages[name] = ev.stage_metrics(ref[:n], out, ys)
    report.stages["fake_quant"] = ev.stage_metrics(ref, fq_out, y)
    run_engine = lambda xb: engine.run(xb.numpy().astype(np.float32))  # noqa: E731
    report.stages["engine"] = ev.stage_metrics(ref, ev.run_logits(run_engine, x, bs, prog, "engine"), y)
    if n < x.shape[0]:
        report.stage_samples = {**dict.fromkeys(outs, n), "fake_quant": x.shape[0], "engine": x.shape[0], **({"layers": n} if names else {})}
    if names:
        inputs = _layer_inputs(res.plan, res.fake_quant)
        report.layers = sorted(
            (ev.LayerMetrics(k, res.plan.layers[k].type, sq[k], res.amax.get(inputs.get(k, ""))) for k in names),
            key=lambda layer: (layer.sqnr_db, layer.name),
        )
    return report


def _input_histograms(res: PTQResult, cres: calib.CalibResult) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    out = {}
    for layer, key in _layer_inputs(res.plan, res.fake_quant).items():
        obs = cres.observers.get(quantizer_name(key))
        if obs is None:
            continue
        h = obs.histogram
        edges = np.arange(h.num_bins + 1) * h.width
        last = int(np.nonzero(h.counts)[0][-1]) + 2 if h.counts.any() else 2
        out[layer] = (h.counts[:last].astype(float), edges[: last + 1], res.amax[key])
    return out


def _write_fold_reports(res: PTQResult, out: Path) -> None:
    def as_dict(r: Any) -> Any:
        return r.to_dict() if hasattr(r, "to_dict") else r

    data = {k: as_dict(v) for k, v in res.reports.items() if v is not None}
    res.artifacts["reports"] = atomic_write_text(out / "reports.json", json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
