"""Model -> torch.fx GraphModule: symbolic tracing with actionable errors, torch.export as the fallback.

A traced copy keeps the original's attributes, properties and methods (:mod:`qfold.capture.keep_attrs`);
:func:`capture_info` tells which capture produced a graph and for which inputs it is valid.
"""
from __future__ import annotations

import copy
from collections.abc import Collection

import torch
import torch.fx as fx
import torch.nn as nn

from qfold.capture.keep_attrs import keep_interface
from qfold.errors import UntraceableModelError

__all__ = ["FX_CAPTURE", "capture_info", "trace"]


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

    The result keeps ``model``'s attributes, properties and methods (:mod:`qfold.capture.keep_attrs`).
    When torch.fx fails and ``example_inputs`` are given, the model is captured with
    ``torch.export`` instead (:func:`qfold.capture.exported.capture`: valid for the example's shape, any
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
            from qfold.capture.exported import capture

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
