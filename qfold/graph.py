"""torch.fx helpers shared by the graph passes: tracing with actionable errors, module lookup."""
from __future__ import annotations

import copy
from collections.abc import Collection

import torch
import torch.fx as fx
import torch.nn as nn


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


def trace(
    model: nn.Module, *, leaf_types: tuple[type, ...] = (), leaf_names: Collection[str] = ()
) -> fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` (the user's model is never touched).

    Args:
        model: the module to trace.
        leaf_types: extra module types kept as single ``call_module`` nodes.
        leaf_names: qualified names of extra submodules kept as single ``call_module`` nodes.

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
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}"
            + (f": the forward of module '{where or '<root>'}' failed" if where is not None else "")
            + f" ({type(exc).__name__}: {exc}). Make that forward free of data-dependent Python control flow, "
            "or pass a model whose structure is an nn.Sequential / chain of named children.",
            module_name=where,
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def get_module(root: nn.Module, qualname: str) -> nn.Module:
    """The submodule at dotted ``qualname`` ('' is the root)."""
    return root.get_submodule(qualname) if qualname else root


def set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``qualname`` with ``new``."""
    parent_name, _, child = qualname.rpartition(".")
    setattr(get_module(root, parent_name), child, new)


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
