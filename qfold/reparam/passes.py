"""Structural re-parameterization pass: merge sums of parallel linear branches into one conv.

Finds, in the fx graph, every sum (a tree of ``+`` / ``torch.add`` / ``Tensor.add`` nodes) whose
leaves include two or more branches linear in the same input ``x``:

=============  ==========================================  =======================
branch         graph leaf                                  as a conv
=============  ==========================================  =======================
conv           ``Conv(x)``                                 itself
conv + BN      ``BN(Conv(x))`` (the conv used only there)  BN folded into the conv
identity BN    ``BN(x)``                                   identity kernel * a, c
identity       ``x`` or ``nn.Identity(x)``                 identity kernel
=============  ==========================================  =======================

and replaces each such group (it needs at least one conv) by one ``ConvNd`` with bias, named
after the group's largest conv: RepVGG (3x3 conv-BN + 1x1 conv-BN + BN), ACNet (3x3 + 1x3 + 3x1),
conv-BN + BN, plain sums of convs, ``groups > 1`` and strided blocks. Leaves reading other
inputs stay and are added back. Blocks whose geometry does not line up are left and reported.
The math is in :mod:`qfold.reparam.formulas`; nothing here depends on a model family's classes.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from qfold.capture import trace
from qfold.fold.formulas import bn_affine
from qfold.fx import is_add, module_of, set_module, training_batchnorm
from qfold.reparam import formulas as rm

# conv type -> (the BatchNorm type that may follow it, spatial rank)
_CONV_TABLE: dict[type, tuple[type, int]] = {
    nn.Conv1d: (nn.BatchNorm1d, 1),
    nn.Conv2d: (nn.BatchNorm2d, 2),
    nn.Conv3d: (nn.BatchNorm3d, 3),
}
_BN_RANK: dict[type, int] = {bn: rank for bn, rank in _CONV_TABLE.values()}


@dataclass(frozen=True)
class MergedBlock:
    """One sum of branches now computed by a single conv.

    Attributes:
        output: name of the graph node that computed the sum.
        module: qualified name of the merged conv.
        branches: the merged branches, described.
        weight_shape: the merged weight's shape ``(C_out, C_in/groups, *kernel)``.
        stride, padding, groups: the merged conv's geometry.
    """

    output: str
    module: str
    branches: tuple[str, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class LeftCandidate:
    """A sum of branches reading one input that was not merged, and why."""

    output: str
    branches: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class ReparamReport:
    """What :func:`reparameterize` merged and what it left."""

    merged: tuple[MergedBlock, ...]
    left: tuple[LeftCandidate, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists instead of tuples)."""

        def _plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "merged": [{k: _plain(v) for k, v in vars(b).items()} for b in self.merged],
            "left": [{k: _plain(v) for k, v in vars(c).items()} for c in self.left],
        }

    def __str__(self) -> str:
        lines = [f"re-parameterization: {len(self.merged)} block(s) merged, {len(self.left)} left", ""]
        if self.merged:
            lines += ["| sum | merged conv | weight | stride | padding | groups | branches |", "|---|---|---|---|---|---|---|"]
            for b in self.merged:
                w = "x".join(map(str, b.weight_shape))
                lines.append(
                    f"| {b.output} | {b.module} | {w} | {b.stride} | {b.padding} | {b.groups} | {'; '.join(b.branches)} |"
                )
        if self.left:
            lines += ["", "| sum left | branches | reason |", "|---|---|---|"]
            for c in self.left:
                lines.append(f"| {c.output} | {'; '.join(c.branches)} | {c.reason} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Branch:
    kind: str  # "conv", "conv+bn", "bn", "identity"
    source: fx.Node  # the input the branch is linear in
    leaf: fx.Node
    conv: str | None = None
    bn: str | None = None
    nodes: tuple[fx.Node, ...] = ()  # graph nodes that disappear when the branch is merged

    def describe(self, gm: fx.GraphModule) -> str:
        if self.conv is not None:
            c = gm.get_submodule(self.conv)
            k = "x".join(map(str, c.kernel_size))
            text = f"conv '{self.conv}' {k}/s{c.stride[0]}/g{c.groups}"
            return text + (f" + bn '{self.bn}'" if self.bn else "")
        if self.bn is not None:
            return f"bn '{self.bn}' on '{self.source.name}'"
        return f"identity '{self.source.name}'"


def _is_add(n: fx.Node) -> bool:
    return (
        is_add(n)
        and len(n.args) == 2
        and all(isinstance(a, fx.Node) for a in n.args)
        and n.kwargs in ({}, {"alpha": 1})
    )


def _sum_tree(root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Leaves (with multiplicity, in order) and add nodes of the sum rooted at ``root``."""
    leaves: list[fx.Node] = []
    adds: list[fx.Node] = [root]

    def visit(n: fx.Node) -> None:
        for a in n.args:
            if _is_add(a) and len(a.users) == 1:
                if a not in adds:
                    adds.append(a)
                visit(a)
            else:
                leaves.append(a)

    visit(root)
    return leaves, adds


def _branch(gm: fx.GraphModule, leaf: fx.Node) -> _Branch:
    m = module_of(gm, leaf)
    if m is not None and type(m) in _CONV_TABLE:
        return _Branch("conv", leaf.args[0], leaf, conv=leaf.target, nodes=(leaf,))
    if m is not None and type(m) in _BN_RANK:
        prev = leaf.args[0]
        pm = module_of(gm, prev)
        if pm is not None and type(pm) in _CONV_TABLE and _CONV_TABLE[type(pm)][0] is type(m) and len(prev.users) == 1:
            return _Branch("conv+bn", prev.args[0], leaf, conv=prev.target, bn=leaf.target, nodes=(prev, leaf))
        return _Branch("bn", prev, leaf, bn=leaf.target, nodes=(leaf,))
    if isinstance(m, nn.Identity):
        return _Branch("identity", leaf.args[0], leaf, nodes=(leaf,))
    return _Branch("identity", leaf, leaf)


def _spatial_padding(conv: nn.Module) -> tuple[int, ...] | str:
    """The conv's symmetric padding per spatial dim, or a reason it has none."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        if any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
            return "padding='same' with an even kernel pads asymmetrically"
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


@dataclass(frozen=True)
class _MergePlan:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    primary: str  # qualname of the conv that the merged conv replaces


def _merge_plan(gm: fx.GraphModule, group: list[_Branch], tree: set[fx.Node]) -> _MergePlan | str:
    """Geometry of the merged conv, or the reason the group cannot merge."""
    for b in group:
        for n in b.nodes:
            outside = [u.name for u in n.users if u not in tree and u not in b.nodes]
            if outside:
                return f"'{n.name}' is also read by {outside}: merging would remove a value still in use"
        if b.bn is not None:
            bn = gm.get_submodule(b.bn)
            if bn.running_mean is None or bn.running_var is None:
                return f"BatchNorm '{b.bn}' has no running statistics (track_running_stats=False), so it is not an affine map"
    convs = [gm.get_submodule(b.conv) for b in group if b.conv is not None]
    ranks = {_CONV_TABLE[type(c)][1] for c in convs} | {_BN_RANK[type(gm.get_submodule(b.bn))] for b in group if b.bn}
    if len(ranks) > 1:
        return f"branches have different spatial ranks {sorted(ranks)}"
    c_in, c_out = convs[0].in_channels, convs[0].out_channels
    if any(c.in_channels != c_in or c.out_channels != c_out for c in convs):
        return "branch convs differ in in/out channels: " + ", ".join(f"{c.in_channels}->{c.out_channels}" for c in convs)
    identities = [b for b in group if b.conv is None]
    if identities and c_in != c_out:
        return f"an identity branch needs in_channels == out_channels, the convs map {c_in} -> {c_out}"
    for b in identities:
        if b.bn is not None and gm.get_submodule(b.bn).num_features != c_out:
            return f"identity BatchNorm '{b.bn}' has {gm.get_submodule(b.bn).num_features} channels, not {c_out}"
    if len({c.stride for c in convs}) > 1:
        return f"branch strides differ: {[tuple(c.stride) for c in convs]}"
    if len({c.dilation for c in convs}) > 1:
        return f"branch dilations differ: {[tuple(c.dilation) for c in convs]}"
    stride, dilation = tuple(convs[0].stride), tuple(convs[0].dilation)
    if identities and any(s != 1 for s in stride):
        return f"an identity branch cannot be summed with convs of stride {stride} (output sizes differ)"
    if len({c.weight.dtype for c in convs}) > 1 or len({c.weight.device for c in convs}) > 1:
        return "branch convs differ in dtype or device"
    paddings = [_spatial_padding(c) for c in convs]
    bad = [p for p in paddings if isinstance(p, str)]
    if bad:
        return bad[0]
    modes = {c.padding_mode for c, p in zip(convs, paddings) if any(p)}
    if len(modes) > 1:
        return f"padding modes differ: {sorted(modes)}"
    rank = len(stride)
    geo = [(tuple(c.kernel_size), p) for c, p in zip(convs, paddings)] + [((1,) * rank, (0,) * rank)] * len(identities)
    kernel = tuple(max(k[i] for k, _ in geo) for i in range(rank))
    try:
        aligned = {rm.aligned_padding(k, p, dilation, kernel) for k, p in geo}
    except ValueError as exc:
        return f"{exc}; leave such blocks or give them odd kernels"
    if len(aligned) > 1:
        given = ", ".join(f"k{k} p{p}" for k, p in geo)
        return (
            f"paddings do not put the kernels on one centre ({given}): a {kernel} kernel would need "
            f"{sorted(aligned)}; use padding = dilation * (k - 1) / 2 on every branch"
        )
    primary = max(convs, key=lambda c: math.prod(c.kernel_size))
    primary_name = next(b.conv for b in group if b.conv is not None and gm.get_submodule(b.conv) is primary)
    removed = {n for b in group for n in b.nodes}
    if any(n.op == "call_module" and n.target == primary_name and n not in removed for n in gm.graph.nodes):
        return f"conv '{primary_name}' is also called outside this block (shared weights): it cannot be replaced"
    return _MergePlan(
        kernel=kernel,
        stride=stride,
        padding=aligned.pop(),
        dilation=dilation,
        groups=math.gcd(*(c.groups for c in convs)),
        padding_mode=modes.pop() if modes else "zeros",
        primary=primary_name,
    )


def _branch_kernel(gm: fx.GraphModule, b: _Branch, channels: int, rank: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(weight, bias, groups)`` of one branch as a conv (float64)."""
    bn = gm.get_submodule(b.bn) if b.bn is not None else None
    if b.conv is not None:
        conv = gm.get_submodule(b.conv)
        if bn is None:
            return conv.weight.detach().double(), None if conv.bias is None else conv.bias.detach().double(), conv.groups
        w, bias = rm.fold_bn_into_branch(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        return w, bias, conv.groups
    if bn is None:
        return rm.identity_kernel(channels, (1,) * rank, groups=channels), None, channels
    a, c = bn_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    return rm.identity_kernel(channels, (1,) * rank, groups=channels, scale=a), c, channels


def _merge(gm: fx.GraphModule, group: list[_Branch], plan: _MergePlan) -> nn.Module:
    primary = gm.get_submodule(plan.primary)
    rank = len(plan.kernel)
    parts = [_branch_kernel(gm, b, primary.out_channels, rank) for b in group]
    w, b = rm.sum_branches(parts, plan.kernel, plan.groups)
    conv_type = type(primary)
    merged = conv_type(
        primary.in_channels,
        primary.out_channels,
        plan.kernel,
        stride=plan.stride,
        padding=plan.padding,
        dilation=plan.dilation,
        groups=plan.groups,
        bias=True,
        padding_mode=plan.padding_mode,
        device=primary.weight.device,
        dtype=primary.weight.dtype,
    )
    with torch.no_grad():
        merged.weight.copy_(w.to(primary.weight.dtype))
        merged.bias.copy_(b.to(primary.weight.dtype))
    merged.train(primary.training)
    return merged


def _check_eval(gm: fx.GraphModule) -> None:
    if (bn := training_batchnorm(gm)) is not None:
        raise ValueError(
            f"BatchNorm '{bn[0]}' is in training mode: its output depends on the batch, so its branch is not "
            "a fixed linear map. Call model.eval() before qfold.reparameterize(model)."
        )


def _rewrite_sum(gm: fx.GraphModule, root: fx.Node, merged: list[MergedBlock], left: list[LeftCandidate]) -> None:
    leaves, adds = _sum_tree(root)
    branches = [_branch(gm, leaf) for leaf in leaves]
    groups: dict[fx.Node, list[_Branch]] = {}
    for b in branches:
        groups.setdefault(b.source, []).append(b)
    tree = set(adds)
    replaced: dict[fx.Node, fx.Node] = {}  # source -> merged conv node reading it
    dead: list[fx.Node] = []
    for source, group in groups.items():
        if len(group) < 2 or not any(b.conv is not None for b in group):
            continue
        described = tuple(b.describe(gm) for b in group)
        plan = _merge_plan(gm, group, tree)
        if isinstance(plan, str):
            left.append(LeftCandidate(root.name, described, plan))
            continue
        conv = _merge(gm, group, plan)
        set_module(gm, plan.primary, conv)
        with gm.graph.inserting_before(root):
            node = gm.graph.call_module(plan.primary, (source,))
        replaced[source] = node
        dead.extend(n for b in group for n in b.nodes if n not in dead)
        merged.append(
            MergedBlock(root.name, plan.primary, described, tuple(conv.weight.shape), plan.stride, plan.padding, plan.groups)
        )
    if not replaced:
        return
    terms: list[fx.Node] = []  # kept leaves in order, each merged group once where its first branch was
    for b in branches:
        t = replaced.get(b.source, b.leaf)
        if t not in terms or t is b.leaf:
            terms.append(t)
    out = terms[0]
    with gm.graph.inserting_before(root):
        for t in terms[1:]:
            out = gm.graph.call_function(operator.add, (out, t))
    root.replace_all_uses_with(out)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(set(adds) | set(dead), key=order.__getitem__, reverse=True):
        gm.graph.erase_node(n)


def reparameterize(
    model: nn.Module, *, example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None
) -> tuple[fx.GraphModule, ReparamReport]:
    """Merge every sum of parallel branches linear in one input into a single conv with bias.

    The model is traced (:func:`qfold.capture.trace`) on a deep copy; ``model`` is never modified.
    Run it before BN folding: the BNs inside the merged branches are folded here.

    Args:
        model: an eval-mode FP32 module that torch.fx can trace.
        example_inputs: an input batch; when torch.fx cannot trace ``model`` it is captured with
            ``torch.export`` on it instead (valid for that input shape, any batch size; see
            :func:`qfold.capture.capture_info`).

    Returns:
        ``(graph_module, report)``: the re-parameterized model (outputs equal to ``model``'s up
        to float rounding) and a :class:`ReparamReport` of merged and left blocks.

    Raises:
        ValueError: a BatchNorm is in training mode (call ``model.eval()`` first).
        qfold.fx.UntraceableModelError: torch.fx cannot trace ``model`` (nor torch.export
            capture it on ``example_inputs``).
    """
    gm = trace(model, example_inputs=example_inputs)
    _check_eval(gm)
    merged: list[MergedBlock] = []
    left: list[LeftCandidate] = []
    roots = [n for n in gm.graph.nodes if _is_add(n) and not (len(n.users) == 1 and _is_add(next(iter(n.users))))]
    for root in roots:
        _rewrite_sum(gm, root, merged, left)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, ReparamReport(tuple(merged), tuple(left))
