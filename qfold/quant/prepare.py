"""Build the fake-quant model from a plan: a graph rewrite on a copy, no patching.

Each quant point becomes an :class:`ActQuant` module named ``qfold_q.<key>`` inserted after the
tensor it quantizes and read only by the consumers the plan lists; each quantized layer is
wrapped in :class:`QuantLayer` under its own name. The ActQuants start disabled (identity), the
state in which calibration observes them.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from qfold.fx import set_module
from qfold.quant.modules import ActQuant, QuantLayer
from qfold.quant.plan import QuantPlan

PREFIX = "qfold_q"


def quantizer_name(key: str) -> str:
    """Module name of the ActQuant for quant point ``key``."""
    return f"{PREFIX}.{key}"


def prepare_fake_quant(
    gm: fx.GraphModule,
    plan: QuantPlan,
    *,
    wrap: Callable[[nn.Module], nn.Module] = QuantLayer,
    inplace: bool = False,
) -> fx.GraphModule:
    """Return a new GraphModule with the plan's quantizers inserted (``gm`` is not modified).

    Args:
        gm: the traced (folded) model.
        plan: from :func:`qfold.quant.plan_quantization` on ``gm``.
        wrap: builds the weight-quantizing module of each planned layer (QAT passes its own
            :class:`QuantLayer` subclasses).
        inplace: rewrite ``gm`` itself instead of a deep copy, so its layers (and their
            Parameters) stay the same objects (QAT: an optimizer built before keeps working).

    Raises:
        ValueError: the model was already prepared, or the plan names nodes the graph lacks.
    """
    if any(isinstance(m, (ActQuant, QuantLayer)) for m in gm.modules()):
        raise ValueError("this model already carries qfold quantizers; prepare the float model, not a prepared one")
    if not inplace:
        gm = copy.deepcopy(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [k for k, p in plan.points.items() if k not in nodes or any(c not in nodes for c in p.consumers)]
    missing += [name for name in plan.layers if name not in dict(gm.named_modules())]
    if missing:
        raise ValueError(f"the quantization plan does not match this graph (unknown: {sorted(missing)}); plan it on the same traced model")

    container = nn.Module()
    gm.add_module(PREFIX, container)
    device = next((p.device for p in gm.parameters()), None)  # quantizers live where the model lives
    for key, point in sorted(plan.points.items()):
        src = nodes[key]
        container.add_module(key, ActQuant(device=device))
        with gm.graph.inserting_after(src):
            q = gm.graph.call_module(quantizer_name(key), (src,))
        for consumer in point.consumers:
            nodes[consumer].replace_input_with(src, q)
    for name in plan.layers:
        set_module(gm, name, wrap(gm.get_submodule(name)))
    gm.graph.lint()
    gm.recompile()
    return gm


def act_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    """``{key: ActQuant}`` of a prepared model, sorted by key."""
    prefix = PREFIX + "."
    return {n[len(prefix):]: m for n, m in sorted(model.named_modules()) if isinstance(m, ActQuant) and n.startswith(prefix)}


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """``{layer name: QuantLayer}`` of a prepared model, sorted by name."""
    return {n: m for n, m in sorted(model.named_modules()) if isinstance(m, QuantLayer)}


class quantization_disabled:
    """Context manager: every quantizer of a prepared model is the identity inside the block.

    Calibration runs the float network through it, so observed ranges are the float ones (as in
    TensorRT's own calibration); the previous states are restored on exit, even on error.
    """

    def __init__(self, model: nn.Module, *, activations_only: bool = False) -> None:
        kinds = ActQuant if activations_only else (ActQuant, QuantLayer)  # activations only: weights stay int8-valued
        self._mods = [m for m in model.modules() if isinstance(m, kinds)]
        self._saved: list[bool] = []

    def __enter__(self) -> None:
        self._saved = [bool(m.enabled) for m in self._mods]
        for m in self._mods:
            m.enabled.fill_(False)

    def __exit__(self, *exc: object) -> None:
        for m, on in zip(self._mods, self._saved):
            m.enabled.fill_(on)


@torch.no_grad()
def tie_groups(quantizers: Mapping[str, ActQuant], groups: Iterable[Iterable[str]]) -> None:
    """Tensors meeting at a concat share one amax (the group's largest), as the Q/DQ export requires.

    Used by PTQ after calibration and by QAT after its calibration; ``groups`` is
    :attr:`qfold.quant.plan.QuantPlan.groups`.
    """
    for group in groups:
        keys = list(group)
        peak = max(float(quantizers[k].amax) for k in keys)
        for k in keys:
            quantizers[k].amax.fill_(peak)
