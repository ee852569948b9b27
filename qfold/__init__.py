"""qfold: from an FP32 PyTorch model to a fast, measured int8 engine.

The public API, one function per step (each returns a new model and a report; inputs are never
modified)::

    reparameterize(model)                   -> (model, ReparamReport)   merge RepVGG-style branches
    fold_batchnorm(model)                   -> (model, FoldReport)      fold BN into conv/linear
    bound_relu(model, calib_data)           -> (model, BoundReport)     ReLU -> ReLU6, function-preserving
    run_ptq(model, calib_x, eval_x, eval_y) -> PTQResult                the whole PTQ path
    qfold.qat.prepare / step / convert / export                         quantization-aware training

Heavy submodules are imported on first use, so ``import qfold`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "fold_batchnorm": "qfold.fold",
    "FoldReport": "qfold.fold.report",
    "reparameterize": "qfold.reparam",
    "ReparamReport": "qfold.reparam",
    "bound_relu": "qfold.bound",
    "BoundConfig": "qfold.bound",
    "BoundReport": "qfold.bound",
    "run_ptq": "qfold.pipeline",
    "PTQResult": "qfold.pipeline",
    "PTQConfig": "qfold.config",
    "load_config": "qfold.config",
    "export_onnx": "qfold.onnx.export",
    "ExportConfig": "qfold.onnx.export",
    "get_backend": "qfold.engine",
    "EngineConfig": "qfold.engine.base",
    "plan_quantization": "qfold.quant",
    "prepare_fake_quant": "qfold.quant",
    "tune_allocator": "qfold.host",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "qat":
        return importlib.import_module("qfold.qat")
    raise AttributeError(f"module 'qfold' has no attribute {name!r}")
