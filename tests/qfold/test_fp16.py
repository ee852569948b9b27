"""FP16 fallback conversion of Q/DQ ONNX graphs: structure, types, and numerics in ONNX Runtime (CPU)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import qdq_conv
from torch import nn

from calib.spec import scale_from_amax
from qfold.onnx.fp16 import (
    FP16_MAX,
    FP16_MIN_SUBNORMAL,
    convert_float_to_fp16,
    fp16_conversion,
    to_fp16_array,
)

torch.set_num_threads(1)

# max |y16 - y32| / max |y32| allowed between the FP16 and FP32 Q/DQ graphs (see qfold.onnx.fp16 docstring)
REL_TOL = 0.02


def _fq_act(x: torch.Tensor, amax: float) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, float(scale_from_amax(amax)), 0, -128, 127)


def _fq_weight(w: torch.Tensor) -> torch.Tensor:
    amax = w.detach().abs().flatten(1).amax(1).numpy()
    scale = torch.from_numpy(scale_from_amax(amax)).to(w.dtype)
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(w.shape[0], dtype=torch.int32), 0, -128, 127)


class TinyQDQNet(nn.Module):
    """Conv-ReLU6 -> strided Conv-ReLU -> residual Conv + Add -> GAP -> Linear, TensorRT-style Q/DQ."""

    def __init__(self, amax: dict[str, float] | None = None) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 10)
        self.amax = amax  # None: float model (used to calibrate)

    def _q(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x if self.amax is None else _fq_act(x, self.amax[name])

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.amax is None else _fq_weight(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = {}
        acts["x"] = x
        x = F.relu6(F.conv2d(self._q(x, "x"), self._w(self.c1.weight), self.c1.bias, padding=1))
        acts["a1"] = x
        x = F.relu(F.conv2d(self._q(x, "a1"), self._w(self.c2.weight), self.c2.bias, stride=2, padding=1))
        acts["a2"] = x
        y = F.conv2d(self._q(x, "a2"), self._w(self.c3.weight), None, padding=1)
        x = y + self._q(x, "a2")  # residual input quantized, conv branch not (TensorRT rule 4)
        x = x.mean((2, 3))
        acts["gap"] = x
        self.last_acts = acts
        return self.fc(self._q(x, "gap")) if self.amax is None else F.linear(self._q(x, "gap"), self._w(self.fc.weight), self.fc.bias)


def _export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
    return onnx.load_from_string(f.getvalue())


def _digits(n: int = 256) -> np.ndarray:
    from sklearn.datasets import load_digits

    d = load_digits().images[:n].astype(np.float32) / 16.0
    return d[:, None]


@pytest.fixture(scope="module")
def qdq_cnn() -> tuple[onnx.ModelProto, TinyQDQNet, np.ndarray]:
    torch.manual_seed(0)
    x = torch.from_numpy(_digits())
    net = TinyQDQNet().eval()
    with torch.no_grad():
        net(x)
    net.amax = {k: float(v.abs().max()) for k, v in net.last_acts.items()}
    return _export(net, x[:2]), net, x.numpy()


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run Q/DQ literally
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    vis = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in vis}


def test_export_fixture_matches_torch_fake_quant(qdq_cnn):
    model, net, x = qdq_cnn
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(model, x), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_fp16_graph_matches_fp32_qdq_graph_in_ort(qdq_cnn):
    model, _, x = qdq_cnn
    y32 = _run(model, x)
    m16 = convert_float_to_fp16(model)
    y16 = _run(m16, x)
    assert y16.dtype == np.float32
    rel = np.abs(y16 - y32).max() / np.abs(y32).max()
    assert rel < REL_TOL, f"max |y16 - y32| is {rel:.4f} of the output range"
    assert (y16.argmax(1) == y32.argmax(1)).mean() >= 0.98


def test_io_stays_float32_and_inside_is_float16(qdq_cnn):
    model, _, _ = qdq_cnn
    m16, stats = fp16_conversion(model)
    assert [i.type.tensor_type.elem_type for i in m16.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in m16.graph.output] == [TensorProto.FLOAT]
    types = _float_types(m16)
    float32 = sorted(n for n, t in types.items() if t == TensorProto.FLOAT)
    assert float32 == ["x", "y"], f"tensors left in float32: {float32}"
    assert stats.casts_added == 2 and stats.opset_from == 17
    opset = {o.domain: o.version for o in m16.opset_import}[""]
    assert opset == 19
    assert not any(i.data_type == TensorProto.FLOAT for i in m16.graph.initializer)


def test_qdq_scales_are_float16_and_zero_points_int8(qdq_cnn):
    model, _, _ = qdq_cnn
    m16 = convert_float_to_fp16(model)
    consts = {i.name: numpy_helper.to_array(i) for i in m16.graph.initializer}
    for n in m16.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    qdq = [n for n in m16.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node) >= 16
    for n in qdq:
        scale, zp = consts[n.input[1]], consts[n.input[2]]
        assert scale.dtype == np.float16 and np.all(scale > 0)
        assert zp.dtype == np.int8 and not zp.any()


def test_does_not_mutate_input_and_is_deterministic(qdq_cnn):
    model, _, _ = qdq_cnn
    before = model.SerializeToString()
    a = convert_float_to_fp16(model).SerializeToString()
    b = convert_float_to_fp16(model).SerializeToString()
    assert model.SerializeToString() == before
    assert a == b


def test_keep_io_types_false_gives_float16_io(qdq_cnn):
    model, _, x = qdq_cnn
    m16 = convert_float_to_fp16(model, keep_io_types=False)
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    y = _run(m16, x.astype(np.float16))
    assert y.dtype == np.float16
    y32 = _run(model, x)
    assert np.abs(y.astype(np.float32) - y32).max() / np.abs(y32).max() < REL_TOL


def test_to_fp16_array_clamps_flushes_and_keeps_scales_positive():
    a = np.array([1e6, -7e4, 1.0, 1e-9, -1e-9, 0.0, 4e-8], np.float32)  # 4e-8 rounds up to 2**-24
    b, clamped, small = to_fp16_array(a)
    assert b.dtype == np.float16
    assert b[:3].tolist() == [FP16_MAX, -FP16_MAX, 1.0]
    assert clamped == 2 and small == 2 and b[3] == 0 and b[4] == 0 and b[6] > 0
    s, _, raised = to_fp16_array(np.array([2.0**-100 / 127, 0.5], np.float32), positive=True)
    assert raised == 1 and s[0] == np.float16(FP16_MIN_SUBNORMAL) and s[1] == 0.5


def _single_conv_qdq(w: np.ndarray, x_amax: float, opset: int = 17) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(W with per-channel Q/DQ) -> y, built with onnx.helper."""
    return qdq_conv(w, x_amax, opset=opset)


