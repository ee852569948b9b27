"""Keep a model's Python-level interface on the GraphModules the graph passes return.

``torch.fx.GraphModule(model, graph)`` copies only the submodules and tensors its graph uses: a
property (segmentation_models_pytorch's ``encoder.output_stride``), a method (``check_input_shape``),
a plain attribute (``num_classes``) or the class of an intermediate module (``encoder`` becomes a
bare ``nn.Module``) is lost, and user code or a later forward that reads it fails.

:func:`keep_interface` gives the GraphModule back what the original had:

* the root's class becomes a GraphModule subclass carrying the original class's properties,
  methods and class attributes (everything ``fx.GraphModule`` itself does not define), and the
  original instance's plain attributes are copied;
* every intermediate module that fx rebuilt as a bare ``nn.Module`` gets its original class back
  (``__class__`` assignment) and its plain attributes; one left for a traced-through BatchNorm
  (timm's ``BatchNormAct2d``) stays a bare container, its class name in ``SOURCE_CLASS``.

The GraphModule's own ``forward`` (the graph) always wins. The interface survives ``copy.deepcopy``
and re-tracing; pickling keeps the plain attributes only (GraphModule pickles by code).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from qfold.fx import BATCH_NORM

__all__ = ["SOURCE_CLASS", "keep_interface"]

SOURCE_CLASS = "_qfold_source_class"  # on a bare container left for a traced-through BatchNorm: its class name

_GM_NAMES = frozenset(dir(fx.GraphModule))
_MODULE_STATE = frozenset(vars(nn.Module()).keys())  # _parameters, _buffers, _modules, hooks, training...


def _own_namespace(cls: type) -> dict[str, Any]:
    """The attributes ``cls`` and its bases define beyond ``fx.GraphModule`` / ``nn.Module``."""
    ns: dict[str, Any] = {}
    for k in reversed(cls.__mro__):
        if k in fx.GraphModule.__mro__ or k.__qualname__.endswith("GraphModuleImpl") or k is _Kept:
            continue
        for name, value in vars(k).items():
            if name.startswith("__") or name in _GM_NAMES:
                continue
            ns[name] = value
    return ns


def _plain_attrs(m: nn.Module) -> dict[str, Any]:
    """Instance attributes that are not module state, parameters, buffers or submodules."""
    return {k: v for k, v in vars(m).items() if k not in _MODULE_STATE and not k.startswith("_forward_")
            and not isinstance(v, (nn.Module, torch.Tensor))}


class _Kept(fx.GraphModule):
    """Base of the classes :func:`keep_interface` makes; re-applies the interface on deepcopy."""

    _qfold_source_cls: type = nn.Module

    def __deepcopy__(self, memo: dict) -> fx.GraphModule:
        res = super().__deepcopy__(memo)
        return _apply(res, self, memo)


def _apply(gm: fx.GraphModule, original: nn.Module, memo: dict | None = None) -> fx.GraphModule:
    src_cls = getattr(type(original), "_qfold_source_cls", type(original))
    ns = _own_namespace(type(original))
    if ns and not isinstance(gm, _Kept):
        name = getattr(src_cls, "__name__", "Module")
        kept = type(name, (_Kept,), {**ns, "_qfold_source_cls": src_cls, "__module__": src_cls.__module__})
        # GraphModule compiles forward into a per-instance class named GraphModuleImpl and, on copy,
        # makes a fresh one under the first class of the MRO not so named: that must be ``kept``.
        impl = type("GraphModuleImpl", (kept,), {"__qualname__": "GraphModuleImpl", "__module__": src_cls.__module__})
        impl.__name__ = type(gm).__name__
        gm.__class__ = impl
        gm.recompile()
    for k, v in _plain_attrs(original).items():
        if k not in vars(gm):
            gm.__dict__[k] = copy.deepcopy(v, memo) if memo is not None else v
    shells = dict(gm.named_modules())
    for name, m in original.named_modules():
        shell = shells.get(name)
        if not name or shell is None or type(shell) is not nn.Module or type(m) is nn.Module:
            continue
        if isinstance(m, fx.GraphModule):
            continue
        if isinstance(m, BATCH_NORM):  # a traced-through BN keeps no BN class (passes look for those), only its name
            shell.__dict__[SOURCE_CLASS] = type(m).__name__
            continue
        try:
            shell.__class__ = type(m)
        except TypeError:  # an incompatible layout (slots, C extension): leave the bare module
            continue
        shell.training = m.training
        for k, v in _plain_attrs(m).items():
            if k not in vars(shell):
                shell.__dict__[k] = copy.deepcopy(v, memo) if memo is not None else v
    return gm


def keep_interface(gm: fx.GraphModule, original: nn.Module) -> fx.GraphModule:
    """Give ``gm`` (built from ``original`` by tracing or export) ``original``'s attributes,
    properties and methods, and its intermediate modules their classes; returns ``gm`` (changed in
    place). ``original`` is only read; attribute values are shared, not copied."""
    return _apply(gm, original)
