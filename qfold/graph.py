"""torch.fx helpers shared by the graph passes: tracing with actionable errors, module lookup."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn


class UntraceableModelError(TypeError):
    """torch.fx could not trace the model; the message names the module and what to do."""


def _failing_module(model: nn.Module, exc: Exception) -> str:
    """Best effort: the qualified name of the innermost module whose forward raised."""
    tb = exc.__traceback__
    name = ""
    code_to_name = {type(m).forward.__code__: n for n, m in model.named_modules() if hasattr(type(m), "forward")}
    while tb is not None:
        n = code_to_name.get(tb.tb_frame.f_code)
        if n is not None:
            name = n or "<root>"
        tb = tb.tb_next
    return name


def trace(model: nn.Module, *, leaf_types: tuple[type, ...] = ()) -> fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` (the user's model is never touched).

    Args:
        model: the module to trace.
        leaf_types: extra module types kept as single ``call_module`` nodes.

    Raises:
        UntraceableModelError: naming the module whose forward fx could not follow (data-dependent
            control flow, for instance) and the usual fixes.
    """
    model = copy.deepcopy(model)

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_types) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        where = _failing_module(model, exc)
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}"
            + (f": the forward of module '{where}' failed" if where else "")
            + f" ({type(exc).__name__}: {exc}). Make that forward free of data-dependent Python control flow, "
            "or pass a model whose structure is an nn.Sequential / chain of named children."
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
