"""The CPU-specific last step of the ONNX Runtime rendering, and a static check that it is safe.

Pure ``onnx.ModelProto`` passes. x86 CPUs without VNNI run ONNX Runtime's u8 x s8 int8 kernels with
``vpmaddubsw``, which sums *pairs* of u8*s8 products into a saturating int16; the portable target
stores every weight as unsigned instead, ``u = w + 128`` with zero point ``zp + 128``: the
DequantizeLinear computes ``(u - (zp + 128)) * s == (w - zp) * s``, so the rendering is
bit-identical, and ONNX Runtime then picks its u8 x u8 kernels, which widen to int16 and
accumulate pairs into int32 (``vpmaddwd``): no saturation. See docs/cpu-int8-targets.md.
"""
from __future__ import annotations

import numpy as np
import onnx

from qfold.engine.cpu import TARGETS, WEIGHT_TYPE
from qfold.onnx.graph import (
    WEIGHTED,
    GraphIndex,
    all_names,
    remove_dead,
    replace_initializer,
    unique_name,
)

#: int16 saturates above this; ``vpmaddubsw`` adds two u8 * s8 products.
INT16_MAX = 32767
#: the largest uint8 activation code.
U8_MAX = 255


def max_pair_sum(weight_absmax: int, act_max: int = U8_MAX) -> int:
    """The largest ``|a1*w1 + a2*w2|`` a ``vpmaddubsw`` pair can reach (``a`` in [0, act_max])."""
    return 2 * act_max * int(weight_absmax)


def _weight_dqs(idx: GraphIndex) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes reading an initializer and feeding a weighted op's weight input."""
    out = []
    for node in idx.graph.node:
        if node.op_type in WEIGHTED and len(node.input) > 1:
            dq = idx.dq_of(node.input[1])
            if dq is not None and dq.input[0] in idx.inits and dq not in out:
                out.append(dq)
    return out


def weights_to_uint8(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model whose int8 weight DequantizeLinears read uint8 ``w + 128`` with zero point ``zp + 128``.

    Exact (the DQ output is bit-identical); activations and int32 biases are left as they are.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    idx = GraphIndex.build(m.graph)
    taken = all_names(m.graph)
    renamed: dict[str, str] = {}
    for dq in _weight_dqs(idx):
        w = idx.array(dq.input[0])
        if w is None or w.dtype != np.int8:
            continue
        zp = idx.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int8)
        for k, arr in ((0, w), (2, zp)):
            src = dq.input[k] if k < len(dq.input) and dq.input[k] else f"{dq.input[0]}_zero_point"
            if src not in renamed:
                renamed[src] = unique_name(taken, f"{src}_u8")
                replace_initializer(m.graph, (arr.astype(np.int16) + 128).astype(np.uint8), renamed[src])
            while len(dq.input) <= k:
                dq.input.append("")
            dq.input[k] = renamed[src]
    remove_dead(m)
    return m


def render_weights_for_target(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """The last rendering step for a CPU target (:data:`qfold.engine.cpu.TARGETS`): ``portable``
    stores weights as uint8 (exact u8 x u8 kernels); ``vnni``/``arm64`` keep int8 (a copy)."""
    if target not in TARGETS:
        raise ValueError(f"unknown cpu target {target!r}; known: {', '.join(TARGETS)}.")
    if WEIGHT_TYPE[target] == "uint8":
        return weights_to_uint8(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def int16_pair_sum_risks(model: onnx.ModelProto, target: str) -> list[str]:
    """Weights of ``model`` that an int8 kernel of ``target`` could saturate on, as readable lines.

    Static, on the graph alone: on ``portable`` every weight feeding a Conv/Gemm/MatMul must be
    uint8 (u8 x u8 kernels widen before they add pairs) or small enough that two u8 x s8 products
    fit int16 (``2 * 255 * max|w - zp| <= 32767``, i.e. ``|w| <= 64``). ``vnni`` and ``arm64``
    accumulate in int32 (no pair sums), so nothing is at risk there. Empty list: safe.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown cpu target {target!r}; known: {', '.join(TARGETS)}.")
    if WEIGHT_TYPE[target] == "uint8":
        idx = GraphIndex.build(model.graph)
        risks = []
        for dq in _weight_dqs(idx):
            w = idx.array(dq.input[0])
            if w is None or w.dtype != np.int8:
                continue
            zp = idx.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int8)
            shape = [1] * w.ndim
            if np.ndim(zp) == 1 and w.ndim > 1:
                shape[next((a.i for a in dq.attribute if a.name == "axis"), 1)] = -1
            peak = int(np.abs(w.astype(np.int32) - np.reshape(zp, shape if np.ndim(zp) else ()).astype(np.int32)).max())
            if max_pair_sum(peak) > INT16_MAX:
                risks.append(f"{dq.input[0]}: int8 weights up to |{peak}|, 2*255*{peak} = {max_pair_sum(peak)} > {INT16_MAX}")
        return risks
    return []


def weight_types(model: onnx.ModelProto) -> set[str]:
    """Element types of the weights feeding weighted ops through a DequantizeLinear (``int8``/``uint8``)."""
    idx = GraphIndex.build(model.graph)
    return {str(idx.array(dq.input[0]).dtype) for dq in _weight_dqs(idx)}


__all__ = ["INT16_MAX", "int16_pair_sum_risks", "max_pair_sum", "render_weights_for_target", "weight_types",
           "weights_to_uint8"]
