"""Where Q/DQ goes: TensorRT's explicit-quantization placement, decided on the traced graph.

Rules (TensorRT developer guide, "Explicit Quantization"; NVIDIA Model Optimizer's int8 ONNX
placement is the reference implementation):

1. Every Conv/ConvTranspose/Linear (and functional conv/linear/matmul) gets its activation
   input quantized per tensor and its weight per output channel, unless it is kept in float.
2. Nothing is quantized between a layer and its BN/ReLU/Clip epilogue, and a layer's output is
   not quantized for its own sake: it is quantized only where it is the input of a quantized layer
   (a linear bottleneck) or the skip input of a residual add.
3. On a residual add whose one input is a quantized layer's output used nowhere else (the branch
   TensorRT fuses as conv+add), only the *other* (skip) input is quantized. When both inputs are
   such outputs, the deeper one is fused and the shallower one (the downsample path) quantized.
4. Tensors meeting at a concat share one scale (a group; the calibration takes the group max).

A quant point is a tensor (an fx node's output) plus the consumers that read it quantized; the
others keep reading the float tensor. Its key is the fx node name.
"""
from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qfold.fx import CONV, is_add
from qfold.quant.modules import weight_axis

QUANT_LAYER_TYPES: tuple[type[nn.Module], ...] = (CONV, nn.Linear)
QUANT_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, operator.matmul, torch.bmm, torch.mm}
CAT_FUNCTIONS = {torch.cat, torch.concat}


@dataclass(frozen=True)
class QuantPoint:
    """A tensor quantized per tensor, and the nodes that read its quantized value."""

    key: str
    role: str  # "input" (of a quantized layer) or "skip" (residual add)
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class LayerPlan:
    """A layer whose weight is quantized per channel."""

    name: str
    type: str
    axis: int


@dataclass
class QuantPlan:
    """The whole placement: quant points, quantized layers, float layers and shared-scale groups."""

    points: dict[str, QuantPoint] = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    float_layers: dict[str, str] = field(default_factory=dict)  # name -> why it stays float
    groups: list[tuple[str, ...]] = field(default_factory=list)

    def precision_map(self) -> dict[str, str]:
        """Effective precision per weighted layer: "int8" or "float (<reason>)"."""
        out = {name: "int8" for name in self.layers}
        out.update({name: f"float ({why})" for name, why in self.float_layers.items()})
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        """JSON-ready description (stable key order)."""
        return {
            "points": {k: {"role": p.role, "consumers": list(p.consumers)} for k, p in sorted(self.points.items())},
            "layers": {k: {"type": v.type, "axis": v.axis} for k, v in sorted(self.layers.items())},
            "float_layers": dict(sorted(self.float_layers.items())),
            "groups": [list(g) for g in self.groups],
        }


def _is_quant_layer_node(gm: fx.GraphModule, node: fx.Node, extra: tuple[type[nn.Module], ...] = ()) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), QUANT_LAYER_TYPES + extra)
    return node.op == "call_function" and node.target in QUANT_FUNCTIONS


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CAT_FUNCTIONS


def match_patterns(
    gm: fx.GraphModule, patterns: tuple[str, ...], layer_types: tuple[type[nn.Module], ...] = ()
) -> dict[str, str]:
    """Resolve keep-in-float patterns against the weighted layers of ``gm``.

    A pattern is ``type:<ClassName>``, ``re:<regex>`` (full match on the qualified name), or a
    glob on the qualified name (``layer1.*``, an exact name). Returns ``{layer: pattern}``.

    Raises:
        ValueError: a pattern matches no weighted layer (it names the pattern and the layers).
    """
    names = [n.target for n in gm.graph.nodes if n.op == "call_module" and _is_quant_layer_node(gm, n, layer_types)]
    matched: dict[str, str] = {}
    for pat in patterns:
        if pat.startswith("type:"):
            hits = [n for n in names if type(gm.get_submodule(n)).__name__ == pat[5:]]
        elif pat.startswith("re:"):
            rx = re.compile(pat[3:])
            hits = [n for n in names if rx.fullmatch(n)]
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ValueError(
                f"keep-in-float pattern {pat!r} matches no Conv/ConvTranspose/Linear layer; "
                f"layers are: {shown}. Use a glob on the name, 're:<regex>' or 'type:<ClassName>'."
            )
        for h in hits:
            matched.setdefault(h, pat)
    return matched


