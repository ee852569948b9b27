"""Bound activations: every ReLU becomes a ReLU6, by default without changing the function.

``bound_relu(model, calib_data)`` traces a copy of ``model``, finds every ReLU site (``nn.ReLU``,
``F.relu``, ``torch.relu``, ``Tensor.relu``, their in-place forms) and rewrites each into a
``call_module`` ``nn.ReLU6`` (existing ``F.relu6`` / ``F.hardtanh(x, 0, 6)`` / ``Hardtanh(0, 6)`` are
normalized the same way). In ``"preserve"`` mode the conv/linear layers writing into each ReLU
are rescaled per channel by ``s_c = 6/q_c`` and the layers reading from it by ``1/s_c`` (see
:mod:`qfold.bound_math`), so the ReLU6 cap sits at the ``quantile`` ``q_c`` of the real
activations and the network computes what it did before, up to that clipping.

Which tensors share a scale is found by a union-find over the graph: a ReLU site joins its input
and output, ops that commute with a positive per-channel scale (pooling, dropout, zero padding,
interpolation, spatial reductions) join their input and output, an ``add`` joins both inputs and
its output (a residual stream gets one shared scale). A group is *feasible* when every tensor in
it is written by a conv/linear (which absorbs ``s``) or by a joined op, and every reader is a
joined op, a conv/linear input (which absorbs ``1/s``), or a flatten/concat whose readers are.
Anything else (a model output, a non-linearity, a shared module, a model input feeding the
stream) makes that group fall back to the literal swap, and the report says why.

BatchNorm: one that ``qfold.fold_batchnorm`` would fold (right after a conv/linear feeding only it)
next to a group is an error: fold first. One that cannot be folded (after a concat or a pool, as
in pre-activation DenseNets) writing into a group absorbs ``s`` in its gamma and beta (exact);
one reading from a group cannot absorb ``1/s`` (``eps`` is not per channel), so that group falls back.
"""
from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from qfold import bound_math as bm
from qfold.graph import set_module, trace
from qfold.metrics import sqnr_db_from_energy

MODES = ("preserve", "swap")

_RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)
_INPLACE_FUNCS = (torch.relu_, F.relu_)
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
    torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate, torch.clone,
)  # fmt: skip
_TRANSPARENT_METHODS = ("contiguous", "clone", "detach")
_REDUCE = ((torch.mean, torch.sum, torch.amax), ("mean", "sum", "amax"))
_ADD = ((operator.add, operator.iadd, torch.add), ("add", "add_"))
_FLATTEN = ((torch.flatten, torch.reshape), ("flatten", "view", "reshape"))
_CAT = (torch.cat, torch.concat, torch.concatenate)
_SHAPE_METHODS = ("size", "dim")


class BoundError(ValueError):
    """``bound_relu`` cannot run as asked; the message names the cause and the fix."""


@dataclass(frozen=True)
class BoundConfig:
    """How ``bound_relu`` bounds activations.

    Attributes:
        mode: "preserve" (rescale so the function is kept; needs calibration data) or "swap"
            (literal ReLU -> ReLU6).
        quantile: per-channel quantile of the pre-activation that the cap of 6 is mapped to.
        bins: histogram bins per channel for the streaming quantile (a power of two).
        max_scale: upper bound of a channel scale (guards nearly dead channels).
        batch_size: rows per batch when ``calib_data`` is a single tensor.
    """

    mode: str = "preserve"
    quantile: float = 0.9999
    bins: int = 2048
    max_scale: float = 1e6
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {self.bins}")
        if not self.max_scale >= 1.0 or self.batch_size < 1:
            raise ValueError(f"need max_scale >= 1 and batch_size >= 1, got {self.max_scale}, {self.batch_size}")


