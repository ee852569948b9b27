"""Hand-built ONNX graphs and ONNX Runtime probes shared by the ONNX, fp16, TensorRT and CPU-target tests."""
from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from calib.spec import scale_from_amax


def qdq_conv(w: np.ndarray, x_amax: float, *, bias: np.ndarray | None = None, relu: bool = False, hw: int = 6,
             scale_dtype: type = np.float32, opset: int = 17, name: str = "conv") -> onnx.ModelProto:
    """x[N,cin,hw,hw] -> Q/DQ -> Conv 3x3 pad 1 (weights ``w`` with per-channel Q/DQ, axis 0) [-> Relu] -> y.

    Scales are stored as ``scale_dtype``; the batch is dynamic (``N``).
    """
    cout, cin = w.shape[:2]
    inits = [
        numpy_helper.from_array(w.astype(np.float32), "W"),
        numpy_helper.from_array(np.array(scale_from_amax(x_amax)).astype(scale_dtype), "sx"),
        numpy_helper.from_array(np.array(0, np.int8), "zx"),
        numpy_helper.from_array(scale_from_amax(np.abs(w).reshape(cout, -1).max(1)).astype(scale_dtype), "sw"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "zw"),
    ]
    conv_in = ["xd", "wd"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "B"))
        conv_in.append("B")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("QuantizeLinear", ["W", "sw", "zw"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("Conv", conv_in, ["c" if relu else "y"], pads=[1, 1, 1, 1]),
    ] + ([helper.make_node("Relu", ["c"], ["y"])] if relu else [])
    g = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, hw, hw])], inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def optimized_op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Op types of ``model`` after ONNX Runtime's extended graph optimizations (the kernels it would run)."""
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def run_ort(model: onnx.ModelProto, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    """``model``'s first output on ``x`` in ONNX Runtime (CPU, one thread), all graph optimizations on or off."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
