"""qfold.onnx.qdq: normalization, the TensorRT-rule verifier on hand-built graphs, the ORT rendering."""
from __future__ import annotations

import collections
import os
import sys
import tempfile

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
from fq_models import ActQ, Mixed, QConv, ResNetish, calibrate
from onnx_builders import optimized_op_counts, run_ort

from qfold.engine.ort import ort_max_amax
from qfold.onnx.export import export_onnx
from qfold.onnx.qdq import (
    OrtRendering,
    activation_scales,
    check_trt_rules,
    normalize_qdq,
    precision_map,
    render_for_ort,
    tensors_needing_amax_for_ort,
)

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# hand-built graphs
class G:
    """A tiny graph builder: x (N,4,8,8) -> ... ; every helper returns its output tensor name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def _n(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self._n(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._n(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def qdq(self, x: str, scale: float = 0.05, zp: np.generic | None = None) -> str:
        zp = np.int8(0) if zp is None else zp
        s, z = self.const(np.float32(scale)), self.const(np.asarray(zp))
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z]), s, z])

    def wdq(self, w: np.ndarray, axis: int | None = 0, scale=None, zp_value: int = 0) -> str:
        ch = w.shape[axis if axis is not None else 0]
        scale = np.full(ch, 0.01, np.float32) if scale is None else scale
        attrs = {} if axis is None else {"axis": axis}
        codes = self.const(np.clip(np.rint(w / 0.01), -127, 127).astype(np.int8), "w")
        return self.node("DequantizeLinear", [codes, self.const(scale), self.const(np.full(ch, zp_value, np.int8))], **attrs)

    def conv(self, x: str, cin: int = 4, cout: int = 4, quant_w: bool = True, bias_dq: bool = False, **wkw) -> str:
        w = RNG.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.3
        wname = self.wdq(w, **wkw) if quant_w else self.const(w)
        b = np.zeros(cout, np.float32)
        bname = self.wdq(b.reshape(cout), axis=0) if bias_dq else self.const(b)
        return self.node("Conv", [x, wname, bname], pads=[1, 1, 1, 1])

    def model(self, out: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4, 8, 8])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m)
        return m


def resnet_block(**brk) -> onnx.ModelProto:
    """x -> Q/DQ -> conv1 -> relu -> Q/DQ -> conv2 -> add(skip = DQ'd x) -> relu."""
    g = G()
    xq = g.qdq("x")
    h = g.node("Relu", [g.conv(xq, **brk.get("conv1", {}))])
    if brk.get("qdq_in_fusion"):
        h = g.node("Relu", [g.qdq(g.conv(xq))])
    h = g.conv(g.qdq(h, **brk.get("mid_q", {})) if not brk.get("skip_mid_q") else h)
    if brk.get("quantize_conv_branch"):
        h = g.qdq(h)
    skip = "x" if brk.get("float_skip") else xq
    return g.model(g.node("Relu", [g.node("Add", [h, skip])]))


def rules(m: onnx.ModelProto, float_layers=()) -> set[str]:
    return {v.rule for v in check_trt_rules(m, float_layers)}


def test_clean_block_has_no_violation() -> None:
    assert check_trt_rules(resnet_block()) == []


@pytest.mark.parametrize("brk, rule", [
    ({"skip_mid_q": True}, "input-not-quantized"),
    ({"conv1": {"quant_w": False}}, "weight-not-quantized"),
    ({"conv1": {"axis": 1}}, "weight-axis"),
    ({"conv1": {"axis": None}}, "weight-axis"),
    ({"conv1": {"zp_value": 3}}, "zero-point"),
    ({"mid_q": {"zp": np.uint8(0)}}, "zero-point"),
    ({"mid_q": {"zp": np.int8(5)}}, "zero-point"),
    ({"mid_q": {"scale": 0.0}}, "scale"),
    ({"mid_q": {"scale": -0.1}}, "scale"),
    ({"conv1": {"scale": np.array([0.01, 0.01, 0.0, 0.01], np.float32)}}, "scale"),
    ({"conv1": {"bias_dq": True}}, "bias-quantized"),
    ({"qdq_in_fusion": True}, "qdq-in-fusion"),
    ({"quantize_conv_branch": True}, "residual-add"),
    ({"float_skip": True}, "residual-add"),
])
def test_verifier_catches_each_violation(brk: dict, rule: str) -> None:
    assert rule in rules(resnet_block(**brk))


def test_verifier_per_tensor_activation_output_quantized_concat_clip_and_float_layers() -> None:
    g = G()
    s, z = g.const(np.full(4, 0.05, np.float32)), g.const(np.zeros(4, np.int8))
    xq = g.node("DequantizeLinear", [g.node("QuantizeLinear", ["x", s, z], axis=1), s, z], axis=1)
    assert "per-tensor-activation" in rules(g.model(g.conv(xq)))

    g = G()
    out = g.node("GlobalAveragePool", [g.qdq(g.node("Relu", [g.conv(g.qdq("x"))]))])
    assert "output-quantized" in rules(g.model(out))

    g = G()
    xq = g.qdq("x")
    cat = g.node("Concat", [g.qdq(g.conv(xq), 0.05), g.qdq(g.conv(xq), 0.07)], axis=1)
    assert "concat-scale" in rules(g.model(g.conv(cat, cin=8)))

    g = G()
    lo = g.node("Identity", [g.const(np.float32(0))])
    assert "clip-bounds" in rules(g.model(g.node("Clip", [g.conv(g.qdq("x")), lo, g.const(np.float32(6))])))

    g = G()
    out = g.conv("x", quant_w=False)
    name = g.nodes[-1].name
    assert rules(g.model(out)) == {"input-not-quantized", "weight-not-quantized"}
    assert check_trt_rules(g.model(out), float_layers=[name]) == []


# ----------------------------------------------------------------------------------------------
# normalization on exported models
@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[onnx.ModelProto, torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, net in (("resnet", ResNetish(width=8, blocks=1)), ("mixed", Mixed(c=8))):
            x = torch.randn(16, 3, 16, 16)
            calibrate(net, x)
            out[name] = (onnx.load(export_onnx(net, x[:1], os.path.join(d, f"{name}.onnx"))), net, x)
    return out


def test_normalize_is_idempotent_deterministic_and_pure(exported) -> None:
    m = exported["mixed"][0]
    before = m.SerializeToString(deterministic=True)
    once = normalize_qdq(m)
    assert m.SerializeToString(deterministic=True) == before
    assert once.SerializeToString(deterministic=True) == normalize_qdq(m).SerializeToString(deterministic=True)
    assert once.SerializeToString(deterministic=True) == normalize_qdq(once).SerializeToString(deterministic=True)
    ops = collections.Counter(n.op_type for n in once.graph.node)
    assert ops["Constant"] == 0 and ops["Clip"] == 2  # ReLU6 bounds are initializers
    assert check_trt_rules(once) == []


def test_precision_map_and_activation_scales(exported) -> None:
    m, net, _ = exported["mixed"]
    pm = precision_map(m)
    assert len(pm) == 7 and set(pm.values()) == {"int8"}  # ConvTranspose input is DQ'd through the Concat
    scales = activation_scales(m)
    assert scales["input"] == pytest.approx(float(net.q_in.scale))
    assert sorted(scales.values()).count(pytest.approx(float(net.q_cat.scale))) == 2  # one scale, both inputs


@settings(max_examples=6, deadline=None)
@given(cin=st.sampled_from([1, 3, 8]), cout=st.sampled_from([2, 8]), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), depthwise=st.booleans(), bias=st.booleans())
def test_conv_configs_match_fake_quant_within_one_step(cin, cout, k, stride, depthwise, bias) -> None:
    groups = cin if depthwise else 1
    cout = cin if depthwise else cout

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_in, self.conv = ActQ(), QConv(cin, cout, k, stride, k // 2, groups=groups, bias=bias)

        def forward(self, x):
            return self.conv(self.q_in(x))

    x = torch.randn(4, cin, 9, 9)
    net = calibrate(Net(), x)
    with tempfile.TemporaryDirectory() as d:
        m = onnx.load(export_onnx(net, x[:1], os.path.join(d, "m.onnx")))
    with torch.no_grad():
        want = net(x).numpy()
    step = np.abs(want).max() / 127
    assert np.abs(run_ort(m, x.numpy()) - want).max() <= step
    assert check_trt_rules(m) == []
    assert precision_map(m) == {"/conv/Conv": "int8"}


# ----------------------------------------------------------------------------------------------
# ORT rendering
EXACT = OrtRendering(int32_bias=False)  # every remaining step is claimed bit-identical


@pytest.mark.parametrize("name", ["resnet", "mixed"])
def test_rendering_is_bit_identical_where_claimed(exported, name) -> None:
    m, _, x = exported[name]
    want = run_ort(m, x.numpy())
    for rendering in (EXACT, OrtRendering(absorb_activations=False, propagate=False, int32_bias=False),
                      OrtRendering(absorb_activations=False, int32_bias=False)):
        r = render_for_ort(m, None, rendering)
        onnx.checker.check_model(r, full_check=True)
        assert np.array_equal(run_ort(r, x.numpy()), want), rendering


def test_int32_bias_and_fused_kernels_stay_within_one_output_step(exported) -> None:
    m, _, x = exported["mixed"]
    want = run_ort(m, x.numpy())
    step = np.abs(want).max() / 127
    r = render_for_ort(m)
    assert np.abs(run_ort(r, x.numpy()) - want).max() <= step
    assert np.abs(run_ort(r, x.numpy(), optimize=True) - want).max() <= step


def test_every_quantized_conv_runs_int8_in_ort(exported) -> None:
    m, _, x = exported["resnet"]
    needed = tensors_needing_amax_for_ort(m)
    assert needed == [n.output[0] for n in m.graph.node if n.name.endswith("conv2/Conv")]
    r = render_for_ort(m, ort_max_amax(m, needed, [x.numpy()]))
    n_conv = sum(n.op_type == "Conv" for n in m.graph.node)
    ops = optimized_op_counts(r)
    assert ops["QLinearConv"] == n_conv and ops["QGemm"] == 1 and ops["QLinearAdd"] == 2
    assert ops["Conv"] == ops["FusedConv"] == ops["Gemm"] == 0
    assert optimized_op_counts(m)["QLinearConv"] < n_conv  # the TensorRT profile does not get there alone
    want = run_ort(m, x.numpy())
    assert np.abs(run_ort(r, x.numpy(), optimize=True) - want).max() <= 4 * np.abs(want).max() / 127


def test_missing_amax_keeps_layers_float_and_unknown_names_error(exported) -> None:
    m, _, x = exported["resnet"]
    r = render_for_ort(m)  # no extra amax: conv2 of each block stays float, still correct
    assert optimized_op_counts(r)["QLinearConv"] < sum(n.op_type == "Conv" for n in m.graph.node)
    assert np.abs(run_ort(r, x.numpy()) - run_ort(m, x.numpy())).max() <= np.abs(run_ort(m, x.numpy())).max() / 127
    with pytest.raises(KeyError, match="tensors_needing_amax_for_ort"):
        render_for_ort(m, {"no_such_tensor": 1.0})
