"""``calib.method = "auto"``: per quant point, the amax candidate with the least output-error estimate.

The candidates and the score are :mod:`calib.auto`'s (pure histogram math); this module supplies
what only the model knows: the ``coherence`` of each tensor, from the weights of the layers that
read it quantized (``sum_out (sum w)**2 / sum_out ||w||**2``, see :mod:`calib.auto`), and one
check at the end. Choosing candidates needs no data pass (the histograms are the calibration's);
the check runs the fake-quant model twice on at most ``GUARD_SAMPLES`` calibration inputs and keeps
the per-tensor choice only when its model-output SQNR (against the float model) beats that of
``max`` by ``GUARD_MARGIN_DB``, so ``auto`` is never worse than ``max`` on the calibration data and
a gain within measurement noise falls back to ``max``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import calib
from calib.auto import AutoChoice, auto_amax
from qfold.quant.plan import QuantPlan
from qfold.quant.prepare import (
    act_quantizers,
    quant_layers,
    quantization_disabled,
    quantizer_name,
)
from qfold.report import metrics as metrics

GUARD_SAMPLES = 256
GUARD_MARGIN_DB = 0.05  # the per-tensor choice must beat max by this much on the calibration inputs


def coherence(fq: fx.GraphModule, consumers: tuple[str, ...]) -> float:
    """``sum_out (sum w)**2 / sum_out ||w||**2`` over the quantized layers among ``consumers`` (fx node names).

    1.0 when no quantized layer reads the tensor (a residual skip input: the error reaches the
    output as it is).
    """
    layers = quant_layers(fq)
    targets = {n.name: n.target for n in fq.graph.nodes if n.op == "call_module"}
    num = den = 0.0
    for c in consumers:
        layer = layers.get(targets.get(c, ""))
        if layer is None:
            continue
        w = layer.layer.weight.detach().double().movedim(layer.axis, 0).flatten(1)
        num += float((w.sum(1) ** 2).sum())
        den += float((w * w).sum())
    return num / den if den > 0 else 1.0


def _apply(fq: fx.GraphModule, plan: QuantPlan, amax: dict[str, float]) -> dict[str, float]:
    amax = dict(amax)
    for group in plan.groups:  # tensors meeting at a concat share one scale
        amax.update(dict.fromkeys(group, max(amax[k] for k in group)))
    quantizers = act_quantizers(fq)
    for k, a in amax.items():
        quantizers[k].set_amax(a)
    return amax


def _output_sqnr(fq: fx.GraphModule, x: torch.Tensor, ref: list[torch.Tensor], batch_size: int) -> float:
    sig = noise = 0.0
    with torch.no_grad():
        for r, i in zip(ref, range(0, x.shape[0], batch_size)):
            out = fq(x[i : i + batch_size]).double()
            sig += float((r**2).sum())
            noise += float(((r - out) ** 2).sum())
    return metrics.sqnr_db_from_energy(sig, noise)


def refine_auto(fq: fx.GraphModule, plan: QuantPlan, result: calib.CalibResult, calib_x: torch.Tensor,
                batch_size: int = 64) -> dict[str, float]:
    """Set every activation quantizer of ``fq`` to its ``auto`` amax; returns the amax per quant point.

    Records ``result.extra["auto"]``: per tensor the chosen method, every candidate's amax and
    score and the coherence; and the check (output SQNR of the choice and of ``max`` on the
    calibration inputs, and which was kept).
    """
    m = result.method
    choices: dict[str, AutoChoice] = {}
    coh: dict[str, float] = {}
    for key in sorted(plan.points):
        coh[key] = coherence(fq, plan.points[key].consumers)
        obs = result.observers[quantizer_name(key)]
        choices[key] = auto_amax(obs.histogram, coh[key], percentile=m.percentile, num_bits=m.num_bits, start_bin=m.start_bin)
    auto = {k: c.amax for k, c in choices.items()}
    maxes = {k: c.candidates["max"] for k, c in choices.items()}
    x = calib_x[:GUARD_SAMPLES]
    with quantization_disabled(fq), torch.no_grad():
        ref = [fq(x[i : i + batch_size]).double() for i in range(0, x.shape[0], batch_size)]
    _apply(fq, plan, maxes)
    sqnr_max = _output_sqnr(fq, x, ref, batch_size)
    _apply(fq, plan, auto)
    sqnr_auto = _output_sqnr(fq, x, ref, batch_size)
    kept = "auto" if sqnr_auto >= sqnr_max + GUARD_MARGIN_DB else "max"
    final = _apply(fq, plan, auto if kept == "auto" else maxes)
    result.extra["auto"] = {
        "tensors": {k: {**choices[k].to_dict(), "coherence": coh[k]} for k in sorted(choices)},
        "check": {"samples": int(x.shape[0]), "sqnr_db_auto": round(sqnr_auto, 4), "sqnr_db_max": round(sqnr_max, 4), "kept": kept},
    }
    return final
