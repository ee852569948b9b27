"""Ask ONNX Runtime itself whether its u8 x s8 int8 kernels saturate on the CPU this process runs on.

``/proc/cpuinfo`` says which instructions a CPU has; what matters is which kernel ONNX Runtime's
MLAS picks and what it computes. The probe runs the two u8 x s8 paths the engine uses (the GEMM
behind MatMulInteger / im2col convolutions, and the direct QLinearConv kernel) on inputs where
every pair of products is ``255 * 127 * 2 = 64,770 > 32,767``: exact kernels return
``64 * 255 * 127``, kernels that add pairs into a saturating int16 return about half. A few
milliseconds, once per process. It also works where the flags are missing (macOS, Windows) or are
not the CPU's (user-mode emulation passes the host's ``/proc/cpuinfo`` through).
"""
from __future__ import annotations

import functools

import numpy as np

from qfold.engine.cpu import CpuInfo, detect

_K = 64  # reduction length: 32 pairs, large enough for the packed kernels


def _probe_model():
    from onnx import TensorProto, helper, numpy_helper

    exact = 255 * 127 * _K
    inits = [numpy_helper.from_array(np.full((_K, 16), 127, np.int8), "b"),
             numpy_helper.from_array(np.full((16, _K, 1, 1), 127, np.int8), "w"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp_u8"),
             numpy_helper.from_array(np.array(0, np.int8), "zp_s8"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(exact / 200.0, np.float32), "y_scale")]  # exact -> code 200
    nodes = [helper.make_node("MatMulInteger", ["a", "b", "zp_u8", "zp_s8"], ["gemm"]),
             helper.make_node("QLinearConv", ["x", "one", "zp_u8", "w", "one", "zp_s8", "y_scale", "zp_u8"], ["conv"])]
    graph = helper.make_graph(
        nodes, "qfold_u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [16, _K]),
         helper.make_tensor_value_info("x", TensorProto.UINT8, [1, _K, 4, 4])],
        [helper.make_tensor_value_info("gemm", TensorProto.INT32, [16, 16]),
         helper.make_tensor_value_info("conv", TensorProto.UINT8, [1, 16, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), exact


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """True when ONNX Runtime's u8 x s8 kernels on this CPU lose precision to int16 pair sums."""
    import onnxruntime as ort

    model, exact = _probe_model()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    gemm, conv = sess.run(None, {"a": np.full((16, _K), 255, np.uint8), "x": np.full((1, _K, 4, 4), 255, np.uint8)})
    return bool((gemm != exact).any() or (conv != 200).any())


@functools.lru_cache(maxsize=1)
def detect_cpu() -> CpuInfo:
    """:func:`qfold.engine.cpu.detect` with the kernel probe: the CPU as ONNX Runtime computes on it."""
    return detect(saturation_probe=u8s8_saturates)
