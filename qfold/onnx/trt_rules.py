"""TensorRT explicit-quantization rules, checked on a Q/DQ ``onnx.ModelProto`` (pure, no I/O).

Rules (docs/tensorrt-qdq-rules.md; TensorRT developer guide "Explicit
Quantization"; ModelOpt ``modelopt/onnx/quantization``):

============================  ==========================================================================
rule                          meaning
============================  ==========================================================================
``input-not-quantized``       a Conv/ConvTranspose/Gemm/MatMul not listed as float lacks a DQ'd activation
``weight-not-quantized``      ... or lacks a DQ'd constant weight
``weight-axis``               per-channel weight axis: Conv 0, ConvTranspose 1, Gemm 0 (transB=1) / 1,
                              MatMul rank-1 (the last axis of B); ``axis`` must be written and the
                              scale length must match
``zero-point``                every Q/DQ has an explicit int8 zero point that is all zeros
``scale``                     every scale is a constant, finite, strictly positive float32, float16
                              or bfloat16 (the FP16-fallback graph of :mod:`qfold.onnx.fp16` has float16
                              scales); a float16/bfloat16 scale of a Q of a constant has the
                              constant's type
``per-tensor-activation``     activation (non-constant) Q/DQ have one scale
``qdq-in-fusion``             no Q/DQ between Conv/ConvTranspose/BN and a following BN/Relu/Clip
``output-quantized``          a Q on a conv/BN/activation output whose DQ feeds no quantized input
``residual-add``              an Add fed by a conv branch has Q/DQ on its skip input only
``concat-scale``              all quantized inputs of a Concat share one scale
``clip-bounds``               Clip min/max are initializers
``bias-quantized``            biases stay float (no DQ on Conv/Gemm input 2)
============================  ==========================================================================
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx

from qfold.onnx.graph import COMMUTING, DQ, WEIGHTED, GraphIndex, Q, attr

_EPILOGUE_PRODUCERS = ("Conv", "ConvTranspose", "BatchNormalization")
_EPILOGUE_CONSUMERS = ("BatchNormalization", "Relu", "Clip")


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` (see module table), the node it concerns, and what to do."""

    rule: str
    node: str
    message: str


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


_SCALE_DTYPES = ("float32", "float16", "bfloat16")  # IQuantizeLayer scale types (NvInfer.h, 10.x and 11.x)


def _weight_axis(node: onnx.NodeProto, weight_rank: int | None) -> int:
    """The output-channel axis of a weighted op's weight input.

    TensorRT quantizes weights per channel along an axis "relative to the input dimensions"
    (IQuantizeLayer::setAxis, include/NvInfer.h) with a 1-D scale as long as that axis. For
    MatMul ``A @ B`` the output channels are B's last axis whatever B's rank: ``(K, N)`` -> 1,
    ``(G, K, N)`` -> 2. Conv ``(K, C, R, S)`` -> 0, ConvTranspose ``(C, K/g, R, S)`` -> 1, Gemm -> 0
    with ``transB=1`` (PyTorch Linear) else 1.
    """
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return (weight_rank or 2) - 1
    return 0


def _conv_fed(idx: GraphIndex, tensor: str) -> bool:
    """True when ``tensor`` is a weighted op's output, possibly through BN/Relu/Clip (the fused epilogue)."""
    p = idx.producer.get(tensor)
    while p is not None and p.op_type in _EPILOGUE_CONSUMERS:
        p = idx.producer.get(p.input[0])
    return p is not None and p.op_type in WEIGHTED


def _dq_feeds_quantized_input(idx: GraphIndex, dq: onnx.NodeProto, depth: int = 0) -> bool:
    """Does this DQ's value reach a quantized consumer (weighted op, Add skip, Concat, via commuting ops)?"""
    for user in idx.users(dq.output[0]):
        if user.op_type in WEIGHTED or user.op_type in ("Add", "Concat"):
            return True
        if user.op_type in COMMUTING and depth < 8:
            for nxt in idx.users(user.output[0]):
                if nxt.op_type in (Q,) or nxt.op_type in WEIGHTED:
                    return True
    return False


