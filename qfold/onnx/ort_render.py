"""Render a TensorRT-profile Q/DQ model so ONNX Runtime's CPU provider runs every quantized layer in int8.

Pure ``onnx.ModelProto -> onnx.ModelProto`` passes (no I/O, no inference). Why each step exists
(onnxruntime ``core/optimizer/qdq_transformer/selectors_actions/qdq_selectors.cc``, ORT 1.32):

1. ``DQ -> Conv -> Q`` becomes ``QLinearConv`` only when *every* input is DQ'd (a float bias blocks it:
   the bias must be an int32 DQ with scale ``s_x * s_w``) and *every* consumer of the conv output
   is a Q. x86 MLAS kernels are u8 activations x s8 weights; int8 activations are fused only where
   ``QDQIsInt8Allowed``, so activations are rewritten from int8/zero point 0 to uint8/zero point 128
   (``clamp(rint(x/s)+128, 0, 255) - 128 == clamp(rint(x/s), -128, 127)``: bit-identical).
2. ``Conv -> Relu/Clip -> Q`` fuses only when the Q makes the activation redundant (zero point at
   the type minimum). qfold removes the Relu/Clip(0, hi) itself and quantizes with uint8 / zero
   point 0, then clamps the codes to ``[0, min(127, rint(hi/s))]`` with a uint8 ``Clip``: for every x,
   ``clamp(rint(clip(x,0,hi)/s), -128, 127) == clip(clamp(rint(x/s), 0, 255), 0, min(127, rint(hi/s)))``
   (``rint`` and division by s > 0 are monotone), so the rendering stays bit-identical to TensorRT's.
3. TensorRT keeps a conv output float when it only feeds a residual Add (it fuses conv+add); ORT
   cannot, so such tensors get an extra Q/DQ from an amax the caller calibrates
   (:func:`tensors_needing_amax_for_ort`). This is the one step that is not bit-identical.
4. Q/DQ with the input's own scale is added after data-movement ops (MaxPool, Reshape, Flatten,
   Transpose, Concat of equal scales...): exact, and it lets ORT run those ops on uint8.
5. Weighted layers ORT will not fuse (ConvTranspose, convs left float) get their weight DQ folded
   into a float32 initializer (``(q - zp) * s``, what the DQ computes) so no DQ runs per inference.
6. The CPU target (:mod:`qfold.onnx.ort_target`): x86 without VNNI saturates ORT's u8 x s8 kernels, so
   the ``portable`` target stores weights as uint8 ``w + 128`` / zero point 128 (bit-identical, exact
   u8 x u8 kernels); ``vnni`` and ``arm64`` keep int8 weights (the fast kernels, exact there).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from calib.spec import scale_from_amax
from qfold.engine.cpu import resolve_target
from qfold.onnx.graph import (
    ACTIVATIONS,
    COMMUTING,
    DQ,
    GraphIndex,
    Q,
    all_names,
    attr,
    remove_dead,
    replace_initializer,
    unique_name,
)
from qfold.onnx.ort_target import render_weights_for_target


@dataclass(frozen=True)
class OrtRendering:
    """Which rendering steps :func:`render_for_ort` applies (all on by default; off for ablations).

    Attributes:
        uint8_activations: step 1, int8/zp 0 activations -> uint8/zp 128 (bit-identical).
        absorb_activations: step 2, Relu/Clip(0, hi) folded into a uint8/zp 0 Q + code clamp (bit-identical).
        extra_qdq: step 3, Q/DQ on the tensors of ``extra_amax`` (not bit-identical).
        propagate: step 4, exact Q/DQ around data-movement ops.
        int32_bias: step 1, biases of fusable layers as int32 DQ (error <= s_x * s_w / 2).
        fold_float_weights: step 5, float32 weights for layers ORT will not fuse (bit-identical).
    """

    uint8_activations: bool = True
    absorb_activations: bool = True
    extra_qdq: bool = True
    propagate: bool = True
    int32_bias: bool = True
    fold_float_weights: bool = True


_FUSABLE_CONV = ("Conv",)
_FUSABLE_ANY_OUTPUT = ("Gemm", "MatMul")


def _params(idx: GraphIndex, dq: onnx.NodeProto) -> tuple | None:
    s = idx.array(dq.input[1])
    zp = idx.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if s is None or zp is None or s.size != 1:
        return None
    return float(s.reshape(())), int(zp.reshape(())), str(zp.dtype)


def _is_activation_dq(idx: GraphIndex, name: str) -> onnx.NodeProto | None:
    dq = idx.dq_of(name)
    return dq if dq is not None and not idx.is_weight_dq(dq) else None


def _insert_qdq(model: onnx.ModelProto, tensor: str, scale: np.ndarray, zp: np.ndarray, taken: set[str]) -> None:
    """Put ``Q -> DQ`` (scale, zp) on ``tensor``; every former consumer reads the DQ output."""
    g = model.graph
    s_name = unique_name(taken, f"{tensor}_ort_scale")
    z_name = unique_name(taken, f"{tensor}_ort_zero_point")
    q_out = unique_name(taken, f"{tensor}_ort_quantized")
    dq_out = unique_name(taken, f"{tensor}_ort_dequantized")
    replace_initializer(g, np.asarray(scale, np.float32).reshape(()), s_name)
    replace_initializer(g, np.asarray(zp).reshape(()), z_name)
    for node in g.node:
        for k, i in enumerate(node.input):
            if i == tensor:
                node.input[k] = dq_out
    nodes = list(g.node)
    pos = next((k + 1 for k, n in enumerate(nodes) if tensor in n.output), 0)
    new = [onnx.helper.make_node(Q, [tensor, s_name, z_name], [q_out], name=unique_name(taken, f"{tensor}_ort_Q")),
           onnx.helper.make_node(DQ, [q_out, s_name, z_name], [dq_out], name=unique_name(taken, f"{tensor}_ort_DQ"))]
    del g.node[:]
    g.node.extend(nodes[:pos] + new + nodes[pos:])


def _propagate_through_commuting(model: onnx.ModelProto, taken: set[str]) -> None:
    """Step 4: exact Q/DQ after data-movement ops whose quantized inputs share one (scale, zp)."""
    changed = True
    while changed:
        changed = False
        idx = GraphIndex.build(model.graph)
        for node in model.graph.node:
            if node.op_type not in COMMUTING + ("Concat",):
                continue
            data = list(node.input) if node.op_type == "Concat" else [node.input[0]]
            dqs = [_is_activation_dq(idx, t) for t in data]
            if not dqs or any(d is None for d in dqs):
                continue
            params = {_params(idx, d) for d in dqs}
            out = node.output[0]
            users = idx.users(out)
            if len(params) != 1 or None in params or out in idx.outputs or not users:
                continue
            if all(u.op_type == Q for u in users):
                continue
            d = dqs[0]
            _insert_qdq(model, out, idx.array(d.input[1]), idx.array(d.input[2]), taken)
            changed = True
            break


def _propagate_backward(model: onnx.ModelProto, taken: set[str]) -> None:
    """Step 4, backwards: ``x -> MaxPool -> Q`` gets an exact ``Q -> DQ`` (same params) on x, so the
    conv that produces x can fuse (``Q(op(x)) == op(Q(x))`` for monotone data-movement ops)."""
    changed = True
    while changed:
        changed = False
        idx = GraphIndex.build(model.graph)
        for node in model.graph.node:
            if node.op_type not in COMMUTING:
                continue
            src, out = node.input[0], node.output[0]
            users = idx.users(out)
            if (src in idx.inits or idx.dq_of(src) is not None or len(idx.users(src)) != 1 or src in idx.outputs
                    or not users or not all(u.op_type == Q for u in users)):
                continue
            params = {_params(idx, u) for u in users}
            if len(params) != 1 or None in params:
                continue
            q = users[0]
            _insert_qdq(model, src, idx.array(q.input[1]), idx.array(q.input[2]), taken)
            changed = True
            break


def _quantized_output(idx: GraphIndex, node: onnx.NodeProto) -> str:
    """The tensor a fused kernel would write: the op's output, or its single Relu/Clip(0, hi)'s output."""
    out = node.output[0]
    users = idx.users(out)
    if len(users) == 1 and users[0].op_type in ACTIVATIONS and _clip_low(idx, users[0]) == 0.0:
        return users[0].output[0]
    return out


def _clip_low(idx: GraphIndex, act: onnx.NodeProto) -> float | None:
    if act.op_type == "Relu":
        return 0.0
    lo = idx.array(act.input[1]) if len(act.input) > 1 and act.input[1] else None
    return None if lo is None or lo.size != 1 else float(lo.reshape(()))


def _clip_high(idx: GraphIndex, act: onnx.NodeProto) -> float:
    hi = idx.array(act.input[2]) if act.op_type == "Clip" and len(act.input) > 2 and act.input[2] else None
    return float("inf") if hi is None or hi.size != 1 else float(hi.reshape(()))


def _needs(idx: GraphIndex, will_be_dq: set[str]) -> list[str]:
    """Tensors (in graph order) that must be quantized for ORT to fuse a quantized Conv or Add."""
    needed: list[str] = []
    for node in idx.graph.node:
        if node.op_type in _FUSABLE_CONV:
            if not (_is_activation_dq(idx, node.input[0]) and idx.dq_of(node.input[1])):
                continue
        elif node.op_type == "Add":
            ins = [i for i in node.input if i not in idx.inits]
            if len(ins) != 2 or not all(_is_activation_dq(idx, i) or i in will_be_dq for i in ins):
                continue
        else:
            continue
        t = _quantized_output(idx, node)
        users = idx.users(t)
        if t in idx.outputs or node.output[0] in idx.outputs or not users or any(u.op_type == Q for u in users):
            continue
        needed.append(t)
        will_be_dq.add(t)
    return needed


def tensors_needing_amax_for_ort(model: onnx.ModelProto) -> list[str]:
    """ONNX tensor names whose amax :func:`render_for_ort` needs so every quantized Conv and residual
    Add fuses in ONNX Runtime (conv outputs TensorRT leaves float, Add outputs feeding float ops).

    Call it on the normalized (TensorRT-profile) model; the names are stable across rendering.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    taken = all_names(m.graph)
    _propagate_backward(m, taken)
    _propagate_through_commuting(m, taken)
    return _needs(GraphIndex.build(m.graph), set())


