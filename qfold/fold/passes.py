"""Exact BatchNorm folding: the graph pass and its legality rules.

:func:`fold_batchnorm` traces a copy of the model with torch.fx, finds every eval-mode
BatchNorm (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, "frozen" BatchNorms recognised by
their structure and behaviour, and ``F.batch_norm`` calls on module attributes) and folds each
one into an adjacent layer when the result is exactly the same function:

* after a layer (``bn(layer(x))``): Conv1d/2d/3d, ConvTranspose1d/2d/3d (output-channel axis 1,
  group by group), Linear (2-D input, or a 3-D input through ``transpose(1, 2)`` /
  ``permute(0, 2, 1)``), when the layer's output feeds nothing but the BN;
* before a layer (``layer(bn(x))``): Conv1d/2d/3d without padding, and Linear, when the BN's
  output feeds nothing but that layer;
* after ``Linear(x).flatten(0, -2)`` (LeViT's ``LinearNorm``) and after a channel
  ``torch.cat`` of convs (each conv absorbs its slice: MixNet's mixed-kernel conv).

Reads of a tensor's metadata (``.shape``, ``.ndim``, ``.size()``, ``.dtype``, ``.device``,
``reshape_as``) are not consumers. A BatchNorm + activation module (timm's ``BatchNormAct2d`` /
``FrozenBatchNormAct2d``) keeps its activation: it becomes a
:class:`~qfold.fold.sites.FoldedNormAct` of its children. A model fx cannot trace is captured with
``torch.export`` when ``example_inputs`` are given (the report's ``capture`` / ``valid_for``).

Everything else is left in place and the :class:`~qfold.fold.report.FoldReport` says why. The
arithmetic is :mod:`qfold.fold.formulas` (float64, cast back to the layer's dtype). A model fx cannot
trace is folded piece by piece: the failing submodule becomes a leaf and is folded on its own.

What counts as a BatchNorm, and where one is called, is :mod:`qfold.fold.sites`.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from qfold.capture import capture_info, trace
from qfold.capture.keep_attrs import SOURCE_CLASS, keep_interface
from qfold.errors import FoldError, UntraceableModelError
from qfold.fold.formulas import bn_affine, fold_affine_after, fold_affine_before
from qfold.fold.report import FoldEntry, FoldReport
from qfold.fold.sites import (
    FoldedNormAct,
    _bn_like,
    _frozen_stats,
    _Site,
    _site,
    _Stats,
)
from qfold.fx import (
    BATCH_NORM,
    call_counts,
    data_users,
    describe,
    set_module,
    training_batchnorm,
)

__all__ = ["FoldEntry", "FoldError", "FoldReport", "fold_batchnorm"]


# Pattern tables. BN after a layer: the weight axis that indexes output channels.
_AFTER_AXIS: dict[type[nn.Module], int] = {
    nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0,
    nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1,
    nn.Linear: 0,
}  # fmt: skip
# BN before a layer: exact only when the layer never sees padding (checked separately for convs).
_BEFORE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NOTE_2D = "assumed a 2-D (N, features) input; pass example_inputs to check"


def fold_batchnorm(
    model: nn.Module,
    *,
    strict: bool = False,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm of ``model`` that can be folded exactly; never modifies ``model``.

    Args:
        model: an eval-mode model (every BatchNorm must have ``training == False``).
        strict: raise :class:`FoldError` when any BatchNorm is left.
        example_inputs: optional inputs; when given, tensor ranks are propagated so that
            ``Linear -> BatchNorm1d`` folds only when the Linear really sees a 2-D input
            (without them the fold assumes so and the report's ``note`` says it).

    Returns:
        ``(folded, report)``: a new module in eval mode (a ``torch.fx.GraphModule`` when fx traced
        it) whose folded BatchNorms are gone and whose layers carry the folded weight and bias
        (a bias is created where the layer had none), and the :class:`FoldReport`.

    Raises:
        FoldError: a BatchNorm is in training mode, a lazy module is not materialised, or
            ``strict`` and some BatchNorm was left.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm expects an nn.Module, got {type(model).__name__}")
    _check_model(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    folded, keyed = _fold_any(model, "", tuple(example_inputs) if example_inputs is not None else None)
    info = capture_info(folded)
    report = FoldReport(tuple(e for _, e in sorted(keyed, key=lambda ke: ke[0])), info["method"], info["valid_for"])
    if strict and report.left:
        lines = "; ".join(f"'{e.bn}': {e.reason}" for e in report.left)
        raise FoldError(f"strict=True and {len(report.left)} BatchNorm(s) were left: {lines}")
    return folded.eval(), report


# ----------------------------------------------------------------------------- model checks
def _check_model(model: nn.Module) -> None:
    if (bn := training_batchnorm(model)) is not None:
        raise FoldError(
            f"BatchNorm '{bn[0] or '<root>'}' ({type(bn[1]).__name__}) is in training mode: folding uses its "
            "running statistics, which only eval mode applies. Call model.eval() before fold_batchnorm(model)."
        )
    for name, m in model.named_modules():
        lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
        if any(isinstance(t, lazy) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]):
            raise FoldError(
                f"module '{name or '<root>'}' ({type(m).__name__}) is a lazy module that is not materialised yet: "
                "run one forward pass on a sample input before fold_batchnorm(model)."
            )



# ----------------------------------------------------------------------------- tracing
def _fold_any(
    model: nn.Module, prefix: str, example_inputs: tuple[torch.Tensor, ...] | None
) -> tuple[nn.Module, list[tuple[tuple[int, ...], FoldEntry]]]:
    """Fold ``model`` (trace it, making untraceable submodules leaves); entries keyed by graph order."""
    frozen = {n for n, m in model.named_modules() if n and not isinstance(m, BATCH_NORM) and _bn_like(m)}
    leaves: set[str] = set()
    while True:
        try:
            gm = trace(model, leaf_names=frozen | leaves)
            break
        except UntraceableModelError as exc:
            if example_inputs is not None and not leaves:  # whole-model capture by torch.export, if it works
                exported = _export_capture(model, example_inputs)
                if exported is not None:
                    return exported, _fold_graph(exported, prefix, set(), _ranks(exported, example_inputs))
            where = exc.module_name
            if not where or where in leaves:
                return _fold_children(model, prefix, exc)
            leaves.add(where)
    ranks = _ranks(gm, example_inputs) if example_inputs is not None else {}
    order = {n.target: i for i, n in reversed(list(enumerate(gm.graph.nodes))) if n.op == "call_module"}
    keyed = _fold_graph(gm, prefix, frozen, ranks)
    for leaf in sorted(leaves):
        sub, sub_keyed = _fold_any(gm.get_submodule(leaf), f"{prefix}{leaf}.", None)
        set_module(gm, leaf, sub)
        keyed += [((order.get(leaf, 1 << 30), *k), e) for k, e in sub_keyed]
    return gm, keyed


class _AnyRankBN(BATCH_NORM):
    """An eval-mode BatchNorm over dim 1 of any rank: stands in for a frozen BatchNorm before export."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return None


