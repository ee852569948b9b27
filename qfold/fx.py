"""The torch.fx vocabulary every graph pass shares: module lookup, consumers, site tables, descriptions.

The fold, bound, re-parameterization, quantization and QAT passes all read graphs with these
helpers, so "what is a ReLU", "what is an add" and "who reads this tensor" have one answer.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

# torch's base classes of every BatchNorm, convolution, transposed convolution and constant pad.
# They are private names (torch has no public base class to test against); qfold uses them only
# in isinstance checks and, for BATCH_NORM, as the base of the fold's any-rank BatchNorm.
BATCH_NORM = nn.modules.batchnorm._BatchNorm
CONV = nn.modules.conv._ConvNd
CONV_TRANSPOSE = nn.modules.conv._ConvTransposeNd
CONSTANT_PAD = nn.modules.padding._ConstantPadNd

#: functions that compute a ReLU; the in-place ones among them; Tensor methods that do.
RELU_FUNCS = (F.relu, torch.relu, torch.relu_, F.relu_)
INPLACE_RELU_FUNCS = (torch.relu_, F.relu_)
RELU_METHODS = ("relu", "relu_")
#: functions and Tensor methods that add two tensors.
ADD_FUNCS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")


def get_module(root: nn.Module, qualname: str) -> nn.Module:
    """The submodule at dotted ``qualname`` ('' is the root)."""
    return root.get_submodule(qualname) if qualname else root


def set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``qualname`` with ``new``."""
    parent_name, _, child = qualname.rpartition(".")
    setattr(get_module(root, parent_name), child, new)


_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_META_METHODS = frozenset({"size", "dim", "numel", "nelement", "get_device"})
_SHAPE_LIKE_METHODS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})


def is_metadata_read(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` reads only ``node``'s metadata (shape, rank, dtype, device), not its values.

    ``getattr(x, "shape" | "ndim" | "dtype" | "device")``, ``x.size()`` / ``x.dim()`` / ``x.numel()``,
    and ``y.reshape_as(x)`` / ``y.view_as(x)`` / ``y.expand_as(x)`` / ``y.type_as(x)`` where ``x``
    is only the template. Such a read is unchanged when ``node``'s values change (a BatchNorm
    folded into the layer that produced ``node`` keeps its shape, dtype and device).
    """
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) >= 2 and user.args[0] is node and user.args[1] in _META_ATTRS
    if user.op == "call_method" and user.target in _META_METHODS:
        return bool(user.args) and user.args[0] is node and node not in user.args[1:] and node not in user.kwargs.values()
    if user.op == "call_method" and user.target in _SHAPE_LIKE_METHODS:
        return len(user.args) == 2 and user.args[0] is not node and user.args[1] is node and not user.kwargs
    return False


def data_users(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s values (:func:`users_of` minus :func:`is_metadata_read` users)."""
    return [u for u in node.users if not is_metadata_read(u, node)]


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def call_counts(gm: fx.GraphModule) -> Counter[str]:
    """How many ``call_module`` nodes call each submodule (a module called twice is shared)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def relu_site(gm: fx.GraphModule, node: fx.Node) -> bool | None:
    """None if ``node`` is not a plain ReLU; else whether it runs in place.

    A ReLU is an ``nn.ReLU`` module (not a subclass), ``F.relu`` / ``torch.relu`` and their
    in-place forms, or ``Tensor.relu()`` / ``Tensor.relu_()``.
    """
    m = module_of(gm, node)
    if m is not None:
        return m.inplace if type(m) is nn.ReLU else None
    if node.op == "call_function" and node.target in RELU_FUNCS:
        return node.target in INPLACE_RELU_FUNCS or bool(node.kwargs.get("inplace", False))
    if node.op == "call_method" and node.target in RELU_METHODS:
        return node.target == "relu_"
    return None


def is_add(node: fx.Node) -> bool:
    """True when ``node`` adds (``a + b``, ``a += b``, ``torch.add``, ``Tensor.add`` / ``add_``)."""
    return (node.op == "call_function" and node.target in ADD_FUNCS) or (node.op == "call_method" and node.target in ADD_METHODS)


def fn_name(target: object) -> str:
    """``module.name`` of a function target: ``torch.nn.functional.relu``, ``operator.add``."""
    module = {"_operator": "operator"}.get(getattr(target, "__module__", "") or "", getattr(target, "__module__", "") or "")
    return f"{module}.{getattr(target, '__name__', str(target))}".lstrip(".")


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as a user reads it in a report: ``'layer1.conv' (Conv2d)``, ``cat ('cat_1')``, ``.view() ('view')``."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))} ('{node.name}')"
    if node.op == "call_method":
        return f".{node.target}() ('{node.name}')"
    return {"placeholder": f"the model input '{node.target}'", "output": "the model output", "get_attr": f"constant '{node.target}'"}.get(node.op, node.op)


def training_batchnorm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the first BatchNorm in training mode (its output depends on the batch), or None."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, BATCH_NORM) and m.training), None)


def is_eval(model: nn.Module) -> bool:
    """True when no submodule is in training mode."""
    return not any(m.training for m in model.modules())


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode inside the block; every module's training flag restored after."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, f in flags:
            m.training = f


def tensor_leaves(obj: object) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple / list / dict model output, in order (dicts by insertion)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensor_leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensor_leaves(o)]
    return []


def channels_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose 4-D parameters and buffers are channels-last (``PTQConfig.channels_last``).

    Convolutions with channels-last weights give channels-last outputs from NCHW inputs too, so
    the data need not be converted. A copy, because ``Module.to`` re-lays shared Parameters in
    place (a folded model may share layers with the user's).
    """
    return copy.deepcopy(model).to(memory_format=torch.channels_last)