def _depths(gm: fx.GraphModule) -> dict[fx.Node, int]:
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        parents = [a for a in node.all_input_nodes]
        depth[node] = 1 + max((depth[p] for p in parents), default=0)
    return depth


def _fusable_branch(gm: fx.GraphModule, node: fx.Node, quantized: set[str]) -> bool:
    """True when ``node`` is a quantized layer's output read only by one consumer."""
    return node.op == "call_module" and node.target in quantized and len(node.users) == 1


def plan_quantization(
    gm: fx.GraphModule, keep_float: tuple[str, ...] = (), *, layer_types: tuple[type[nn.Module], ...] = ()
) -> QuantPlan:
    """Decide the Q/DQ placement for a folded, traced model.

    Args:
        gm: the traced model (after fold and bound).
        keep_float: patterns of layers to keep in float (see :func:`match_patterns`).
        layer_types: extra module types treated as weighted layers (quantized input, per-channel
            weight on ``weight_axis``), e.g. QAT's Conv+BN module whose fold is simulated.
    """
    plan = QuantPlan()
    floats = match_patterns(gm, keep_float, layer_types)
    plan.float_layers = {n: f"matches {p!r}" for n, p in floats.items()}
    consumers: dict[str, list[str]] = {}
    roles: dict[str, str] = {}

    def want(src: fx.Node, consumer: fx.Node, role: str) -> None:
        if not isinstance(src, fx.Node):
            return
        consumers.setdefault(src.name, [])
        if consumer.name not in consumers[src.name]:
            consumers[src.name].append(consumer.name)
        roles.setdefault(src.name, role)

    for node in gm.graph.nodes:
        if not _is_quant_layer_node(gm, node, layer_types):
            continue
        if node.op == "call_module":
            if node.target in floats:
                continue
            layer = gm.get_submodule(node.target)
            plan.layers[node.target] = LayerPlan(node.target, type(layer).__name__, weight_axis(layer))
            want(node.args[0], node, "input")
        else:  # functional conv/linear: activation input only (weights are runtime tensors); matmul: both
            n_act = 2 if node.target in (torch.matmul, operator.matmul, torch.bmm, torch.mm) else 1
            for a in node.args[:n_act]:
                want(a, node, "input")

    depth = _depths(gm)
    quantized = set(plan.layers)
    for node in gm.graph.nodes:
        if not is_add(node):
            continue
        ins = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(ins) != 2:
            continue
        fused = [a for a in ins if _fusable_branch(gm, a, quantized)]
        if not fused:
            continue  # no conv+add fusion possible: leave the add in float
        main = max(fused, key=lambda a: depth[a])
        skip = ins[1] if ins[0] is main else ins[0]
        want(skip, node, "skip")

    plan.points = {k: QuantPoint(k, roles[k], tuple(c)) for k, c in consumers.items()}
    plan.groups = _concat_groups(gm, set(plan.points))
    return plan


def _concat_groups(gm: fx.GraphModule, keys: set[str]) -> list[tuple[str, ...]]:
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for node in gm.graph.nodes:
        if not _is_cat(node):
            continue
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        members = [a.name for a in seq if isinstance(a, fx.Node) and a.name in keys]
        if node.name in keys:
            members.append(node.name)
        for m in members[1:]:
            parent[find(m)] = find(members[0])
    groups: dict[str, list[str]] = {}
    for k in parent:
        groups.setdefault(find(k), []).append(k)
    return sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)