class _BNThenChildren(_AnyRankBN):
    """A frozen BatchNorm + activation before export: the BN, then the children in order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        for child in self.children():
            x = child(x)
        return x


def _export_capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule | None:
    """``model`` captured by torch.export (frozen BNs turned into BatchNorms first), or None if that fails."""
    from qfold.capture.exported import capture

    ready = copy.deepcopy(model)
    for name, m in list(ready.named_modules()):
        if not name or isinstance(m, BATCH_NORM) or not _bn_like(m):
            continue
        kids = dict(m.named_children())
        st = _frozen_stats(m, allow_children=bool(kids))
        bn = (_BNThenChildren if kids else _AnyRankBN)(st.mean.numel(), eps=st.eps, affine=True)
        bn = bn.to(device=st.mean.device, dtype=st.mean.dtype).eval()
        with torch.no_grad():
            bn.running_mean.copy_(st.mean)
            bn.running_var.copy_(st.var)
            bn.weight.copy_(st.gamma if st.gamma is not None else torch.ones_like(st.mean))
            bn.bias.copy_(st.beta if st.beta is not None else torch.zeros_like(st.mean))
        for k, child in kids.items():
            bn.add_module(k, child)
        set_module(ready, name, bn)
    try:
        gm = capture(ready, example_inputs)
    except ValueError:
        return None
    return keep_interface(gm, model)


def _fold_children(
    model: nn.Module, prefix: str, exc: UntraceableModelError
) -> tuple[nn.Module, list[tuple[tuple[int, ...], FoldEntry]]]:
    """``model``'s own forward is untraceable: fold inside its children, report its direct BNs."""
    out = copy.deepcopy(model)
    owner = prefix[:-1] or "<root>"
    keyed: list[tuple[tuple[int, ...], FoldEntry]] = []
    for i, (name, child) in enumerate(list(out.named_children())):
        if _bn_like(child):
            why = (
                f"its parent '{owner}' ({type(model).__name__}) cannot be traced by torch.fx "
                f"({type(exc.__cause__ or exc).__name__}), so the layer feeding it is unknown: make "
                f"{type(model).__name__}.forward traceable, or put the layer and its BatchNorm in an nn.Sequential"
            )
            keyed.append(((i,), FoldEntry(f"{prefix}{name}", type(child).__name__, "left", reason=why)))
        elif any(_bn_like(m) for m in child.modules()):
            sub, sub_keyed = _fold_any(child, f"{prefix}{name}.", None)
            setattr(out, name, sub)
            keyed += [((i, *k), e) for k, e in sub_keyed]
    return out, keyed