def _absorb_activations(model: onnx.ModelProto) -> dict[str, int]:
    """Step 2: drop Relu/Clip(0, hi) whose consumers are all Qs; returns {Q name: top int8 code}."""
    idx = GraphIndex.build(model.graph)
    tops: dict[str, int] = {}
    drop: set[str] = set()
    for act in model.graph.node:
        if act.op_type not in ACTIVATIONS or _clip_low(idx, act) != 0.0:
            continue
        users = idx.users(act.output[0])
        if not users or act.output[0] in idx.outputs or not all(u.op_type == Q for u in users):
            continue
        if any(_params(idx, u) is None or _params(idx, u)[1] != 0 for u in users):
            continue
        hi = _clip_high(idx, act)
        for q in users:
            s = np.float32(idx.array(q.input[1]).reshape(()))
            top = 127 if not np.isfinite(hi) else int(min(127.0, float(np.rint(np.float32(hi) / s))))
            tops[q.name] = top
            q.input[0] = act.input[0]
        drop.add(act.output[0])
    keep = [n for n in model.graph.node if n.output[0] not in drop]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return tops


def _fed_by_clamped(idx: GraphIndex, q: onnx.NodeProto, clamped: set[str]) -> bool:
    """``q`` reads a data-movement op / Concat whose inputs are all DQs of clamped codes with q's scale."""
    p = idx.producer.get(q.input[0])
    if p is None or p.op_type not in COMMUTING + ("Concat",):
        return False
    data = list(p.input) if p.op_type == "Concat" else [p.input[0]]
    scale = _params(idx, q)[0]
    for t in data:
        dq = idx.dq_of(t)
        s = idx.array(dq.input[1]) if dq is not None else None
        if s is None or s.size != 1 or float(s.reshape(())) != scale:
            return False
        if dq.input[0] not in clamped:
            return False
    return True