def test_out_of_range_weights_are_clamped_with_a_warning():
    w = np.ones((2, 1, 3, 3), np.float32)
    w[0, 0, 0, 0] = 1e5  # a BN folded with a huge running_var ratio, say
    with pytest.warns(UserWarning, match="1 value"):
        m16 = convert_float_to_fp16(_single_conv_qdq(w, 1.0))
    w16 = numpy_helper.to_array(next(i for i in m16.graph.initializer if i.name == "W"))
    assert w16.max() == FP16_MAX


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cin=st.integers(1, 8),
    cout=st.integers(1, 8),
    w_mag=st.floats(1e-3, 50.0),
    x_amax=st.floats(0.05, 300.0),
    seed=st.integers(0, 2**16),
)
def test_property_single_conv_fp16_close_to_fp32(cin, cout, w_mag, x_amax, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, 3, 3)) * w_mag).astype(np.float32)
    x = (rng.uniform(-1, 1, (4, cin, 6, 6)) * x_amax).astype(np.float32)
    model = _single_conv_qdq(w, x_amax)
    y32, y16 = _run(model, x), _run(convert_float_to_fp16(model), x)
    # one int8 step of x times the largest |W| row sum bounds a code flip; fp16 rounding adds ~2**-10 relative
    step = float(scale_from_amax(x_amax)) * np.abs(w).reshape(cout, -1).sum(1).max()
    assert np.abs(y16 - y32).max() <= step + 2e-3 * np.abs(y32).max() + 1e-6


def test_rejects_non_model_and_subgraphs():
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        convert_float_to_fp16(b"not a model")  # type: ignore[arg-type]
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "t", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["o"], then_branch=then, else_branch=then)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="subgraph"):
        convert_float_to_fp16(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))


def test_resize_scales_stay_float32():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest"),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], [scales],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    m16 = convert_float_to_fp16(m)
    assert next(i for i in m16.graph.initializer if i.name == "scales").data_type == TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(m16, x), _run(m, x), atol=2e-3)