@dataclass(frozen=True)
class SiteReport:
    """One ReLU site after bounding.

    Attributes:
        name: the site's node name in the traced graph of the input model.
        target: the module qualname or function it called.
        mode: "preserve" (rescaled, function kept up to the cap) or "swap" (literal ReLU6).
        reason: why a site fell back to "swap" ("" otherwise).
        group: sites with the same group share one per-channel scale (a residual stream).
        caps: per-channel cap in the original units (``6/s_c``); ``(6.0,)`` for a swapped site.
        above6_fp32: fraction of the unbounded model's pre-activations above 6 at this site.
        clipped: fraction of the bounded model's ReLU6 inputs above 6 (values changed by the cap).
    """

    name: str
    target: str
    mode: str
    reason: str = ""
    group: int | None = None
    caps: tuple[float, ...] = (bm.RELU6_CAP,)
    above6_fp32: float | None = None
    clipped: float | None = None


@dataclass(frozen=True)
class BoundReport:
    """What ``bound_relu`` did, and what it cost on the data given (None without data)."""

    mode: str
    quantile: float
    sites: tuple[SiteReport, ...]
    already_bounded: tuple[str, ...]
    samples: int
    output_sqnr_db: float | None
    top1_agreement: float | None

    @property
    def preserved(self) -> int:
        return sum(s.mode == "preserve" for s in self.sites)

    @property
    def swapped(self) -> int:
        return sum(s.mode == "swap" for s in self.sites)

    def to_dict(self) -> dict:
        """JSON-ready plain types (``caps`` as lists; an SQNR of identical outputs stays ``inf``)."""
        d = asdict(self)
        d["sites"] = [{**site, "caps": list(site["caps"])} for site in d["sites"]]
        d["already_bounded"] = list(self.already_bounded)
        return d

    def __str__(self) -> str:
        return self.to_markdown()

    def to_markdown(self) -> str:
        """A markdown table, one row per site, then the model-level numbers."""
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.3f}%"

        rows = ["| site | target | mode | group | cap min..max | >6 in FP32 | clipped by ReLU6 | note |", "|---|---|---|---|---|---|---|---|"]
        for s in self.sites:
            cap = f"{min(s.caps):.3g}..{max(s.caps):.3g}"
            rows.append(f"| {s.name} | {s.target} | {s.mode} | {'-' if s.group is None else s.group} | {cap} | {pct(s.above6_fp32)} | {pct(s.clipped)} | {s.reason} |")
        sq = "-" if self.output_sqnr_db is None else f"{self.output_sqnr_db:.2f} dB"
        rows.append(f"\nmode {self.mode}, quantile {self.quantile}, {self.samples} samples: output SQNR {sq}, top-1 agreement {pct(self.top1_agreement)}")
        return "\n".join(rows)


# ---------------------------------------------------------------- graph classification


def _fn_name(t: object) -> str:
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")


def _data(n: fx.Node) -> fx.Node:
    """The tensor an activation or layer node reads (its first argument, or ``input=``)."""
    return n.args[0] if n.args else n.kwargs["input"]