def _to_uint8(model: onnx.ModelProto, tops: dict[str, int], taken: set[str]) -> None:
    """Step 1/2: activation Q/DQ int8 zp 0 -> uint8 zp 128, or zp 0 plus a code clamp after a removed Relu."""
    g = model.graph
    idx = GraphIndex.build(g)
    zp128, zp0 = unique_name(taken, "qfold_ort_uint8_zp128"), unique_name(taken, "qfold_ort_uint8_zp0")
    replace_initializer(g, np.array(128, np.uint8), zp128)
    replace_initializer(g, np.array(0, np.uint8), zp0)
    new_nodes: list[onnx.NodeProto] = []
    clamped: set[str] = set()  # Q outputs holding uint8 / zero point 0 codes in [0, 127]
    for node in g.node:
        new_nodes.append(node)
        if node.op_type != Q or node.input[0] in idx.inits or _params(idx, node) is None:
            continue
        if _params(idx, node)[1:] != (0, "int8"):
            continue
        top = tops.get(node.name)
        if top is None and _fed_by_clamped(idx, node, clamped):
            top = -1  # the input is already clamped to [0, top*s]: zero point 0 and no clamp needed
        zp = zp128 if top is None else zp0
        node.input[2] = zp
        dqs = [u for u in idx.users(node.output[0]) if u.op_type == DQ]
        src = node.output[0]
        if top is not None:
            clamped.add(node.output[0])
        if top is not None and top >= 0:
            lo, hi = unique_name(taken, f"{node.name}_ort_code_min"), unique_name(taken, f"{node.name}_ort_code_max")
            replace_initializer(g, np.array(0, np.uint8), lo)
            replace_initializer(g, np.array(top, np.uint8), hi)
            src = unique_name(taken, f"{node.output[0]}_clamped")
            new_nodes.append(onnx.helper.make_node("Clip", [node.output[0], lo, hi], [src],
                                                   name=unique_name(taken, f"{node.name}_ort_code_clamp")))
        if top is not None:
            clamped.add(src)
        for dq in dqs:
            dq.input[0] = src
            dq.input[2] = zp
    del g.node[:]
    g.node.extend(new_nodes)


