"""Step 3: calibrate the fake-quant model (plan Q/DQ, observe the float network, set every amax).

The activation amax come from :mod:`calib` (streaming histograms over the calibration batches);
tensors meeting at a concat share one amax (:func:`qfold.quant.prepare.tie_groups`); method
``auto`` then chooses per tensor (:mod:`qfold.quant.auto`). :func:`calibration_table` is what
``calibration.json`` holds, hashed with :func:`calib.hash_model` / :func:`calib.hash_batches` so
the file can be checked against a model and data with calib alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

import calib
from qfold.capture import trace
from qfold.config import CalibConfig
from qfold.inputs.sources import batches
from qfold.quant.plan import QuantPlan, plan_quantization
from qfold.quant.prepare import (
    act_quantizers,
    prepare_fake_quant,
    quant_layers,
    quantization_disabled,
    quantizer_name,
    tie_groups,
)

__all__ = ["calibrate_model", "calibration_table", "write_trt_cache"]


def calibrate_model(model: nn.Module, calib_x: torch.Tensor, config: CalibConfig, keep_float: Sequence[str] = (),
                    *, progress: bool = False, watch: Callable[[fx.GraphModule], AbstractContextManager] | None = None,
                    ) -> tuple[fx.GraphModule, QuantPlan, calib.CalibResult]:
    """Plan Q/DQ on ``model`` (``keep_float`` layers left out), insert quantizers and set every amax.

    ``watch(fake_quant)``: a context the calibration pass (the float network, quantizers off) runs
    in, for a caller that needs that pass's outputs too (the bound report: one pass fewer).
    Returns ``(fake_quant, plan, result)``; ``result`` holds the observers (their histograms are
    the report's activation plots). Raises ValueError when nothing is left to quantize.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model, example_inputs=calib_x[: config.batch_size])
    plan = plan_quantization(gm, tuple(keep_float))
    fq = prepare_fake_quant(gm, plan)
    if not plan.points:
        raise ValueError("nothing to quantize: the model has no Conv/ConvTranspose/Linear layer outside keep_float")
    method = calib.CalibMethod(config.method, percentile=config.percentile)
    names = [quantizer_name(k) for k in sorted(plan.points)]
    with quantization_disabled(fq), (watch(fq) if watch is not None else nullcontext()), torch.inference_mode():
        result = calib.calibrate(fq, batches(calib_x, config.batch_size), names, method=method,
                                 progress=progress, num_bins=config.num_bins)
    quantizers = act_quantizers(fq)
    for k in sorted(plan.points):
        quantizers[k].set_amax(result.amax[quantizer_name(k)])
    tie_groups(quantizers, plan.groups)
    for layer in quant_layers(fq).values():
        layer.refresh_weight_amax()
    if config.method == "auto":  # per tensor, the candidate with the least output-error estimate
        from qfold.quant.auto import refine_auto

        refine_auto(fq, plan, result, calib_x, config.batch_size)
    return fq, plan, result


def calibration_table(fq: fx.GraphModule, result: calib.CalibResult, calib_x: torch.Tensor, model: nn.Module) -> calib.CalibTable:
    """The versioned JSON table of the calibrated ``fq``: activation amax per quant point, weight amax
    per layer and channel.

    ``meta.model_sha256`` is :func:`calib.hash_model` of the FP32 ``model``; ``meta.data_sha256``
    is :func:`calib.hash_batches` of ``[calib_x]``.
    """
    weights = {name: [float(v) for v in layer.weight_amax] for name, layer in quant_layers(fq).items()}
    amax = {k: float(q.amax) for k, q in act_quantizers(fq).items()}
    return calib.CalibTable(
        amax=dict(sorted(amax.items())),
        method=result.method.name,
        meta={
            "method": {"name": result.method.name, "percentile": result.method.percentile},
            "weights": weights,
            "spec": {"bits": 8, "narrow": True, "scale": "amax/127", "activations": "per-tensor", "weights": "per-channel"},
            "data_sha256": calib.hash_batches([calib_x]),
            "model_sha256": calib.hash_model(model),
            "samples": int(calib_x.shape[0]),
            "batches": result.num_batches,
            "versions": {"torch": torch.__version__.split("+")[0], "calib": "1"},
            **({"auto": result.extra["auto"]} if "auto" in result.extra else {}),  # per-tensor choices of method "auto"
        },
    )


def write_trt_cache(path: Path, qdq_onnx: Path, method: str) -> tuple[Path, Path]:
    """TensorRT's calibration cache of the Q/DQ ONNX's activation scales at ``path``, and its note.

    The cache is labelled ``EntropyCalibration2`` for method "entropy", else ``MinMaxCalibration``;
    the note (``<path>.json``) says which TensorRT versions read it (TensorRT 11 reads none).
    """
    import onnx

    from qfold.onnx.qdq import activation_scales

    algo = {"entropy": "EntropyCalibration2"}.get(method, "MinMaxCalibration")
    cache = calib.write_trt_cache(path, activation_scales(onnx.load(str(qdq_onnx))), algorithm=algo)
    return cache, calib.write_trt_cache_note(cache)
