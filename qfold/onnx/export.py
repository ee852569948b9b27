"""Export a (fake-quant) PyTorch model to ONNX, deterministically and atomically.

``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` export as
``QuantizeLinear -> DequantizeLinear`` (opset >= 13 for per-channel); the exported graph is then put
in TensorRT's explicit-quantization form by :func:`qfold.onnx.qdq.normalize_qdq` and checked with
``onnx.checker``. Same model, input and config give byte-identical files.
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from calib.atomic import atomic_write_bytes, atomic_write_text
from qfold.config import ExportConfig
from qfold.onnx.qdq import normalize_qdq, precision_map


def precision_map_path(onnx_path: str | os.PathLike) -> Path:
    """Where :func:`export_onnx` writes the per-layer precision map for ``onnx_path``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".precision.json")


def _as_inputs(example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"example_input must be a torch.Tensor or a tuple of them, got {type(example_input).__name__}; "
                        "pass e.g. torch.zeros(1, 3, 32, 32).")
    return inputs


def _export_proto(model: nn.Module, inputs: tuple[torch.Tensor, ...], config: ExportConfig) -> onnx.ModelProto:
    n_in = len(inputs)
    in_names = list(config.input_names[:n_in]) + [f"input_{k}" for k in range(len(config.input_names), n_in)]
    out_names = list(config.output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config.exporter == "torchscript":
            buf = io.BytesIO()
            axes = {n: {0: "batch"} for n in in_names + out_names} if config.dynamic_batch else None
            torch.onnx.export(model, inputs, buf, dynamo=False, opset_version=config.opset, input_names=in_names,
                              output_names=out_names, dynamic_axes=axes, do_constant_folding=True)
            return onnx.load_from_string(buf.getvalue())
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in inputs) if config.dynamic_batch else None
        try:
            prog = torch.onnx.export(model, inputs, dynamo=True, opset_version=config.opset, input_names=in_names,
                                     output_names=out_names, dynamic_shapes=shapes, optimize=True, verbose=False)
        except Exception as exc:  # the dynamo exporter raises many types
            raise RuntimeError(f"the dynamo exporter failed ({type(exc).__name__}: {exc}); "
                               "use ExportConfig(exporter='torchscript').") from exc
        return prog.model_proto


def _strip_nondeterminism(model: onnx.ModelProto) -> None:
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    del model.metadata_props[:]


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic protobuf bytes (map fields sorted)."""
    return model.SerializeToString(deterministic=True)


def export_onnx(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], path: str | os.PathLike,
                config: ExportConfig = ExportConfig(), *, layers: dict[str, Any] | None = None) -> Path:
    """Export ``model`` (a deep copy, in eval mode; the caller's model is untouched) to ``path``.

    Returns:
        ``path``. With ``config.normalize`` and Q/DQ in the graph, ``<stem>.precision.json`` is
        written next to it (``{node name: "int8" | "float"}`` for every weighted layer), or, given
        ``layers`` (the plan's per-layer precisions, :meth:`qfold.quant.QuantPlan.precision_map`),
        ``{"layers": layers, "onnx_nodes": {node name: ...}}``.

    Raises:
        TypeError: ``example_input`` is not a tensor (tuple).
        RuntimeError: the export or ``onnx.checker`` failed; the message says which.
    """
    inputs = _as_inputs(example_input)
    m = copy.deepcopy(model).eval()
    proto = _export_proto(m, inputs, config)
    _strip_nondeterminism(proto)
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    if config.normalize:
        proto = normalize_qdq(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"onnx.checker rejected the exported model: {exc}") from exc
    path = Path(path)
    atomic_write_bytes(path, serialize(proto))
    if config.normalize and has_qdq:
        nodes = precision_map(proto)
        text = json.dumps(nodes if layers is None else {"layers": layers, "onnx_nodes": nodes}, indent=2, sort_keys=True) + "\n"
        atomic_write_text(precision_map_path(path), text)
    return path