def _bias_to_int32_and_fold_unfused(model: onnx.ModelProto, taken: set[str], rendering: OrtRendering) -> None:
    """Steps 1 and 5: int32 bias DQ on fusable Conv/Gemm; float weights on weighted ops ORT will not fuse."""
    g = model.graph
    idx = GraphIndex.build(g)
    extra: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        xdq, wdq = _is_activation_dq(idx, node.input[0]), idx.dq_of(node.input[1])
        if wdq is None or not idx.is_weight_dq(wdq) or wdq.input[0] not in idx.inits:
            continue
        out_users = idx.users(node.output[0])
        fuses = xdq is not None and (
            node.op_type in _FUSABLE_ANY_OUTPUT
            or (node.op_type in _FUSABLE_CONV and out_users and all(u.op_type == Q for u in out_users)
                and node.output[0] not in idx.outputs))
        if node.op_type == "Gemm" and fuses and attr(node, "transA", 0):
            fuses = False
        bias = idx.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if fuses and bias is not None and rendering.int32_bias:
            s_x = np.float32(idx.array(xdq.input[1]).reshape(()))
            s_w = np.asarray(idx.array(wdq.input[1]), np.float32).reshape(-1)
            s_b = (s_x * s_w).astype(np.float32)
            s_b = np.broadcast_to(s_b, bias.shape).copy() if s_b.size == 1 else s_b
            codes = np.rint(bias.astype(np.float64) / s_b.astype(np.float64))
            if np.all(np.abs(codes) < 2**31 - 1) and s_b.shape == bias.shape:
                base = node.input[2]
                q_name = unique_name(taken, f"{base}_ort_int32")
                s_name = unique_name(taken, f"{base}_ort_scale")
                z_name = unique_name(taken, f"{base}_ort_zero_point")
                out = unique_name(taken, f"{base}_ort_dequantized")
                replace_initializer(g, codes.astype(np.int32), q_name)
                replace_initializer(g, s_b, s_name)
                replace_initializer(g, np.zeros(bias.shape, np.int32), z_name)
                extra.append(onnx.helper.make_node(DQ, [q_name, s_name, z_name], [out], axis=0,
                                                   name=unique_name(taken, f"{base}_ort_DQ")))
                node.input[2] = out
            else:
                fuses = False
        elif bias is not None:
            fuses = False
        if not fuses and node.op_type != "MatMul" and rendering.fold_float_weights:
            w = idx.array(wdq.input[0]).astype(np.float32)
            s = np.asarray(idx.array(wdq.input[1]), np.float32)
            zp = idx.array(wdq.input[2]).astype(np.float32) if len(wdq.input) > 2 and wdq.input[2] else 0
            if s.ndim == 1:
                shape = [1] * w.ndim
                shape[attr(wdq, "axis", 1)] = -1
                s = s.reshape(shape)
                zp = np.reshape(zp, shape) if np.ndim(zp) else zp
            name = unique_name(taken, f"{node.input[1]}_ort_float")
            replace_initializer(g, ((w - zp) * s).astype(np.float32), name)
            node.input[1] = name
    nodes = extra + list(g.node)
    del g.node[:]
    g.node.extend(nodes)


