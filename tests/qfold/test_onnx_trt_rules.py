"""check_trt_rules on the FP16-fallback graph (float16/bfloat16 scales) and on MatMul weights of any rank."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import qdq_conv

from calib.spec import scale_from_amax
from qfold.onnx.fp16 import convert_float_to_fp16
from qfold.onnx.trt_rules import check_trt_rules


def _conv_qdq(scale_dtype=np.float32) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(W: per-channel Q/DQ, axis 0) -> y; scales stored as ``scale_dtype``."""
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    return qdq_conv(w, 3.0, scale_dtype=scale_dtype)


def test_fp16_fallback_graph_passes_the_rule_check_and_runs():
    m32 = _conv_qdq()
    assert check_trt_rules(m32) == []
    m16 = convert_float_to_fp16(m32, keep_io_types=True)
    scale_types = {i.name: i.data_type for i in m16.graph.initializer if i.name in ("sx", "sw")}
    assert set(scale_types.values()) == {TensorProto.FLOAT16}  # what TensorRT parses for FP16 fallback
    assert check_trt_rules(m16) == []
    x = np.random.default_rng(1).uniform(-3, 3, (2, 4, 6, 6)).astype(np.float32)
    run = {k: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for k, m in (("fp32", m32), ("fp16", m16))}
    assert np.abs(run["fp16"] - run["fp32"]).max() <= 0.02 * np.abs(run["fp32"]).max()


def test_scale_types_float16_bfloat16_allowed_float64_refused():
    m = _conv_qdq()
    bf16 = helper.make_tensor("sx", TensorProto.BFLOAT16, [], [float(scale_from_amax(3.0))])
    for i, init in enumerate(m.graph.initializer):
        if init.name == "sx":
            m.graph.initializer[i].CopyFrom(bf16)
    assert check_trt_rules(m) == []
    v = check_trt_rules(_conv_qdq(np.float64))
    assert {x.rule for x in v} == {"scale"} and "float32/float16/bfloat16 (dtype float64" in v[0].message


def test_weight_q_needs_the_scale_type_of_its_constant():
    m = _conv_qdq(np.float16)  # float32 W quantized with a float16 scale: not strongly typed
    v = [x for x in check_trt_rules(m) if "constant with a" in x.message]
    assert len(v) == 1 and v[0].rule == "scale" and "float32 constant with a float16 scale" in v[0].message


def _matmul_qdq(w_shape: tuple[int, ...], axis: int, scale_axis: int | None = None) -> onnx.ModelProto:
    """x[..., K] -> Q/DQ -> MatMul(x, DQ(W int8, per-channel along ``axis``)) -> y."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    sa = axis % len(w_shape) if scale_axis is None else scale_axis
    amax = np.abs(w).max(axis=tuple(d for d in range(w.ndim) if d != sa))
    sw = scale_from_amax(amax)
    shape = [1 if d != sa else -1 for d in range(w.ndim)]
    wq = np.clip(np.round(w / sw.reshape(shape)), -128, 127).astype(np.int8)
    k = w_shape[-2]
    x_shape = ["N", k] if len(w_shape) == 2 else [w_shape[0], "N", k]
    y_shape = [*x_shape[:-1], w_shape[-1]]
    inits = [
        numpy_helper.from_array(wq, "Wq"),
        numpy_helper.from_array(sw, "sw"),
        numpy_helper.from_array(np.zeros(sw.size, np.int8), "zw"),
        numpy_helper.from_array(np.array(scale_from_amax(2.0), np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.int8), "zx"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["wd"], axis=axis),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("w_shape, axis", [((16, 8), 1), ((16, 8), -1), ((3, 16, 8), 2), ((3, 16, 8), -1)])
def test_matmul_weight_axis_is_the_last_axis_of_b_at_any_rank(w_shape, axis):
    assert check_trt_rules(_matmul_qdq(w_shape, axis)) == []


@pytest.mark.parametrize("w_shape, axis, want", [((16, 8), 0, 1), ((3, 16, 8), 1, 2), ((3, 16, 8), 0, 2)])
def test_matmul_weight_axis_other_than_the_last_is_flagged(w_shape, axis, want):
    v = check_trt_rules(_matmul_qdq(w_shape, axis))
    assert [x.rule for x in v] == ["weight-axis"] and f"uses axis {axis}; TensorRT expects {want}" in v[0].message
