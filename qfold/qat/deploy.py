"""The end of QAT: the trained model, converted to PTQ's folded fake-quant form, written as Q/DQ ONNX."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from qfold.config import ExportConfig
from qfold.onnx import export_onnx
from qfold.qat.passes import convert

__all__ = ["export"]


def export(model: nn.Module, path: str | Path, example_input: torch.Tensor, export_config: ExportConfig | None = None) -> Path:
    """:func:`qfold.qat.convert` the QAT model and write its Q/DQ ONNX to ``path`` (atomic, deterministic).

    Goes through the same export as PTQ (:func:`qfold.onnx.export_onnx`); ``export_config`` is
    its :class:`qfold.config.ExportConfig` (None: the defaults).
    """
    export_onnx(convert(model), example_input, path, export_config or ExportConfig())
    return Path(path)
