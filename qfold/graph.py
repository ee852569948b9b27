"""torch.fx helpers shared by the graph passes: tracing with actionable errors, module lookup."""
from __future__ import annotations

import copy
from collections.abc import Collection

import torch
import torch.fx as fx
import torch.nn as nn

from qfold.keep_attrs import keep_interface


class UntraceableModelError(TypeError):
    """torch.fx could not trace the model; the message names the module and what to do.

    Attributes:
        module_name: qualified name of the innermost module whose forward failed ("" for the
            root), or None when it could not be told.
    """

    def __init__(self, message: str, module_name: str | None = None) -> None:
        super().__init__(message)
        self.module_name = module_name


def _failing_module(model: nn.Module, exc: Exception) -> str | None:
    """Best effort: the qualified name of the innermost module whose forward raised ("" = root).

    A frame is matched to a module by its ``self`` (so two instances of one class are told
    apart), falling back to the forward's code object.
    """
    tb = exc.__traceback__
    name: str | None = None
    by_id = {id(m): n for n, m in model.named_modules()}
    code_to_name = {type(m).forward.__code__: n for n, m in model.named_modules() if hasattr(type(m).forward, "__code__")}
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in by_id and frame.f_code is getattr(type(owner).forward, "__code__", None):
            name = by_id[id(owner)]
        elif frame.f_code in code_to_name:
            name = code_to_name[frame.f_code]
        tb = tb.tb_next
    return name


FX_CAPTURE = {"method": "torch.fx", "valid_for": "any input the model accepts"}


def capture_info(gm: nn.Module) -> dict[str, str]:
    """How ``gm`` was captured: ``{"method": "torch.fx" | "torch.export", "valid_for": ...}``."""
    meta = getattr(gm, "meta", None)
    return dict(meta.get("qfold_capture", FX_CAPTURE)) if isinstance(meta, dict) else dict(FX_CAPTURE)


def trace(
    model: nn.Module,
    *,
    leaf_types: tuple[type, ...] = (),
    leaf_names: Collection[str] = (),
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` (the user's model is never touched).

    The result keeps ``model``'s attributes, properties and methods (:mod:`qfold.keep_attrs`).
    When torch.fx fails and ``example_inputs`` are given, the model is captured with
    ``torch.export`` instead (:func:`qfold.exported.capture`: valid for the example's shape, any
    batch size); :func:`capture_info` tells which capture a GraphModule came from.

    Args:
        model: the module to trace.
        leaf_types: extra module types kept as single ``call_module`` nodes.
        leaf_names: qualified names of extra submodules kept as single ``call_module`` nodes.
        example_inputs: an input batch for the ``torch.export`` fallback (none: no fallback).

    Raises:
        UntraceableModelError: naming the module whose forward fx could not follow (data-dependent
            control flow, for instance) and the usual fixes; ``.module_name`` holds that name.
    """
    model = copy.deepcopy(model)
    leaf_names = frozenset(leaf_names)

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_types) or qualname in leaf_names or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        where = _failing_module(model, exc)
        fallback = ""
        if example_inputs is not None and not leaf_types and not leaf_names:
            from qfold.exported import capture

            try:
                inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
                return keep_interface(capture(model, inputs), model)
            except ValueError as exp_exc:
                fallback = f"; the torch.export fallback failed as well ({exp_exc})"
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}"
            + (f": the forward of module '{where or '<root>'}' failed" if where is not None else "")
            + f" ({type(exc).__name__}: {exc}){fallback}. Make that forward free of data-dependent Python control flow, "
            "or pass a model whose structure is an nn.Sequential / chain of named children"
            + ("." if example_inputs is not None else ", or pass example inputs so that it can be captured with torch.export."),
            module_name=where,
        ) from exc
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if isinstance(model, fx.GraphModule) and "qfold_capture" in model.meta:
        gm.meta["qfold_capture"] = dict(model.meta["qfold_capture"])  # re-tracing an exported capture keeps its validity
    return keep_interface(gm, model)


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


def users_of(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s output, in graph order."""
    return list(node.users)


def call_module_target(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def is_eval(model: nn.Module) -> bool:
    """True when no submodule is in training mode."""
    return not any(m.training for m in model.modules())


def assert_no_grad_needed(t: torch.Tensor) -> torch.Tensor:
    """Detach helper used where graph passes read parameters."""
    return t.detach()
