"""Pure passes over a Q/DQ ``onnx.ModelProto``: TensorRT-profile normalization, inspection, ORT rendering.

No file I/O and no inference; every function returns a new model and leaves its argument alone.

TensorRT profile (explicit quantization, see docs/tensorrt-qdq-rules.md):
weights are int8 initializers read by a per-channel ``DequantizeLinear`` (``axis`` written out),
activations go through a per-tensor ``QuantizeLinear -> DequantizeLinear`` pair, every scale is a
strictly positive float32 initializer and every zero point an int8 zero. Weight codes are computed
as TensorRT's ``IQuantizeLayer`` would::

    q = clamp(round_half_even(w / scale) + zero_point, -128, 127)     (float32 division)

Public API: :func:`normalize_qdq`, :func:`check_trt_rules`, :func:`render_for_ort`,
:func:`tensors_needing_amax_for_ort`, :func:`precision_map`, :func:`activation_scales`.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from qfold.onnx.graph import (
    DQ,
    WEIGHTED,
    GraphIndex,
    Q,
    attr,
    remove_dead,
    replace_initializer,
    set_attr,
)
from qfold.onnx.ort_render import (
    OrtRendering,
    render_for_ort,
    tensors_needing_amax_for_ort,
)
from qfold.onnx.trt_rules import Violation, check_trt_rules

__all__ = [
    "OrtRendering",
    "Violation",
    "activation_scales",
    "check_trt_rules",
    "normalize_qdq",
    "precision_map",
    "render_for_ort",
    "tensors_needing_amax_for_ort",
]

# Ops never evaluated at normalization time: Q/DQ keep their structure; the rest are not pure.
_NO_FOLD = {Q, DQ, "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "If", "Loop", "Scan"}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _constant_to_initializer(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    value = onnx.helper.get_attribute_value(a)
    dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
             "value_ints": np.int64}.get(a.name)
    if dtype is None:
        raise ValueError(f"Constant node '{node.name}' uses attribute '{a.name}', which qfold cannot fold; "
                         "export with a value/value_float(s)/value_int(s) constant.")
    return np.asarray(value, dtype=dtype)


def _fold_constants(model: onnx.ModelProto) -> None:
    """Evaluate every node whose inputs are all constant (except Q/DQ) into initializers, in place."""
    g = model.graph
    opsets = {o.domain or "": o.version for o in model.opset_import}
    values: dict[str, np.ndarray] = {}
    const = {t.name for t in g.initializer}
    protos = {t.name: t for t in g.initializer}
    keep: list[onnx.NodeProto] = []
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            values[node.output[0]] = _constant_to_initializer(node)
            replace_initializer(g, values[node.output[0]], node.output[0])
            const.add(node.output[0])
            continue
        if (node.op_type not in _NO_FOLD and node.domain in ("", "ai.onnx") and all(i in const for i in ins)
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            feeds = {i: values[i] if i in values else numpy_helper.to_array(protos[i]) for i in ins}
            outs = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
            for name, value in zip(node.output, outs):
                values[name] = np.asarray(value)
                replace_initializer(g, values[name], name)
                const.add(name)
            continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def quantize_codes(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """``clamp(round_half_even(x / scale) + zero_point)`` in float32, the ONNX/TensorRT QuantizeLinear.

    ``scale`` and ``zero_point`` are scalars or 1-D along ``axis``; the result has zero_point's dtype.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point)
    if scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(x / scale).astype(np.float64) + zp.astype(np.float64)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def normalize_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The TensorRT-profile form of a Q/DQ model (a new model; ``model`` is not modified).

    * ``Constant`` nodes and constant subexpressions (the weight-scale arithmetic the exporter
      leaves in the graph, zero-point ``Identity`` chains, ``Clip`` bounds) become initializers;
    * every weight ``QuantizeLinear`` is evaluated into an int8 initializer (see module docstring),
      leaving ``int8 initializer -> DequantizeLinear``;
    * scales are float32 initializers; ``axis`` is written explicitly on every Q/DQ with a 1-D scale;
    * dead nodes and unused initializers are removed.

    Deterministic: node order is preserved and new tensors reuse the names they replace.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _fold_constants(out)
    g = out.graph
    idx = GraphIndex.build(g)
    keep: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type in (Q, DQ):
            for name in node.input[1:2]:
                s = idx.array(name)
                if s is not None and s.dtype != np.float32:
                    replace_initializer(g, s.astype(np.float32), name)
            s = idx.array(node.input[1])
            if s is not None and s.ndim == 1 and attr(node, "axis") is None:
                set_attr(node, "axis", 1)  # the ONNX default, made explicit (TensorRT would assume 0)
        if node.op_type == Q and node.input[0] in idx.inits and len(node.input) > 2:
            w, s, zp = (idx.array(n) for n in node.input[:3])
            if s is not None and zp is not None:
                replace_initializer(g, quantize_codes(w, s, zp, attr(node, "axis", 1)), node.output[0])
                continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    remove_dead(out)
    return out


def precision_map(model: onnx.ModelProto) -> dict[str, str]:
    """``{node name: "int8" | "float"}`` for every Conv, ConvTranspose, Gemm and MatMul.

    A layer is int8 when its weight comes from DequantizeLinear and its activation input does too
    (directly or through data-movement ops / Concat, across which TensorRT moves the DQ).
    """
    idx = GraphIndex.build(model.graph)
    result: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in WEIGHTED:
            q = len(node.input) >= 2 and idx.quantized(node.input[0]) and idx.dq_of(node.input[1]) is not None
            result[node.name or node.output[0]] = "int8" if q else "float"
    return result


def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """``{ONNX tensor name: scale}`` for every per-tensor activation QuantizeLinear (keyed by its input).

    The keys are the float tensors TensorRT sees quantized, as a calibration cache names them.
    """
    idx = GraphIndex.build(model.graph)
    scales: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type == Q and node.input[0] not in idx.inits:
            s = idx.array(node.input[1])
            if s is not None and s.size == 1:
                scales[node.input[0]] = float(s.reshape(()))
    return scales


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    return _opset(model)
