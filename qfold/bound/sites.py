"""Graph classification and planning for :func:`qfold.bound.bound_relu`.

Holds what the pass decides from the traced graph alone (plus traced shapes): which nodes are
ReLU sites or already-bounded ReLU6/hardtanh(0, 6) sites, what each node does to a per-channel
scale (``_kind``), the union-find that groups tensors sharing one scale, and ``_plan``, which finds
each group's producers (conv/linear or unfoldable BatchNorm that absorb ``s``), each consumer's
input-scale recipe (which absorbs ``1/s``) and why a group must fall back to the literal swap.
Also :class:`BoundError`, which planning raises for a BatchNorm that should have been folded.
Applying the plan (statistics, rescale, rewrite, report) stays in :mod:`qfold.bound`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qfold.errors import BoundError
from qfold.fx import BATCH_NORM, CONSTANT_PAD, describe, is_add, module_of, relu_site

__all__ = ["BoundError"]


_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TRANSPARENT_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity, nn.Upsample,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)  # fmt: skip
_TRANSPARENT_FUNCS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, torch.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate, torch.clone,
)  # fmt: skip
_TRANSPARENT_METHODS = ("contiguous", "clone", "detach")
_REDUCE = ((torch.mean, torch.sum, torch.amax), ("mean", "sum", "amax"))
_FLATTEN = ((torch.flatten, torch.reshape), ("flatten", "view", "reshape"))
_CAT = (torch.cat, torch.concat, torch.concatenate)
_SHAPE_METHODS = ("size", "dim")


# ---------------------------------------------------------------- graph classification


def _data(n: fx.Node) -> fx.Node:
    """The tensor an activation or layer node reads (its first argument, or ``input=``)."""
    return n.args[0] if n.args else n.kwargs["input"]


def _bounded_site(gm: fx.GraphModule, n: fx.Node) -> bool | None:
    """None if ``n`` is not already a ReLU6 / hardtanh(0, 6); else whether it runs in place."""
    m = module_of(gm, n)
    if m is not None:
        return m.inplace if isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0) else None
    if n.op != "call_function":
        return None
    if n.target is F.relu6:
        return bool(n.kwargs.get("inplace", n.args[1] if len(n.args) > 1 else False))
    if n.target is F.hardtanh:
        a = list(n.args[1:]) + [None] * 3
        lo, hi = n.kwargs.get("min_val", a[0] if a[0] is not None else -1.0), n.kwargs.get("max_val", a[1] if a[1] is not None else 1.0)
        return bool(n.kwargs.get("inplace", a[2] or False)) if (lo, hi) == (0.0, 6.0) else None
    return None


def _is(n: fx.Node, table: tuple[tuple, tuple]) -> bool:
    funcs, methods = table
    return (n.op == "call_function" and n.target in funcs) or (n.op == "call_method" and n.target in methods)


def _kind(gm: fx.GraphModule, n: fx.Node, shapes: dict[str, tuple | None]) -> str:
    """What ``n`` does to a per-channel scale on its (first) input; see the module docstring."""
    shp = shapes.get(n.name)
    ins = [a for a in n.all_input_nodes]
    in0 = shapes.get(n.args[0].name) if n.args and isinstance(n.args[0], fx.Node) else None
    keeps_c = shp is not None and in0 is not None and len(shp) == len(in0) >= 2 and shp[1] == in0[1]
    m = module_of(gm, n)
    if relu_site(gm, n) is not None:
        return "site"
    if isinstance(m, BATCH_NORM) or (n.op == "call_function" and n.target is F.batch_norm):
        return "bn"
    if isinstance(m, _LAYERS):
        return "layer"
    if n.op == "call_method" and n.target in _SHAPE_METHODS or (n.op == "call_function" and n.target is getattr):
        return "shape"
    if isinstance(m, CONSTANT_PAD):
        return "transparent" if keeps_c and m.value == 0 else "other"
    if n.op == "call_function" and n.target is F.pad:
        value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None)
        return "transparent" if keeps_c and not value else "other"
    if isinstance(m, _TRANSPARENT_MODULES) or (n.op == "call_function" and n.target in _TRANSPARENT_FUNCS) or (
        n.op == "call_method" and n.target in _TRANSPARENT_METHODS
    ):
        return "transparent" if keeps_c else "other"
    if _is(n, _REDUCE) and keeps_c:
        dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else dims
        if isinstance(dims, (tuple, list)) and all(isinstance(d, int) and d % len(in0) not in (0, 1) for d in dims):
            return "transparent"
        return "other"
    if is_add(n) and len(n.args) == 2 and not n.kwargs and len(ins) == 2 and all(isinstance(a, fx.Node) for a in n.args):
        cs = [shapes.get(a.name) for a in n.args] + [shp]
        ok = all(c is not None and len(c) >= 2 and c[1] == shp[1] for c in cs)
        return "add" if ok else "other"
    if isinstance(m, nn.Flatten) or _is(n, _FLATTEN):
        if shp is not None and in0 is not None and len(in0) >= 2 and len(shp) == 2 and shp[0] == in0[0] and shp[1] == math.prod(in0[1:]):
            return "flatten"
        return "other"
    if n.op == "call_function" and n.target in _CAT:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        return "cat" if shp is not None and len(shp) >= 2 and dim % len(shp) == 1 else "other"
    return "other"


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Group:
    sites: list[str]
    channels: int
    reason: str = ""
    producers: tuple[str, ...] = ()


def _plan(gm: fx.GraphModule, shapes: dict[str, tuple | None], sites: list[str]):
    """Groups of sites sharing a scale, their producers, and each consumer's input-scale recipe.

    Returns ``(groups, group_of_node, consumers)``: ``consumers[module] = [(group or None, idx)]``
    segments, concatenated along the module's input channels.
    """
    nodes = list(gm.graph.nodes)
    kinds = {n.name: _kind(gm, n, shapes) for n in nodes}
    calls: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    uf = _UnionFind()
    for n in nodes:
        if kinds[n.name] in ("site", "transparent"):
            uf.union(n.name, _data(n).name)
        elif kinds[n.name] == "add":
            for a in n.args:
                uf.union(n.name, a.name)
    roots: dict[str, int] = {}
    for s in sites:
        roots.setdefault(uf.find(s), len(roots))
    group_of = {n.name: roots[uf.find(n.name)] for n in nodes if uf.find(n.name) in roots}
    groups = [_Group([s for s in sites if group_of[s] == g], 0) for g in range(len(roots))]
    producers: dict[int, list[str]] = {g: [] for g in range(len(groups))}

    def fail(gids: Iterable[int], why: str) -> None:
        for g in gids:
            if not groups[g].reason:
                groups[g].reason = why

    def check_fold(bn: fx.Node, n: fx.Node) -> None:
        """A BatchNorm right after a conv/linear that feeds only it (and is called once) is foldable: it must be folded.

        A layer module called several times (a reused conv) cannot take a BatchNorm of one call.
        """
        src = _data(bn)
        if isinstance(src, fx.Node) and kinds[src.name] == "layer" and len(src.users) == 1 and calls[src.target] == 1:
            raise BoundError(
                f"BatchNorm {describe(gm, bn)} (after '{src.target}') is still unfolded next to the ReLU group of "
                f"'{n.name}'; the rescale needs it folded into '{src.target}'. Run qfold.fold_batchnorm(model) before bound_relu."
            )

    expr: dict[str, list[tuple[int | None, torch.Tensor]]] = {}
    for n in nodes:  # topological order
        k, name = kinds[n.name], n.name
        if name in group_of:
            g, shp = group_of[name], shapes.get(name)
            if shp is None or len(shp) < 2:
                fail([g], f"'{name}' is not a batched tensor with a channel axis")
                continue
            groups[g].channels = groups[g].channels or shp[1]
            if shp[1] != groups[g].channels:
                fail([g], f"'{name}' has {shp[1]} channels, its group {groups[g].channels}")
            expr[name] = [(g, torch.arange(shp[1]))]
            if k == "bn":  # an unfoldable BN (after a concat, say) absorbs s in gamma and beta
                check_fold(n, n)
                m = module_of(gm, n)
                if m is None or not m.affine or calls[n.target] > 1:
                    fail([g], f"BatchNorm {describe(gm, n)} has no per-call affine parameters to absorb the scale")
                else:
                    producers[g].append(n.target)
            elif k == "layer":
                m = module_of(gm, n)
                if calls[n.target] > 1:
                    fail([g], f"module '{n.target}' is called {calls[n.target]} times, so its weights cannot be rescaled for one call")
                elif isinstance(m, nn.Linear) and len(shp) != 2:
                    fail([g], f"Linear '{n.target}' output is not 2-D (channel axis is not 1)")
                producers[g].append(n.target)
            elif k not in ("site", "transparent", "add"):
                fail([g], f"'{name}' is computed by {describe(gm, n)}, which cannot absorb a per-channel scale")
        elif k == "transparent" and n.args[0].name in expr:
            expr[name] = expr[n.args[0].name]
        elif k == "flatten" and n.args[0].name in expr:
            rep = math.prod(shapes[n.args[0].name][2:])
            expr[name] = [(g, idx.repeat_interleave(rep)) for g, idx in expr[n.args[0].name]]
        elif k == "cat" and any(a.name in expr for a in n.all_input_nodes):
            parts = n.args[0] if n.args else n.kwargs["tensors"]
            expr[name] = [seg for a in parts for seg in (expr.get(a.name) or [(None, torch.arange(shapes[a.name][1]))])]

    consumers: dict[str, list[tuple[int | None, torch.Tensor]]] = {}
    for n in nodes:
        if n.name not in expr:
            continue
        gids = {g for g, _ in expr[n.name] if g is not None}
        for u in n.users:
            ku = kinds[u.name]
            if n.name in group_of and group_of.get(u.name) == group_of[n.name] and ku in ("site", "transparent", "add"):
                continue
            if u.name in expr and u.name not in group_of and ku in ("transparent", "flatten", "cat"):
                continue
            if ku == "shape":
                continue
            if ku == "bn" and gids:  # BN(s*x) != BN(x) because of eps: not absorbable
                check_fold(u, n)
            if ku == "layer" and u.args[0] is n and n not in list(u.args[1:]) + list(u.kwargs.values()):
                m, shp = module_of(gm, u), shapes[n.name]
                c_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
                if calls[u.target] > 1:
                    fail(gids, f"module '{u.target}' is called {calls[u.target]} times, so its weights cannot be rescaled for one call")
                elif isinstance(m, nn.Linear) and len(shp) != 2:
                    fail(gids, f"Linear '{u.target}' reads a tensor that is not 2-D")
                elif sum(len(i) for _, i in expr[n.name]) != c_in:
                    fail(gids, f"'{u.target}' reads {c_in} channels, the tensor has another layout")
                else:
                    consumers[u.target] = expr[n.name]
                continue
            fail(gids, f"'{n.name}' is read by {describe(gm, u)}, which cannot absorb the inverse scale")
    for g in range(len(groups)):
        groups[g].producers = tuple(producers[g])
    return groups, group_of, consumers