def _ranks(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, int]:
    """The rank of every tensor-valued node, from one eval-mode run on ``example_inputs``."""
    ranks: dict[fx.Node, int] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                ranks[n] = out.ndim
            return out

    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _Recorder(gm).run(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return ranks


# ----------------------------------------------------------------------------- the pass
def _fold_graph(
    gm: fx.GraphModule, prefix: str, frozen: set[str], ranks: dict[fx.Node, int]
) -> list[tuple[tuple[int, ...], FoldEntry]]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done: dict[fx.Node, FoldEntry] = {}
    left: dict[fx.Node, FoldEntry] = {}
    changed = True
    while changed:  # a fold can make another legal (bn -> bn -> conv), so repeat until nothing moves
        changed = False
        left = {}
        calls = call_counts(gm)
        read = {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
        for node in list(gm.graph.nodes):
            site = _site(gm, node, prefix, frozen)
            if site is None:
                continue
            plan, why, note = _fold_target(gm, site, calls, read, ranks)
            if plan is None:
                left[node] = FoldEntry(site.name, site.kind, "left", reason=why)
                continue
            direction, layer_node = plan
            into = "+".join(f"{prefix}{p.target}" for p in _pieces(layer_node))
            _apply(gm, site, direction, layer_node)
            done[node] = FoldEntry(site.name, site.kind, "folded", into, direction, note=note)
            changed = True
    gm.recompile()
    entries = sorted({**done, **left}.items(), key=lambda ne: order[ne[0]])
    seen = Counter(e.bn for _, e in entries)
    calls_so_far: Counter = Counter()
    keyed = []
    for n, e in entries:  # a BN module called at several places gets one entry per call
        if seen[e.bn] > 1:
            calls_so_far[e.bn] += 1
            e = dataclasses.replace(e, bn=f"{e.bn} (call {calls_so_far[e.bn]})")
        keyed.append(((order[n],), e))
    return keyed


def _layer_base(m: nn.Module, types: Sequence[type[nn.Module]]) -> type[nn.Module] | None:
    """The table type ``m`` is, if its forward is that type's own (a custom forward may not be linear)."""
    for base in types:
        if isinstance(m, base):
            same = type(m).forward is base.forward
            same = same and getattr(type(m), "_conv_forward", None) is getattr(base, "_conv_forward", None)
            return base if same else None
    return None


def _pads(conv: nn.Module) -> bool:
    if isinstance(conv, nn.Linear):
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    return any(p != 0 for p in conv.padding)


def _is_swap12(node: fx.Node) -> bool:
    """``x.transpose(1, 2)`` / ``torch.transpose(x, 1, 2)`` / ``x.permute(0, 2, 1)``."""
    if node.op not in ("call_method", "call_function") or node.kwargs:
        return False
    t = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    rest = list(node.args[1:])
    if t == "permute" and len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return (t == "transpose" and sorted(rest) == [1, 2]) or (t == "permute" and rest == [0, 2, 1])


def _flatten_to_2d(node: fx.Node, ranks: dict[fx.Node, int]) -> bool | None:
    """For ``x.flatten(0, e)`` / ``torch.flatten(x, 0, e)``: True when it gives a 2-D ``(N, x.shape[-1])``
    tensor (``e == -2``, or ``e == rank - 2``; a 3-D ``x`` is assumed when its rank is unknown and
    ``e == 1``), False when it is some other flatten, None when ``node`` is not a flatten from dim 0."""
    t = node.target if node.op == "call_method" else getattr(node.target, "__name__", None) if node.op == "call_function" else None
    if t != "flatten" or node.kwargs or len(node.args) != 3 or not isinstance(node.args[0], fx.Node) or node.args[1] != 0:
        return None
    end, rank = node.args[2], ranks.get(node.args[0])
    if not isinstance(end, int):
        return False
    return end == -2 or (rank is not None and end == rank - 2) or (rank is None and end == 1)


def _fold_target(
    gm: fx.GraphModule, site: _Site, calls: Counter, read: set[str], ranks: dict[fx.Node, int]
) -> tuple[tuple[str, fx.Node] | None, str, str]:
    """``((direction, layer_node), "", note)`` for a legal fold, else ``(None, reason, "")``."""
    if site.stats is None:
        return None, site.why_not, ""
    bad = _stats_problem(site.stats)
    if bad:
        return None, bad, ""
    after, why_after, note_a = _plan_after(gm, site, calls, read, ranks)
    if after is not None:
        return ("after", after), "", note_a
    before, why_before, note_b = _plan_before(gm, site, calls, read, ranks)
    if before is not None:
        return ("before", before), "", note_b
    return None, f"after: {why_after}; before: {why_before}", ""


def _stats_problem(st: _Stats) -> str:
    tensors = [st.mean, st.var] + [t for t in (st.gamma, st.beta) if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "its running statistics or affine parameters are not finite"
    n_bad = int((st.var.double() + st.eps <= 0).sum())
    return f"running_var + eps <= 0 in {n_bad} channel(s): the statistics are corrupt" if n_bad else ""


def _layer_problem(gm: fx.GraphModule, node: fx.Node, calls: Counter, read: set[str]) -> str:
    m = gm.get_submodule(node.target)
    if calls[node.target] > 1:
        return f"'{node.target}' is called at {calls[node.target]} places, so its weights cannot absorb one BatchNorm"
    if node.target in read:
        return f"the parameters of '{node.target}' are also read directly in forward"
    if parametrize.is_parametrized(m):
        return f"'{node.target}' has a parametrized weight (weight_norm / spectral_norm...); remove the parametrization first"
    return ""


def _channels(m: nn.Module, *, out: bool) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features if out else m.in_features
    return m.out_channels if out else m.in_channels


def _plan_after(gm, site: _Site, calls, read, ranks) -> tuple[fx.Node | None, str, str]:
    prod, swapped, flat_note = site.x, False, ""
    flat = _flatten_to_2d(prod, ranks)
    if flat is not None and len(data_users(prod)) == 1:
        if flat is False:
            return None, f"its input is {describe(gm, prod)}, which does not give a 2-D (tokens, features) tensor", ""
        if ranks.get(prod.args[0]) is None and prod.args[2] != -2:
            flat_note = "assumed a 3-D input to flatten(0, 1); pass example_inputs to check"
        prod, swapped = prod.args[0], True  # (..., F) -> (N, F): the BatchNorm normalises the Linear's features
    elif _is_swap12(prod) and isinstance(prod.args[0], fx.Node) and len(data_users(prod)) == 1:
        three_d = "permute" in (prod.target, getattr(prod.target, "__name__", "")) or ranks.get(prod) == 3
        if three_d or site.kind == "BatchNorm1d":  # BatchNorm1d accepts 2-D/3-D and transpose(1, 2) needs 3-D
            prod, swapped = prod.args[0], True
        elif prod.args[0].op == "call_module":
            return None, (
                f"its input is {describe(gm, prod)} of '{prod.args[0].target}', whose rank is unknown for a "
                f"{site.kind}: pass example_inputs"
            ), ""
    if _is_channel_cat(prod) and not swapped:
        return _plan_after_cat(gm, site, prod, calls, read)
    if prod.op != "call_module":
        return None, f"its input comes from {describe(gm, prod)}, not a Conv/ConvTranspose/Linear", ""
    m = gm.get_submodule(prod.target)
    base = _layer_base(m, list(_AFTER_AXIS))
    if base is None or (swapped and base is not nn.Linear):
        return None, f"its input comes from '{prod.target}' ({type(m).__name__}), not a Conv/ConvTranspose/Linear", ""
    why = _layer_problem(gm, prod, calls, read)
    if why:
        return None, why, ""
    if len(data_users(prod)) > 1:
        others = ", ".join(describe(gm, u) for u in data_users(prod) if u is not site.node and u is not site.x)
        return None, f"the output of '{prod.target}' also feeds {others}", ""
    n = site.stats.mean.numel()
    if _channels(m, out=True) != n:
        return None, f"'{prod.target}' has {_channels(m, out=True)} output channels, the BatchNorm {n}", ""
    note = flat_note
    if base is nn.Linear and not swapped:
        rank = ranks.get(prod)
        if rank is None:
            note = _NOTE_2D
        elif rank != 2:
            return None, f"'{prod.target}' outputs a {rank}-D tensor: the BatchNorm normalises dim 1, not its features", ""
    return prod, "", note


def _is_channel_cat(node: fx.Node) -> bool:
    """``torch.cat([...], 1)`` / ``torch.cat([...], dim=1)`` of graph nodes."""
    if node.op != "call_function" or node.target is not torch.cat or not node.args:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 1 and isinstance(node.args[0], (list, tuple)) and all(isinstance(a, fx.Node) for a in node.args[0])


def _pieces(node: fx.Node) -> list[fx.Node]:
    """The layers a fold writes into: the concatenated ones for a channel cat, else ``node`` itself."""
    return list(node.args[0]) if _is_channel_cat(node) else [node]


def _plan_after_cat(gm, site: _Site, cat: fx.Node, calls, read) -> tuple[fx.Node | None, str, str]:
    """BN over ``cat([conv_1(x_1), conv_2(x_2), ...], 1)``: each conv absorbs its slice of channels (MixNet)."""
    if len(data_users(cat)) > 1:
        return None, f"the output of {describe(gm, cat)} also feeds {', '.join(describe(gm, u) for u in data_users(cat) if u is not site.node)}", ""
    total = 0
    for piece in _pieces(cat):
        m = gm.get_submodule(piece.target) if piece.op == "call_module" else None
        base = _layer_base(m, list(_AFTER_AXIS)) if m is not None else None
        if base is None or base is nn.Linear:
            what = f"'{piece.target}' ({type(m).__name__})" if m is not None else describe(gm, piece)
            return None, f"its input is {describe(gm, cat)} of {what}, not only Conv/ConvTranspose layers", ""
        why = _layer_problem(gm, piece, calls, read) or (
            f"the output of '{piece.target}' also feeds more than {describe(gm, cat)}"
            if len(data_users(piece)) > 1 or list(cat.args[0]).count(piece) > 1 else ""
        )
        if why:
            return None, why, ""
        total += _channels(m, out=True)
    if total != site.stats.mean.numel():
        return None, f"{describe(gm, cat)} gives {total} channels, the BatchNorm {site.stats.mean.numel()}", ""
    return cat, "", ""


def _plan_before(gm, site: _Site, calls, read, ranks) -> tuple[fx.Node | None, str, str]:
    users = data_users(site.node)
    if len(users) != 1:
        return None, f"its output feeds {len(users)} nodes ({', '.join(describe(gm, u) for u in users)})", ""
    user = users[0]
    m = gm.get_submodule(user.target) if user.op == "call_module" else None
    if m is None or _layer_base(m, _BEFORE_TYPES) is None:
        what = f"'{user.target}' ({type(m).__name__})" if m is not None else describe(gm, user)
        return None, f"its output feeds {what}, not a Conv/Linear", ""
    if user.args != (site.node,) or user.kwargs:
        return None, f"'{user.target}' is called with extra arguments", ""
    why = _layer_problem(gm, user, calls, read)
    if why:
        return None, why, ""
    if _pads(m):
        return None, (
            f"the following '{user.target}' pads its input (padding={m.padding}): "
            "a shift before zero padding is not a bias after it"
        ), ""
    n = site.stats.mean.numel()
    if _channels(m, out=False) != n:
        return None, f"'{user.target}' has {_channels(m, out=False)} input channels, the BatchNorm {n}", ""
    note = ""
    if isinstance(m, nn.Linear):
        rank = ranks.get(site.node)
        if rank is None:
            note = _NOTE_2D
        elif rank != 2:
            return None, f"the BatchNorm output is {rank}-D: it normalises dim 1, '{user.target}' mixes the last dim", ""
    return user, "", note


# ----------------------------------------------------------------------------- surgery
def _apply(gm: fx.GraphModule, site: _Site, direction: str, layer_node: fx.Node) -> None:
    st = site.stats
    a_all, c_all = bn_affine(st.mean, st.var, st.eps, st.gamma, st.beta)
    start = 0
    for piece in _pieces(layer_node):  # one layer, or the layers of a channel concat, each with its slice
        layer = gm.get_submodule(piece.target)
        n = _channels(layer, out=True) if direction == "after" else a_all.numel()
        a, c = a_all[start:start + n].to(layer.weight.device), c_all[start:start + n].to(layer.weight.device)
        start += n
        groups = getattr(layer, "groups", 1)
        if direction == "after":
            axis = _AFTER_AXIS[_layer_base(layer, list(_AFTER_AXIS))]
            w, b = fold_affine_after(layer.weight, layer.bias, a, c, out_axis=axis, groups=groups)
        else:
            w, b = fold_affine_before(layer.weight, layer.bias, a, c, groups=groups)
        _set_param(layer, "weight", w)
        _set_param(layer, "bias", b)
    if site.keeps_tail:  # a frozen BN + activation called as one module: the call now runs the activation only
        _strip_norm(gm, site.owner)
        return
    bn_node, inputs = site.node, list(site.node.all_input_nodes)
    bn_node.replace_all_uses_with(site.x)
    gm.graph.erase_node(bn_node)
    for n in inputs:  # the get_attr nodes that fed an F.batch_norm
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
            _prune(gm, n.target)
    _prune(gm, site.owner)
    owner = _get(gm, site.owner) if site.owner else None
    if (isinstance(owner, BATCH_NORM) or hasattr(owner, SOURCE_CLASS)) and _only_children_used(gm, site.owner):
        _strip_norm(gm, site.owner)  # BatchNormAct2d: its drop/act are still called, its statistics no more


def _only_children_used(gm: fx.GraphModule, owner: str) -> bool:
    """True when the graph uses ``owner`` only through calls of its child modules."""
    children = {f"{owner}.{n}" for n, _ in gm.get_submodule(owner).named_children()}
    for n in gm.graph.nodes:
        t = n.target if isinstance(n.target, str) and n.op in ("call_module", "get_attr") else None
        if t is not None and (t == owner or t.startswith(owner + ".")):
            if not (n.op == "call_module" and any(t == c or t.startswith(c + ".") for c in children)):
                return False
    return True


def _get(gm: fx.GraphModule, target: str) -> object:
    owner, _, attr = target.rpartition(".")
    parent = gm.get_submodule(owner) if owner else gm
    return getattr(parent, attr, None)


def _strip_norm(gm: fx.GraphModule, target: str) -> None:
    """Replace the BN + activation module at ``target`` by a :class:`FoldedNormAct` of its children."""
    m = gm.get_submodule(target)
    set_module(gm, target, FoldedNormAct(dict(m.named_children()), getattr(m, SOURCE_CLASS, type(m).__name__)))


def _set_param(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace ``layer.<name>`` with a new Parameter holding ``value`` (same strides and requires_grad)."""
    old = getattr(layer, name)
    like = old if old is not None else value
    data = torch.empty_like(like, dtype=value.dtype).copy_(value)  # keeps channels_last weights channels_last
    setattr(layer, name, nn.Parameter(data, requires_grad=layer.weight.requires_grad))


def _prune(gm: fx.GraphModule, target: str) -> None:
    """Delete attribute/submodule ``target`` once no node of the graph refers to it any more."""
    if not target:
        return
    for n in gm.graph.nodes:
        t = n.target if isinstance(n.target, str) and n.op in ("call_module", "get_attr") else None
        if t is not None and (t == target or t.startswith(target + ".") or target.startswith(t + ".")):
            return
    owner, _, attr = target.rpartition(".")
    parent = gm.get_submodule(owner) if owner else gm
    if isinstance(getattr(parent, attr, None), nn.Module):
        gm.delete_submodule(target)
    elif hasattr(parent, attr):
        delattr(parent, attr)
