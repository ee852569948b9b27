"""Quantization-aware training inside your own PyTorch loop: prepare, step, export.

    qmodel = qfold.qat.prepare(model, calib_batches, config=QATConfig(freeze_bn_step=200))
    for x, y in loader:                         # your loop, your optimizer (built before or after)
        loss = F.cross_entropy(qmodel(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        qfold.qat.step(qmodel)                  # schedule: freeze BN statistics / amax at their steps
    qfold.qat.export(qmodel, "model.onnx", example_input)

``prepare`` traces the model and rewrites a graph around the **same** layer objects: Conv+BN pairs
become :class:`~qfold.qat.modules.QuantConvBn` (fold simulated, batch statistics with Jacob et al.'s
correction until frozen), other Conv/Linear layers :class:`~qfold.qat.modules.QATQuantLayer`, and
activation quantizers go exactly where the PTQ plan (:func:`qfold.quant.plan_quantization`) and
therefore the Q/DQ export put them. The Parameters (and BatchNorm buffers) are shared with the
model you pass, so an optimizer built on it before ``prepare`` keeps training them; the model's
structure is left alone and ``prepare`` changes no value. ``convert`` gives the folded fake-quant
model PTQ produces (QuantLayer + ActQuant), which the engine runs.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from calib.method import CalibMethod
from qfold.bound.passes import rewrite_to_relu6
from qfold.capture import trace
from qfold.capture.keep_attrs import keep_interface
from qfold.config import BOUND_MODES, CalibConfig
from qfold.fold import formulas as fold_math
from qfold.fx import call_counts, relu_site, set_module
from qfold.inputs.rows import rows
from qfold.qat.modules import ConvBn, QATActQuant, QATQuantLayer, QuantConvBn, can_pair
from qfold.quant.modules import ActQuant, QuantLayer
from qfold.quant.plan import plan_quantization
from qfold.quant.prepare import (
    PREFIX,
    act_quantizers,
    prepare_fake_quant,
    quantization_disabled,
    tie_groups,
)

__all__ = ["QATConfig", "amax_parameters", "convert", "prepare", "step"]

STEP_BUFFER = "qfold_qat_step"
_CONFIG_ATTR = "_qfold_qat_config"
_GROUPS_ATTR = "_qfold_qat_groups"


@dataclass(frozen=True)
class QATConfig:
    """How QAT runs.

    Attributes:
        freeze_bn_step: after this many :func:`step` calls BatchNorm uses (and stops updating) its
            running statistics; None never freezes (eval mode always uses them).
        freeze_amax_step: after this many steps every amax (activations and weights) is fixed.
        learn_amax: train activation amax with LSQ (add :func:`amax_parameters` to the optimizer).
        amax_momentum: tracked (not learned) activation amax follows the batch max |x| with this
            EMA momentum; 0 keeps the calibrated value.
        calib: how ``calib_data`` initialises activation amax (:class:`qfold.config.CalibConfig`,
            the PTQ ``[calib]`` section: method, percentile, bins, and the batch size when
            ``calib_data`` is one tensor; every method but "auto").
        bound: "off", or "swap" (every ReLU becomes ReLU6, literally; QAT then adapts the weights).
            "preserve" needs calibration-driven rescaling: run ``qfold.bound`` on the float model first.
        keep_float: patterns of layers left unquantized (see :func:`qfold.quant.plan.match_patterns`).
    """

    freeze_bn_step: int | None = None
    freeze_amax_step: int | None = None
    learn_amax: bool = False
    amax_momentum: float = 0.01
    calib: CalibConfig = field(default_factory=CalibConfig)
    bound: str = "off"
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("freeze_bn_step", "freeze_amax_step"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"QATConfig.{name} must be None or an int >= 0, got {v!r}")
        if not 0.0 <= self.amax_momentum <= 1.0:
            raise ValueError(f"QATConfig.amax_momentum must be in [0, 1], got {self.amax_momentum}")
        if self.calib.method == "auto":
            raise ValueError("QATConfig.calib.method 'auto' needs the PTQ pipeline's output check; use max, percentile, entropy or mse")
        if self.bound not in BOUND_MODES:
            raise ValueError(f"QATConfig.bound must be one of {BOUND_MODES}, got {self.bound!r}")
        if self.bound == "preserve":
            raise ValueError(
                "QATConfig.bound='preserve' rescales weights from calibration data, which prepare does not do on "
                "shared Parameters: run qfold.bound.bound_relu(model, calib_data, mode='preserve') on the float "
                "model first, then qat.prepare it (bound='off'), or use bound='swap'"
            )
        object.__setattr__(self, "keep_float", tuple(self.keep_float))


def _is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, (ActQuant, QuantLayer, ConvBn)) or hasattr(m, _CONFIG_ATTR) for m in model.modules())


def _root(model: nn.Module) -> fx.GraphModule:
    """The prepared GraphModule inside ``model`` (itself, or wrapped by DDP/DataParallel)."""
    for m in model.modules():
        if hasattr(m, _CONFIG_ATTR):
            return m  # type: ignore[return-value]
    raise ValueError(
        f"{type(model).__name__} is not a QAT-prepared model: call qfold.qat.prepare(model, ...) and train the "
        "module it returns"
    )


def _share_layers(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` and build the GraphModule on the *original* submodules (same Parameters).

    ``GraphModule`` copies references to the leaf modules the graph calls and makes fresh parent
    containers, so rewriting it never changes ``model``'s structure.
    """
    traced = trace(model)
    return keep_interface(fx.GraphModule(model, copy.deepcopy(traced.graph), class_name=traced.__class__.__name__), model)


