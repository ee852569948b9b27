"""Step 3: calibrate the fake-quant model (plan Q/DQ, observe the float network, set every amax).

The activation amax come from :mod:`calib` (streaming histograms over the calibration batches);
tensors meeting at a concat share one amax (:func:`qfold.quant.prepare.tie_groups`); method
``auto`` then chooses per tensor (:mod:`qfold.quant.auto`). :func:`calibration_table` is what
``calibration.json`` holds, hashed with :func:`calib.hash_model` / :func:`calib.hash_batches` so
the file can be checked against a model and data with calib alone.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from operator import attrgetter
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import calib
from calib.observer import flat_view
from qfold.capture import trace
from qfold.config import CalibConfig
from qfold.fx import RELU_FUNCS, RELU_METHODS, is_add, module_of
from qfold.inputs.rows import rows
from qfold.inputs.sources import batches
from qfold.quant.plan import QuantPlan, plan_quantization
from qfold.quant.prepare import (
    PREFIX,
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

    ``watch(model)``: a context the calibration pass (the float network, quantizers off) runs
    in, for a caller that needs that pass's outputs too (the bound report: one pass fewer); the
    model it gets shares every submodule with the fake-quant model.
    Returns ``(fake_quant, plan, result)``; ``result`` holds the observers (their histograms are
    the report's activation plots) and, in ``result.extra["node_amax"]``, the float ``max |x|`` of
    the layer and add outputs no quantizer reads, by fx node name (what an engine quantizing more
    tensors than the Q/DQ graph needs: :mod:`qfold.onnx.tensor_amax`). Raises ValueError when nothing is left to
    quantize.
    """
    bs = rows(config.batch_size, model, calib_x)
    gm = model if isinstance(model, fx.GraphModule) else trace(model, example_inputs=calib_x[:bs])
    plan = plan_quantization(gm, tuple(keep_float))
    fq = prepare_fake_quant(gm, plan)
    if not plan.points:
        raise ValueError("nothing to quantize: the model has no Conv/ConvTranspose/Linear layer outside keep_float")
    method = calib.CalibMethod(config.method, percentile=config.percentile)
    names = [quantizer_name(k) for k in sorted(plan.points)]
    tapped, node_amax = _tapped(fq)
    with quantization_disabled(fq), (watch(tapped) if watch is not None else nullcontext()), torch.inference_mode():
        result = calib.calibrate(tapped, batches(calib_x, bs), names, method=method,
                                 progress=progress, num_bins=config.num_bins)
    result.extra["node_amax"] = dict(node_amax)
    quantizers = act_quantizers(fq)
    for k in sorted(plan.points):
        quantizers[k].set_amax(result.amax[quantizer_name(k)])
    tie_groups(quantizers, plan.groups)
    for layer in quant_layers(fq).values():
        layer.refresh_weight_amax()
    if config.method == "auto":  # per tensor, the candidate with the least output-error estimate
        from qfold.quant.auto import refine_auto

        refine_auto(fq, plan, result, calib_x, bs)
    return fq, plan, result


class _Tap(nn.Module):
    """Identity that keeps the running ``max |x|`` of the tensors passing through, under one name."""

    def __init__(self, store: dict[str, float], name: str) -> None:
        super().__init__()
        self.store, self.name = store, name

    def forward(self, x: object) -> object:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            lo, hi = torch.aminmax(flat_view(x.detach()))  # 7x faster than on a channels-last view
            self.store[self.name] = max(self.store.get(self.name, 0.0), -float(lo), float(hi))
        return x


_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_ACT_FUNCS = (*RELU_FUNCS, F.relu6, F.hardtanh, torch.clamp, torch.clip)
_ACT_METHODS = (*RELU_METHODS, "clamp", "clamp_", "clip", "clip_")


def _is_activation(gm: fx.GraphModule, n: fx.Node) -> bool:
    return (isinstance(module_of(gm, n), _ACT_MODULES) or (n.op == "call_function" and n.target in _ACT_FUNCS)
            or (n.op == "call_method" and n.target in _ACT_METHODS))


def _unquantized_outputs(fq: fx.GraphModule) -> list[fx.Node]:
    """The outputs of layers and adds (after their single activation, if any) that no quantizer
    reads and that are not model outputs: the only tensors an engine may quantize beyond the Q/DQ
    graph's (a tensor a quantizer reads has that quantizer's amax)."""
    layers = set(quant_layers(fq))
    out = []
    for n in fq.graph.nodes:
        if not ((n.op == "call_module" and n.target in layers) or is_add(n)):
            continue
        users = list(n.users)
        t = users[0] if len(users) == 1 and _is_activation(fq, users[0]) else n
        if t.users and not any(u.op == "output" or (u.op == "call_module" and str(u.target).startswith(f"{PREFIX}.")) for u in t.users):
            out.append(t)
    return out


def _tapped(fq: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, float]]:
    """A GraphModule sharing ``fq``'s submodules, with a :class:`_Tap` after each of
    :func:`_unquantized_outputs`: the calibration pass measures their amax too, one read each."""
    store: dict[str, float] = {}
    graph = copy.deepcopy(fq.graph)
    mods: dict[str, nn.Module] = {}
    wanted = {n.name for n in _unquantized_outputs(fq)}
    for i, n in enumerate(list(graph.nodes)):
        if n.name not in wanted:
            continue
        mods[f"{PREFIX}_tap.{i}"] = _Tap(store, n.name)
        with graph.inserting_after(n):
            t = graph.call_module(f"{PREFIX}_tap.{i}", (n,))
        n.replace_all_uses_with(t, delete_user_cb=lambda u, t=t: u is not t)
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and n.target not in mods:
            mods[n.target] = attrgetter(n.target)(fq)  # a submodule or a constant, by dotted path
    return fx.GraphModule(mods, graph), store


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
