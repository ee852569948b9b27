"""What counts as a BatchNorm for :func:`qfold.fold.fold_batchnorm`, and where one is called.

Holds the BatchNorm-site side of the fold pass: :class:`FoldError`; the statistics of one
BatchNorm (``_Stats``) and one BatchNorm call in an fx graph (``_Site``); the structural and
behavioural test for "frozen" BatchNorms (``_frozen_stats``, ``_behaves_like_bn``, ``_bn_like``);
and the classification of a graph node as a BatchNorm site, including ``F.batch_norm`` calls on
module attributes (``_site``, ``_functional_site``). The legality rules and the surgery stay in
:mod:`qfold.fold`.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qfold.capture.keep_attrs import SOURCE_CLASS
from qfold.errors import FoldError
from qfold.fold.formulas import bn_affine
from qfold.fx import BATCH_NORM

__all__ = ["FoldError"]


_BN_FORWARDS = (BATCH_NORM.forward, nn.SyncBatchNorm.forward)
_FROZEN_ATTRS = ("weight", "bias", "running_mean", "running_var")
_BATCH_NORM_SIG = inspect.signature(F.batch_norm)


@dataclasses.dataclass(frozen=True)
class _Stats:
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    gamma: torch.Tensor | None
    beta: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class _Site:
    """One BatchNorm call in the graph: its node, its input and (if usable) its statistics."""

    node: fx.Node
    name: str
    kind: str
    x: fx.Node
    stats: _Stats | None
    why_not: str = ""  # set when stats is None
    owner: str = ""  # the module that holds the BN's statistics, deleted once unused
    keeps_tail: bool = False  # a norm+activation module: once folded, the node still runs its children


class FoldedNormAct(nn.Module):
    """What is left of a BatchNorm + activation module (timm's ``BatchNormAct2d``,
    ``FrozenBatchNormAct2d``...) once its BatchNorm is folded into the layer before it: its child
    modules (dropout, activation...), applied in order. Keeps the original's child names, so
    ``bn1.act`` is still the activation and ``qfold.bound_relu`` still finds a ReLU there."""

    def __init__(self, children: dict[str, nn.Module], folded_from: str) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.folded_from = folded_from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x

    def extra_repr(self) -> str:
        return f"folded_from={self.folded_from}"


# ----------------------------------------------------------------------------- frozen BatchNorms
def _frozen_stats(m: nn.Module, *, allow_children: bool = False) -> _Stats | None:
    """Statistics of a module that looks like a frozen BatchNorm (by structure), else None.

    With ``allow_children`` a module with children (a frozen BatchNorm + activation) qualifies too.
    """
    if isinstance(m, BATCH_NORM) or (not allow_children and any(True for _ in m.children())):
        return None
    ts = [getattr(m, a, None) for a in _FROZEN_ATTRS]
    eps = getattr(m, "eps", None)
    if not all(isinstance(t, torch.Tensor) and t.ndim == 1 and t.is_floating_point() for t in ts):
        return None
    if len({t.numel() for t in ts}) != 1 or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    return _Stats(ts[2], ts[3], float(eps), ts[0], ts[1])


def _behaves_like_bn(m: nn.Module, st: _Stats, tail: nn.Module | None = None) -> bool:
    """True when ``m`` computes ``tail(gamma * (x - mean) / sqrt(var + eps) + beta)`` on a probe input."""
    probe = copy.deepcopy(m)  # in its own mode: a BN that uses batch statistics in training is no frozen BN
    n = st.mean.numel()
    a, c = bn_affine(st.mean, st.var, st.eps, st.gamma, st.beta)
    tol = 1e-4 if st.mean.dtype in (torch.float32, torch.float64) else 3e-2
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, n, 3, 3), (2, n, 4), (2, n), (2, n, 2, 2, 2)]:
        x = torch.randn(shape, generator=gen).to(st.mean.dtype).to(st.mean.device)
        try:
            with torch.no_grad():
                y = probe(x)
        except (RuntimeError, ValueError, TypeError, IndexError):  # wrong probe shape for this module: try the next
            continue
        view = [1, n] + [1] * (len(shape) - 2)
        ref = x.double() * a.view(view) + c.view(view)
        if tail is not None:
            with torch.no_grad():
                ref = tail(ref.to(st.mean.dtype)).double()
        if isinstance(y, torch.Tensor) and y.shape == ref.shape:
            return bool((y.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item()))
    return False


def _norm_act_tail(m: nn.Module) -> FoldedNormAct | None:
    """For a frozen BatchNorm + activation (BN statistics as buffers, children applied after the
    BN in registration order, checked on a probe input): a :class:`FoldedNormAct` of copies of
    its children. None for anything else."""
    if not any(True for _ in m.children()) or any(isinstance(c, BATCH_NORM) for c in m.modules()):
        return None
    st = _frozen_stats(m, allow_children=True)
    if st is None:
        return None
    tail = FoldedNormAct({n: copy.deepcopy(c) for n, c in m.named_children()}, type(m).__name__).eval()
    return tail if _behaves_like_bn(m, st, tail) else None


def _bn_like(m: nn.Module) -> bool:
    if isinstance(m, BATCH_NORM):
        return True
    st = _frozen_stats(m)
    return (st is not None and _behaves_like_bn(m, st)) or _norm_act_tail(m) is not None


# ----------------------------------------------------------------------------- BatchNorm sites
def _site(gm: fx.GraphModule, node: fx.Node, prefix: str, frozen: set[str]) -> _Site | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        name = f"{prefix}{node.target}"
        if not node.args and not node.kwargs:
            return None
        x = node.args[0] if node.args else next(iter(node.kwargs.values()))
        if isinstance(m, BATCH_NORM) and type(m).forward in _BN_FORWARDS:
            if m.training:  # the model was checked, but a GraphModule can be switched back
                raise FoldError(f"BatchNorm '{name}' is in training mode; call model.eval() before fold_batchnorm(model).")
            if m.running_mean is None or m.running_var is None:
                return _Site(node, name, type(m).__name__, x, None, _NO_STATS)
            st = _Stats(m.running_mean, m.running_var, m.eps, m.weight, m.bias)
            return _Site(node, name, type(m).__name__, x, st, owner=node.target)
        if node.target in frozen and not isinstance(m, FoldedNormAct):
            tail = any(True for _ in m.children())
            st = _frozen_stats(m, allow_children=tail)
            return _Site(node, name, type(m).__name__, x, st, owner=node.target, keeps_tail=tail)
        return None
    if node.op == "call_function" and node.target is F.batch_norm:
        return _functional_site(gm, node, prefix)
    return None


_NO_STATS = "it has no running statistics (track_running_stats=False), so it normalises with batch statistics at inference"


def _functional_site(gm: fx.GraphModule, node: fx.Node, prefix: str) -> _Site:
    args = _BATCH_NORM_SIG.bind(*node.args, **node.kwargs)
    args.apply_defaults()
    a = args.arguments
    rm = a["running_mean"]
    owner = rm.target.rpartition(".")[0] if isinstance(rm, fx.Node) and rm.op == "get_attr" else ""
    name = f"{prefix}{owner}" if owner else f"{prefix}{node.name}"
    owner_m = gm.get_submodule(owner) if owner else None
    kind = type(owner_m).__name__ if isinstance(owner_m, BATCH_NORM) else getattr(owner_m, SOURCE_CLASS, "F.batch_norm")
    if a["training"] is True:
        raise FoldError(
            f"F.batch_norm in '{name}' runs with training=True: folding uses running statistics, which only "
            "eval mode applies. Call model.eval() (and pass training=self.training) before fold_batchnorm(model)."
        )
    tensors = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        v = a[key]
        if isinstance(v, fx.Node) and v.op == "get_attr":
            tensors[key] = _fetch(gm, v.target)
        elif v is None and key in ("weight", "bias"):
            tensors[key] = None
        elif v is None:
            return _Site(node, name, kind, a["input"], None, _NO_STATS)
        else:
            return _Site(node, name, kind, a["input"], None, f"its {key} is computed in forward, not a module attribute")
    if not isinstance(a["training"], bool) or not isinstance(a["eps"], (int, float)):
        return _Site(node, name, kind, a["input"], None, "its training flag or eps is computed in forward")
    st = _Stats(tensors["running_mean"], tensors["running_var"], float(a["eps"]), tensors["weight"], tensors["bias"])
    return _Site(node, name, kind, a["input"], st, owner=owner)


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)