def _swap_relu6(gm: fx.GraphModule) -> None:
    """Literal ReLU -> ReLU6 at every ReLU site (:func:`qfold.fx.relu_site`), as the bound's ``swap`` mode does."""
    rewrite_to_relu6(gm, {n.name: inplace for n in gm.graph.nodes if (inplace := relu_site(gm, n)) is not None})


def _pair_conv_bn(gm: fx.GraphModule) -> None:
    """Replace each ``conv -> bn`` (conv read only by bn, each module called once) by a ConvBn node."""
    calls = call_counts(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and calls[src.target] == 1 and len(src.users) == 1):
            continue
        conv, bn = gm.get_submodule(src.target), gm.get_submodule(node.target)
        if not can_pair(conv, bn) or node.kwargs:
            continue
        set_module(gm, src.target, ConvBn(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()


def _wrap(layer: nn.Module) -> nn.Module:
    return QuantConvBn(layer) if isinstance(layer, ConvBn) else QATQuantLayer(layer)


def _batches(data: Any, batch_size: int | None, model: nn.Module) -> Iterable[Any]:
    if isinstance(data, torch.Tensor):
        return list(torch.split(data, rows(batch_size, model, data)))
    return data


def _calibrate(gm: fx.GraphModule, data: Any, config: QATConfig) -> None:
    from calib.observe import calibrate

    quants = act_quantizers(gm)
    names = [f"{PREFIX}.{k}" for k in quants]
    method = CalibMethod(config.calib.method, percentile=config.calib.percentile)
    with quantization_disabled(gm):
        result = calibrate(gm, _batches(data, config.calib.batch_size, gm), names, method=method, progress=False, num_bins=config.calib.num_bins)
    amax = result.amax
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from calib.distributed import all_reduce_observers

        all_reduce_observers(result.observers)  # every rank: the histograms of all ranks' data
        amax = result.recompute(method)
    for key, q in quants.items():
        q.set_amax(amax[f"{PREFIX}.{key}"])
    tie_groups(quants, getattr(gm, _GROUPS_ATTR, ()))


def _attach_state(gm: fx.GraphModule, config: QATConfig, groups: tuple, device: torch.device) -> None:
    """Step counter buffer (in ``state_dict``) and config on the root, both surviving ``copy.deepcopy``.

    A GraphModule's deepcopy keeps only what its graph references plus ``meta``'s user-preserved
    attributes, so the counter is read by a (dead) ``get_attr`` node and the config rides in ``meta``.
    """
    gm.register_buffer(STEP_BUFFER, torch.zeros((), dtype=torch.int64, device=device))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        gm.graph.get_attr(STEP_BUFFER)
    attrs = {_CONFIG_ATTR: config, _GROUPS_ATTR: groups}
    gm.meta.setdefault(fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY, {}).update(attrs)
    for k, v in attrs.items():
        setattr(gm, k, v)
    gm.recompile()


def prepare(model: nn.Module, calib_data: Any = None, *, config: QATConfig = QATConfig()) -> fx.GraphModule:
    """The QAT model of ``model`` (a GraphModule sharing its layers), ready to train.

    Args:
        model: the float model, in training mode, torch.fx-traceable.
        calib_data: input batches (a tensor ``(N, ...)`` split into ``config.calib.batch_size``, or
            an iterable of input tensors) to initialise activation amax; None initialises each
            quantizer from the first training batch (or from a loaded ``state_dict``: pass None
            when resuming, no recalibration happens).
        config: schedule and options (:class:`QATConfig`).

    Raises:
        ValueError: ``model`` is already QAT/PTQ prepared, or in eval mode.
        qfold.fx.UntraceableModelError: torch.fx cannot trace it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qat.prepare expects an nn.Module, got {type(model).__name__}")
    if _is_prepared(model):
        raise ValueError(
            "this model is already prepared (it carries qfold quantizers); pass the float model to qat.prepare "
            "once and keep training the module it returned"
        )
    if not model.training:
        raise ValueError(
            "qat.prepare needs the model in training mode (call model.train() first): QAT trains BatchNorm with "
            "batch statistics and updates quantizer ranges, which eval mode would silently skip"
        )
    gm = _share_layers(model)
    if config.bound == "swap":
        _swap_relu6(gm)
    _pair_conv_bn(gm)
    plan = plan_quantization(gm, config.keep_float, layer_types=(ConvBn,))
    gm = prepare_fake_quant(gm, plan, wrap=_wrap, inplace=True)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    container = gm.get_submodule(PREFIX)
    for key in list(container._modules):
        setattr(container, key, QATActQuant(learn=config.learn_amax, momentum=config.amax_momentum).to(device))
    for m in gm.modules():
        if isinstance(m, QuantLayer):
            m.to(device)  # new buffers only: the shared layer is already there
    _attach_state(gm, config, tuple(plan.groups), device)
    gm.train()
    if calib_data is not None:
        _calibrate(gm, calib_data, config)
    return gm


def amax_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned activation amax Parameters (``learn_amax=True``; empty otherwise).

    ``qmodel.parameters()`` includes them; an optimizer built on the float model before ``prepare``
    does not, so give them a group of their own::

        opt.add_param_group({"params": qfold.qat.amax_parameters(qmodel), "weight_decay": 0.0})
    """
    return [q.amax for q in act_quantizers(_root(model)).values() if isinstance(q.amax, nn.Parameter)]


def _sync_tracked_amax(gm: fx.GraphModule) -> None:
    """DDP: tracked amax becomes the max over ranks (= the EMA of the global batch max)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    quants = [q for q in act_quantizers(gm).values() if not q.learn]
    if not quants:
        return
    flat = torch.stack([q.amax.detach().float() for q in quants]).cpu()
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    with torch.no_grad():
        for q, v in zip(quants, flat):
            q.amax.fill_(float(v))


def step(model: nn.Module) -> int:
    """Advance the QAT schedule by one training step; call once per optimizer step. Returns the count.

    Freezes BatchNorm statistics at ``config.freeze_bn_step`` and every amax at
    ``config.freeze_amax_step``; keeps concat groups on one amax; under ``torch.distributed``
    makes tracked amax identical on every rank (a MAX all-reduce). Accepts the prepared model or a
    DDP/DataParallel wrapper of it.

    Raises:
        ValueError: not a prepared model, or it is in eval mode.
    """
    gm = _root(model)
    if not gm.training:
        raise ValueError("qat.step is called after a training step, but the model is in eval mode; call model.train()")
    config: QATConfig = getattr(gm, _CONFIG_ATTR)
    counter = getattr(gm, STEP_BUFFER)
    counter.add_(1)
    n = int(counter)
    _sync_tracked_amax(gm)
    tie_groups(act_quantizers(gm), getattr(gm, _GROUPS_ATTR, ()))
    bn_frozen = config.freeze_bn_step is not None and n >= config.freeze_bn_step
    amax_frozen = config.freeze_amax_step is not None and n >= config.freeze_amax_step
    for m in gm.modules():
        if isinstance(m, QuantConvBn) and bn_frozen:
            m.bn_frozen.fill_(True)
        if isinstance(m, (QuantConvBn, QATQuantLayer, QATActQuant)) and amax_frozen:
            m.frozen.fill_(True)
    return n


def _folded_conv(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(weight.detach().clone())
    new.bias = nn.Parameter(bias.detach().clone())
    return new


@torch.no_grad()
def convert(model: nn.Module) -> fx.GraphModule:
    """The deployable fake-quant model: BN folded into the conv weights, learned amax kept.

    Same structure as PTQ's prepared model (``QuantLayer`` + ``ActQuant`` at the plan's places), in
    eval mode, independent of ``model`` (a copy), so ``qfold.onnx.export.export_onnx`` and the engines run
    it; its output equals the QAT model's in eval mode.

    Raises:
        ValueError: not a prepared model, or an activation quantizer was never calibrated nor
            reached by a training step.
    """
    src = _root(model)
    missing = [k for k, q in act_quantizers(src).items() if bool(q.enabled) and not bool(q.initialized)]
    if missing:
        raise ValueError(
            f"cannot export before calibration or training: activation quantizers {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} have no amax. Pass calib_data to qfold.qat.prepare or run at "
            "least one training step (forward in train mode) first"
        )
    gm = copy.deepcopy(src)
    for name, m in list(gm.named_modules()):
        if isinstance(m, QuantConvBn):
            sf = m.fold_scale()
            q = QuantLayer(_folded_conv(m.layer, m.folded_weight(sf), m.folded_bias(sf)))
            if bool(m.frozen):
                q.weight_amax.copy_(m.weight_amax)
            q.enabled.copy_(m.enabled)
            set_module(gm, name, q)
        elif isinstance(m, QATQuantLayer):
            q = QuantLayer(m.layer)
            if bool(m.frozen):
                q.weight_amax.copy_(m.weight_amax)
            q.enabled.copy_(m.enabled)
            set_module(gm, name, q)
        elif isinstance(m, ConvBn):  # kept in float: fold exactly (float64)
            a, c = fold_math.bn_affine(m.bn.running_mean, m.bn.running_var, m.bn.eps, m.bn.weight, m.bn.bias)
            w, b = fold_math.fold_affine_after(m.conv.weight, m.conv.bias, a, c)
            set_module(gm, name, _folded_conv(m.conv, w, b))
        elif isinstance(m, QATActQuant):
            a = ActQuant(float(m.amax))
            a.enabled.copy_(m.enabled)
            set_module(gm, name, a.to(m.amax.device))
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target == STEP_BUFFER and not node.users:
            gm.graph.erase_node(node)
    del gm._buffers[STEP_BUFFER]
    gm.meta.pop(fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY, None)
    for attr in (_CONFIG_ATTR, _GROUPS_ATTR):
        gm.__dict__.pop(attr, None)
    gm.graph.lint()
    gm.recompile()
    gm.requires_grad_(False)
    return gm.eval()