def render_for_ort(model: onnx.ModelProto, extra_amax: Mapping[str, float] | None = None,
                   rendering: OrtRendering = OrtRendering(), target: str = "auto") -> onnx.ModelProto:
    """The ONNX Runtime rendering of a normalized TensorRT-profile Q/DQ model (a new model).

    Args:
        model: output of :func:`qfold.onnx.qdq.normalize_qdq`.
        extra_amax: amax per tensor named by :func:`tensors_needing_amax_for_ort`; tensors without
            one stay float (their conv/Add then runs in float, correct but slower).
        rendering: which steps to apply (ablations); the default applies all.
        target: the CPU class (``vnni``, ``portable``, ``arm64``) whose kernels must compute the graph
            exactly; ``auto`` (the only input that is not pure) is the CPU this runs on
            (:func:`qfold.engine.ort_cpu.detect_cpu`).

    Bit-identical to the TensorRT profile except for the extra Q/DQ of ``extra_amax`` and the int32
    rounding of biases (``|error| <= s_x * s_w / 2``), see the module docstring.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    taken = all_names(m.graph)
    if rendering.propagate:
        _propagate_backward(m, taken)
        _propagate_through_commuting(m, taken)
    extra_amax = dict(extra_amax or {}) if rendering.extra_qdq else {}
    unknown = sorted(set(extra_amax) - set(all_names(m.graph)))
    if unknown:
        raise KeyError(f"extra_amax names tensors that are not in the model: {unknown[:5]}; use the names "
                       "from tensors_needing_amax_for_ort(model).")
    for t in _needs(GraphIndex.build(m.graph), set()):
        if t in extra_amax:
            _insert_qdq(m, t, scale_from_amax(extra_amax[t]), np.array(0, np.int8), taken)
    if rendering.propagate:
        _propagate_through_commuting(m, taken)
    tops = _absorb_activations(m) if rendering.absorb_activations and rendering.uint8_activations else {}
    if rendering.uint8_activations:
        _to_uint8(m, tops, taken)
    _bias_to_int32_and_fold_unfused(m, taken, rendering)
    remove_dead(m)
    if target == "auto":
        from qfold.engine.ort_cpu import (
            detect_cpu,  # the one impure input: the CPU this runs on
        )

        target = resolve_target(target, detect_cpu())
    return render_weights_for_target(m, resolve_target(target))