def _check_qdq_params(idx: GraphIndex, node: onnx.NodeProto, out: list[Violation]) -> None:
    n = _name(node)
    scale = idx.array(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        out.append(Violation("scale", n, f"{node.op_type} '{n}' has no constant scale; fold the scale "
                                          "computation into an initializer (qfold.onnx.qdq.normalize_qdq)."))
    elif str(scale.dtype) not in _SCALE_DTYPES or not np.all(np.isfinite(scale.astype(np.float32))) \
            or np.any(scale.astype(np.float32) <= 0):
        out.append(Violation("scale", n, f"{node.op_type} '{n}' scale must be finite, > 0 and one of "
                                          f"{'/'.join(_SCALE_DTYPES)} (dtype {scale.dtype}, min "
                                          f"{float(np.min(scale.astype(np.float32))):.3g}); replace amax == 0 by "
                                          "calib.spec.TINY_AMAX."))
    elif node.op_type == Q and node.input[0] in idx.inits and str(scale.dtype) != "float32":
        # "For strongly typed networks, if the scale data type is kHALF or kBF16, it must match the
        # input data type" (IQuantizeLayer, include/NvInfer.h, NVIDIA/TensorRT main = 11.1)
        x = idx.array(node.input[0])
        if x is not None and x.dtype != scale.dtype:
            out.append(Violation("scale", n, f"Q '{n}' quantizes a {x.dtype} constant with a {scale.dtype} scale; "
                                              "TensorRT (strongly typed) needs the same type: convert both."))
    zp = idx.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
        what = "missing (ONNX then means uint8)" if zp is None else f"{zp.dtype} with values {np.unique(zp)[:4]}"
        out.append(Violation("zero-point", n, f"{node.op_type} '{n}' zero point is {what}; TensorRT needs an "
                                               "int8 initializer of zeros (symmetric int8)."))
    is_weight = node.input[0] in idx.inits or (node.op_type == DQ and idx.is_weight_dq(node))
    if not is_weight and scale is not None and scale.size != 1:
        out.append(Violation("per-tensor-activation", n, f"activation {node.op_type} '{n}' has {scale.size} scales; "
                                                          "TensorRT quantizes activations per tensor only."))


def _check_weighted(idx: GraphIndex, node: onnx.NodeProto, float_layers: Collection[str], out: list[Violation]) -> None:
    n = _name(node)
    if len(node.input) > 2 and node.input[2] and idx.dq_of(node.input[2]) is not None:
        out.append(Violation("bias-quantized", n, f"bias of '{n}' is dequantized; keep biases float32 "
                                                   "(TensorRT quantizes them itself)."))
    if n in float_layers:
        return
    if not idx.quantized(node.input[0]):
        out.append(Violation("input-not-quantized", n, f"activation input of {node.op_type} '{n}' has no Q/DQ; "
                                                        "quantize it or list the layer as float."))
    wdq = idx.dq_of(node.input[1]) if len(node.input) > 1 else None
    if wdq is None or (node.op_type != "MatMul" and not idx.is_weight_dq(wdq)):
        out.append(Violation("weight-not-quantized", n, f"weight of {node.op_type} '{n}' is not a dequantized "
                                                         "constant; quantize it per channel or list the layer as float."))
        return
    scale = idx.array(wdq.input[1])
    if scale is None or scale.size == 1 or node.op_type == "MatMul" and not idx.is_weight_dq(wdq):
        return  # per-tensor weights are legal
    w = idx.array(wdq.input[0])
    if w is None and wdq.input[0] in idx.producer:  # DQ(Q(W)) before normalization
        w = idx.array(idx.producer[wdq.input[0]].input[0])
    want = _weight_axis(node, None if w is None else w.ndim)
    got = attr(wdq, "axis")
    if got is not None and w is not None and got < 0:
        got += w.ndim  # ONNX allows negative axes
    if got is None:
        out.append(Violation("weight-axis", n, f"weight DQ of '{n}' has no axis attribute (TensorRT assumes 0, "
                                                f"ONNX 1); write axis={want}."))
    elif got != want:
        out.append(Violation("weight-axis", n, f"weight DQ of {node.op_type} '{n}' uses axis {got}; TensorRT "
                                                f"expects {want} (output channels)."))
    elif w is not None and w.shape[want] != scale.size:
        out.append(Violation("weight-axis", n, f"weight of '{n}' has {w.shape[want]} channels on axis {want} but "
                                                f"{scale.size} scales."))


def _check_q_placement(idx: GraphIndex, q: onnx.NodeProto, out: list[Violation]) -> None:
    src = idx.producer.get(q.input[0])
    if src is None or src.op_type not in WEIGHTED + _EPILOGUE_CONSUMERS:
        return
    dqs = [u for u in idx.users(q.output[0]) if u.op_type == DQ]
    if src.op_type in _EPILOGUE_PRODUCERS and any(
            v.op_type in _EPILOGUE_CONSUMERS for d in dqs for v in idx.users(d.output[0])):
        out.append(Violation("qdq-in-fusion", _name(q), f"Q/DQ '{_name(q)}' sits between {src.op_type} "
                                                         f"'{_name(src)}' and its BN/Relu/Clip; TensorRT fuses them: remove it."))
        return
    if _conv_fed(idx, q.input[0]) and not any(_dq_feeds_quantized_input(idx, d) for d in dqs):
        out.append(Violation("output-quantized", _name(q), f"Q '{_name(q)}' quantizes the output of "
                                                            f"'{_name(src)}' but feeds no quantized layer; remove it "
                                                            "(TensorRT: do not quantize weighted-op outputs)."))


def _check_add(idx: GraphIndex, node: onnx.NodeProto, out: list[Violation]) -> None:
    ins = [i for i in node.input if i and i not in idx.inits]
    if len(ins) != 2:
        return
    quantized, conv_branch = [], []
    for t in ins:
        dq = idx.dq_of(t)
        quantized.append(dq is not None)
        if dq is None:
            conv_branch.append(_conv_fed(idx, t))
        else:
            q = idx.producer.get(dq.input[0])
            src = q.input[0] if q is not None and q.op_type == Q else None
            conv_branch.append(src is not None and _conv_fed(idx, src) and _only_add_users(idx, src))
    if not any(conv_branch):
        return
    n = _name(node)
    if all(quantized):
        out.append(Violation("residual-add", n, f"both inputs of residual Add '{n}' are quantized; drop the Q/DQ "
                                                 "on the conv branch so TensorRT fuses conv+add."))
    elif not any(quantized):
        out.append(Violation("residual-add", n, f"the skip input of residual Add '{n}' has no Q/DQ; quantize it "
                                                 "so the fused conv+add runs int8 end to end."))


def _only_add_users(idx: GraphIndex, tensor: str) -> bool:
    """The quantized conv output goes to Adds only (not also to a weighted layer: a linear bottleneck)."""
    for q in idx.users(tensor):
        if q.op_type != Q:
            continue
        for dq in idx.users(q.output[0]):
            if any(u.op_type in WEIGHTED for u in idx.users(dq.output[0])):
                return False
    return True


def _check_concat(idx: GraphIndex, node: onnx.NodeProto, out: list[Violation]) -> None:
    scales = set()
    for t in node.input:
        dq = idx.dq_of(t)
        if dq is not None:
            s = idx.array(dq.input[1])
            if s is not None:
                scales.add(tuple(np.asarray(s, np.float32).ravel().tolist()))
    if len(scales) > 1:
        out.append(Violation("concat-scale", _name(node), f"inputs of Concat '{_name(node)}' use {len(scales)} "
                                                           "different scales; share one (amax = max over inputs)."))


def check_trt_rules(model: onnx.ModelProto, float_layers: Collection[str] = ()) -> list[Violation]:
    """Every TensorRT explicit-quantization rule the model breaks, in graph order (empty when clean).

    Args:
        model: a Q/DQ model, ideally after :func:`qfold.onnx.qdq.normalize_qdq`.
        float_layers: node names of weighted layers deliberately kept in float.
    """
    idx = GraphIndex.build(model.graph)
    out: list[Violation] = []
    float_layers = set(float_layers)
    for node in model.graph.node:
        if node.op_type in (Q, DQ):
            _check_qdq_params(idx, node, out)
            if node.op_type == Q:
                _check_q_placement(idx, node, out)
        elif node.op_type in WEIGHTED:
            _check_weighted(idx, node, float_layers, out)
        elif node.op_type == "Add":
            _check_add(idx, node, out)
        elif node.op_type == "Concat":
            _check_concat(idx, node, out)
        elif node.op_type == "Clip" and any(i and i not in idx.inits for i in node.input[1:]):
            out.append(Violation("clip-bounds", _name(node), f"Clip '{_name(node)}' bounds are not "
                                                              "initializers; run normalize_qdq (constant folding)."))
    return out


__all__ = ["Violation", "check_trt_rules"]