def _module(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _relu_site(gm: fx.GraphModule, n: fx.Node) -> bool | None:
    """None if ``n`` is not a ReLU; else whether it runs in place."""
    m = _module(gm, n)
    if m is not None:
        return m.inplace if type(m) is nn.ReLU else None
    if n.op == "call_function" and n.target in _RELU_FUNCS:
        return n.target in _INPLACE_FUNCS or bool(n.kwargs.get("inplace", False))
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return n.target == "relu_"
    return None


def _bounded_site(gm: fx.GraphModule, n: fx.Node) -> bool | None:
    """None if ``n`` is not already a ReLU6 / hardtanh(0, 6); else whether it runs in place."""
    m = _module(gm, n)
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
    m = _module(gm, n)
    if _relu_site(gm, n) is not None:
        return "site"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or (n.op == "call_function" and n.target is F.batch_norm):
        return "bn"
    if isinstance(m, _LAYERS):
        return "layer"
    if n.op == "call_method" and n.target in _SHAPE_METHODS or (n.op == "call_function" and n.target is getattr):
        return "shape"
    if isinstance(m, nn.modules.padding._ConstantPadNd):
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
    if _is(n, _ADD) and len(n.args) == 2 and not n.kwargs and len(ins) == 2 and all(isinstance(a, fx.Node) for a in n.args):
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


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return f"'{n.target}' ({type(_module(gm, n)).__name__})"
    if n.op == "call_function":
        return f"{_fn_name(n.target)}"
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    return {"placeholder": f"model input '{n.target}'", "output": "the model output", "get_attr": f"constant '{n.target}'"}.get(n.op, n.op)


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
        """A BatchNorm right after a conv/linear that feeds only it is foldable: it must be folded."""
        src = _data(bn)
        if isinstance(src, fx.Node) and kinds[src.name] == "layer" and len(src.users) == 1:
            raise BoundError(
                f"BatchNorm {_describe(gm, bn)} (after '{src.target}') is still unfolded next to the ReLU group of "
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
                m = _module(gm, n)
                if m is None or not m.affine or calls[n.target] > 1:
                    fail([g], f"BatchNorm {_describe(gm, n)} has no per-call affine parameters to absorb the scale")
                else:
                    producers[g].append(n.target)
            elif k == "layer":
                m = _module(gm, n)
                if calls[n.target] > 1:
                    fail([g], f"module '{n.target}' is called {calls[n.target]} times, so its weights cannot be rescaled for one call")
                elif isinstance(m, nn.Linear) and len(shp) != 2:
                    fail([g], f"Linear '{n.target}' output is not 2-D (channel axis is not 1)")
                producers[g].append(n.target)
            elif k not in ("site", "transparent", "add"):
                fail([g], f"'{name}' is computed by {_describe(gm, n)}, which cannot absorb a per-channel scale")
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
                m, shp = _module(gm, u), shapes[n.name]
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
            fail(gids, f"'{n.name}' is read by {_describe(gm, u)}, which cannot absorb the inverse scale")
    for g in range(len(groups)):
        groups[g].producers = tuple(producers[g])
    return groups, group_of, consumers


# ---------------------------------------------------------------- data passes


class _Watch(fx.Interpreter):
    """Runs a GraphModule node by node, handing each watched node's input to a callback."""

    def __init__(self, gm: fx.GraphModule, watch: dict, shapes: dict | None = None) -> None:
        super().__init__(gm)
        self.watch, self.shapes = watch, shapes

    def run_node(self, n: fx.Node):
        if n.name in self.watch:
            self.watch[n.name](self.env[_data(n)])  # before an in-place op overwrites it
        out = super().run_node(n)
        if self.shapes is not None:
            self.shapes[n.name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside the block; every module's training flag restored after."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, f in flags:
            m.training = f


def _batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.ndim < 1 or data.shape[0] == 0:
            raise BoundError(f"calib_data tensor must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    if iter(data) is data:
        raise BoundError("calib_data is a one-shot iterator, but bound_relu reads it twice (statistics, then the report); pass a tensor, a list of tensors or a DataLoader")
    first = None
    for n, b in enumerate(data):
        if not isinstance(b, torch.Tensor):
            raise BoundError(f"calib_data must yield input tensors, got {type(b).__name__}; for (input, label) pairs pass [x for x, _ in loader]")
        if first is None:
            first = tuple(b.shape[1:])
        elif tuple(b.shape[1:]) != first:
            raise BoundError(f"calib_data batch {n} has shape {tuple(b.shape)}, earlier batches (N, {', '.join(map(str, first))}); all batches must share one input shape")
        yield b
    if first is None:
        raise BoundError("calib_data is empty; pass at least one batch")


def _shapes(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, tuple | None]:
    shapes: dict[str, tuple | None] = {}
    try:
        _Watch(gm, {}, shapes).run(x)
    except Exception as exc:
        raise BoundError(
            f"calib_data batch of shape {tuple(x.shape)} does not fit the model ({type(exc).__name__}: {exc}); "
            "pass batches shaped like the model's input, e.g. (N, C, H, W)"
        ) from exc
    return shapes


# ---------------------------------------------------------------- the pass


def _rewrite_to_relu6(gm: fx.GraphModule, names: dict[str, bool]) -> dict[str, str]:
    """Every node in ``names`` (name -> in place) becomes a call to an ``nn.ReLU6`` submodule."""
    nodes = {n.name: n for n in gm.graph.nodes}
    new_names, k = {}, 0
    for name, inplace in names.items():
        n = nodes[name]
        if n.op == "call_module":
            if type(gm.get_submodule(n.target)) is not nn.ReLU6:
                set_module(gm, n.target, nn.ReLU6(inplace=inplace))
            new_names[name] = name
            continue
        while hasattr(gm, f"relu6_{k}"):
            k += 1
        gm.add_submodule(f"relu6_{k}", nn.ReLU6(inplace=inplace))
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(f"relu6_{k}", (_data(n),))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        new_names[name] = new.name
    gm.graph.lint()
    gm.recompile()
    return new_names


def bound_relu(
    model: nn.Module,
    calib_data: torch.Tensor | Iterable[torch.Tensor] | None = None,
    *,
    mode: str = "preserve",
    quantile: float = 0.9999,
    config: BoundConfig | None = None,
) -> tuple[fx.GraphModule, BoundReport]:
    """Replace every ReLU of ``model`` with ReLU6 and say what that cost.

    Args:
        model: an FP32 model, BatchNorms already folded (``qfold.fold_batchnorm``); not modified.
        calib_data: input batches (an iterable of tensors that can be read twice, or one tensor,
            split into ``config.batch_size`` rows). Required for "preserve"; with "swap" it only
            feeds the report.
        mode, quantile: shorthands for ``BoundConfig(mode=..., quantile=...)``.
        config: the full configuration; do not combine with non-default ``mode``/``quantile``.

    Returns:
        ``(bounded, report)``: a new GraphModule whose ReLU sites are ``nn.ReLU6`` modules (and
        whose conv/linear weights are rescaled in "preserve" mode), and a :class:`BoundReport`.

    Raises:
        BoundError: "preserve" without data; data of the wrong shape or type; a BatchNorm where
            the rescale would need it folded.
    """
    if config is None:
        config = BoundConfig(mode=mode, quantile=quantile)
    elif (mode, quantile) != ("preserve", 0.9999) and (mode, quantile) != (config.mode, config.quantile):
        raise BoundError("pass either config=BoundConfig(...) or mode/quantile, not both")
    if config.mode == "preserve" and calib_data is None:
        raise BoundError("mode='preserve' needs calib_data (a few hundred representative inputs) to place the caps; pass it, or use mode='swap' for the literal ReLU -> ReLU6 replacement")
    gm = trace(model)
    graph_nodes = list(gm.graph.nodes)
    sites = {n.name: ip for n in graph_nodes if (ip := _relu_site(gm, n)) is not None}
    bounded = {n.name: ip for n in graph_nodes if (ip := _bounded_site(gm, n)) is not None}
    target = {n.name: n.target if n.op == "call_module" else _fn_name(n.target) for n in graph_nodes}
    batches = (lambda: _batches(calib_data, config.batch_size)) if calib_data is not None else None

    scales: dict[int, torch.Tensor] = {}
    groups, group_of, consumers = [], {}, {}
    if config.mode == "preserve" and sites:
        with _eval_mode(gm):
            shapes = _shapes(gm, next(iter(batches())))
            groups, group_of, consumers = _plan(gm, shapes, list(sites))
            live = [s for s in sites if not groups[group_of[s]].reason]
            hists = {s: bm.hist_empty(shapes[s][1], config.bins) for s in live}

            def updater(s: str):
                def upd(x: torch.Tensor) -> None:
                    hists[s] = bm.hist_update(hists[s], bm.channels_first(x))
                return upd

            watch = {s: updater(s) for s in live}
            for x in batches():
                _Watch(gm, watch).run(x)
        for g, grp in enumerate(groups):
            if not grp.reason:
                q = torch.stack([bm.hist_quantile(hists[s], config.quantile) for s in grp.sites]).amax(dim=0)
                scales[g] = bm.relu6_scales(q, max_scale=config.max_scale)

    bgm = copy.deepcopy(gm)
    todo: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"out_scale": s, "in_scale": s}, applied once
    for g, s in scales.items():
        for p in groups[g].producers:
            todo.setdefault(p, {})["out_scale"] = s
    for c, segs in consumers.items():
        if any(g in scales for g, _ in segs):
            parts = [scales[g][idx] if g in scales else torch.ones(len(idx), dtype=torch.float64) for g, idx in segs]
            todo.setdefault(c, {})["in_scale"] = torch.cat(parts)
    for name, kw in todo.items():
        _rescale(bgm.get_submodule(name), **kw)
    new_names = _rewrite_to_relu6(bgm, {**sites, **bounded})

    above, clipped, samples, sqnr, agree = {}, {}, 0, None, None
    if batches is not None:
        above, clipped, samples, sqnr, agree = _measure(gm, bgm, batches, sites, new_names)
    reports = []
    for s in sites:
        g = group_of.get(s)
        preserved = g is not None and g in scales
        reason = "" if preserved or config.mode == "swap" else (groups[g].reason if g is not None else "")
        caps = tuple((bm.RELU6_CAP / scales[g]).tolist()) if preserved else (bm.RELU6_CAP,)
        reports.append(SiteReport(s, str(target[s]), "preserve" if preserved else "swap", reason, g if preserved else None, caps, above.get(s), clipped.get(s)))
    report = BoundReport(config.mode, config.quantile, tuple(reports), tuple(bounded), samples, sqnr, agree)
    return bgm, report


def _rescale(m: nn.Module, *, out_scale: torch.Tensor | None = None, in_scale: torch.Tensor | None = None) -> None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # a producer only: gamma and beta times s
        with torch.no_grad():
            for p in (m.weight, m.bias):
                p.copy_((p.detach().double() * out_scale).to(p.dtype))
        return
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    w, b = bm.rescale_weight(m.weight, m.bias, out_scale=out_scale, in_scale=in_scale, groups=getattr(m, "groups", 1), transposed=transposed)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)


def _measure(gm, bgm, batches, sites, new_names):
    """Stream the data through both models: fraction > 6 per site, output SQNR, top-1 agreement."""
    over = dict.fromkeys(sites, 0)
    clip = dict.fromkeys(sites, 0)
    total = dict.fromkeys(sites, 0)

    def count(store: dict, s: str, with_total: bool):
        def fn(x: torch.Tensor) -> None:
            store[s] += int((x > bm.RELU6_CAP).sum())
            if with_total:
                total[s] += x.numel()
        return fn

    ref_watch = {s: count(over, s, True) for s in sites}
    b_watch = {new_names[s]: count(clip, s, False) for s in sites}
    signal = noise = 0.0
    same = rows = samples = 0
    top1 = True
    with _eval_mode(gm, bgm):
        for i, x in enumerate(batches()):
            if i == 0:
                _shapes(gm, x)  # a clear error for data of the wrong shape
            ref = [t for t in tree_leaves(_Watch(gm, ref_watch).run(x)) if isinstance(t, torch.Tensor)]
            out = [t for t in tree_leaves(_Watch(bgm, b_watch).run(x)) if isinstance(t, torch.Tensor)]
            samples += x.shape[0]
            for r, o in zip(ref, out):
                r, o = r.double(), o.double()
                signal += float((r * r).sum())
                noise += float(((r - o) ** 2).sum())
            top1 = top1 and bool(ref) and ref[0].ndim == 2
            if top1:
                same += int((ref[0].argmax(dim=1) == out[0].argmax(dim=1)).sum())
                rows += ref[0].shape[0]
    above = {s: over[s] / total[s] if total[s] else 0.0 for s in sites}
    clipped = {s: clip[s] / total[s] if total[s] else 0.0 for s in sites}
    agree = same / rows if top1 and rows else None
    return above, clipped, samples, sqnr_db_from_energy(signal, noise), agree
