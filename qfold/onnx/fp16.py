"""FP16 fallback for Q/DQ ONNX graphs: the unquantized parts in float16, model I/O kept float32.

Why: TensorRT 11 builds every network strongly typed, so layers that carry no Q/DQ run in the
*graph's own* float type. The only way to get FP16 fallback (what ``BuilderFlag.FP16`` did on
10.x) is an ONNX whose float tensors are float16 (ModelOpt ``high_precision_dtype="fp16"`` does
the same). This module is a pure ONNX -> ONNX pass; it reads and writes no files.

What changes:

* every float32 initializer and ``Constant`` becomes float16. Values are clamped to the float16
  range ``|x| <= 65504`` (``FP16_MAX``); a non-zero value that underflows float16
  (``|x| <= 2**-25``, half the smallest subnormal) flushes to 0, except for Q/DQ scales, which are
  raised to ``2**-24`` so they stay strictly positive (TensorRT rejects a scale <= 0). Each kind
  is counted and warned about.
* ``Cast(to=FLOAT)`` inside the graph becomes ``Cast(to=FLOAT16)``.
* with ``keep_io_types=True`` each float32 graph input gets a ``Cast`` to float16 and each float32
  graph output is produced by a ``Cast`` back to float32, so callers still feed and read float32.
* inputs that ONNX only defines for float32 (``Resize`` scales, ``Upsample`` scales) stay
  float32: constants are left unconverted, computed tensors get a ``Cast`` back to float32.

Q/DQ scale types (the decision). ``DequantizeLinear``'s output type is its scale's type, and
``QuantizeLinear`` requires ``x`` and ``y_scale`` to share a type (ONNX opset 19, type T1); under
strong typing TensorRT likewise wants a Q's input type to equal its scale type. So the scales
become float16 too: a Q then reads a float16 activation with a float16 scale and its DQ emits
float16 straight into the float16 consumer, with no Cast between a DQ and its Conv (a Cast there
would stand between the Q/DQ pair and the layer TensorRT must fuse it with). Float16 Q/DQ exists
only from opset 19 on, so a graph with Q/DQ below opset 19 is first raised to 19 with
``onnx.version_converter`` (which rewrites, e.g., ReduceMean's ``axes`` attribute into an input).
Rounding a scale ``amax/127`` to float16 changes it by at most ``2**-11`` relative (normal range).
Zero points are untouched; a weight Q now divides a float16 weight by a float16 scale, so a weight
lying within float16 rounding of a code boundary can move by one code.

Numerics (tests/qfold/test_fp16.py, ONNX Runtime on CPU): on the built-in test CNN the float16
graph agrees with the float32 Q/DQ graph to a max absolute output difference below 2 % of the
output's range; the differences come from float16 rounding of activations just before a Q that
moves a value across a rounding boundary (one int8 step), so the bound is in output-range terms.
ONNX Runtime's CPU provider runs float16 kernels it lacks in float32 behind Casts, so this checks
storage precision, not float16 accumulation (TensorRT accumulates convolutions in float32 too).

Reference: ONNX operator spec, QuantizeLinear-19 / DequantizeLinear-19 (types T1/T2);
TensorRT "Explicit Quantization" and strong-typing docs (summarised in docs/tensorrt-qdq-rules.md).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24
QDQ_MIN_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear accept float16

# (op_type, input index) that ONNX types as float32 only: kept float32.
FLOAT32_ONLY_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (2,), "Upsample": (1,)}
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_CAST_PREFIX = "qfold_fp16"


@dataclass(frozen=True)
class Fp16Stats:
    """What :func:`fp16_conversion` changed.

    Attributes:
        tensors: float32 initializers and constants converted to float16.
        clamped: values with ``|x| > 65504`` clamped to +-65504.
        flushed: non-zero values that underflow float16 (``|x| <= 2**-25``), now 0.
        scales_raised: Q/DQ scale values that would underflow, raised to ``2**-24``.
        casts_added: Cast nodes inserted (graph I/O and float32-only inputs).
        opset_from: the default-domain opset before raising it to 19, or None if unchanged.
    """

    tensors: int = 0
    clamped: int = 0
    flushed: int = 0
    scales_raised: int = 0
    casts_added: int = 0
    opset_from: int | None = None


def to_fp16_array(a: np.ndarray, *, positive: bool = False) -> tuple[np.ndarray, int, int]:
    """Round float32 ``a`` to float16, saturating instead of overflowing to inf.

    Returns ``(b, n_clamped, n_small)``: ``n_clamped`` values had ``|x| > 65504``; ``n_small``
    non-zero values underflowed (``|x| <= 2**-25``) and became 0, or with ``positive=True``
    (scales) became ``2**-24`` so the result stays strictly positive.

    >>> to_fp16_array(np.array([1e5, -1e5, 1.0], np.float32))[0].tolist()
    [65504.0, -65504.0, 1.0]
    """
    a = np.asarray(a, dtype=np.float32)
    clamped = int(np.count_nonzero(np.isfinite(a) & (np.abs(a) > FP16_MAX)))
    b = np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)
    small_mask = (a != 0) & (b == 0)  # underflowed: below half the smallest subnormal
    small = int(np.count_nonzero(small_mask))
    if positive:
        b = np.where(small_mask, np.float16(FP16_MIN_SUBNORMAL), b)
    return b, clamped, small


def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    raise ValueError("the model imports no default-domain (ai.onnx) opset; it is not a valid ONNX model")


def _check_supported(model: onnx.ModelProto) -> None:
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"convert_float_to_fp16 expects an onnx.ModelProto, got {type(model).__name__}; use onnx.load(path) first")
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ValueError(
                    f"node '{node.name or node.op_type}' ({node.op_type}) has a subgraph; FP16 conversion handles flat "
                    "graphs only. Export the model without control flow (a CNN exports flat) or run without fp16_fallback."
                )
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            raise ValueError(
                f"initializer '{init.name}' is stored as external data; load the model with "
                "onnx.load(path, load_external_data=True) before converting it to FP16"
            )


class _Pass:
    """One conversion; holds the counters while it walks the graph."""

    def __init__(self, model: onnx.ModelProto, keep_io_types: bool) -> None:
        self.m = model
        self.g = model.graph
        self.keep_io_types = keep_io_types
        self.tensors = self.clamped = self.flushed = self.raised = self.casts = 0
        self.scales: set[str] = set()
        self.pinned: set[str] = set()  # tensor names that must stay float32
        for node in self.g.node:
            if node.op_type in _QDQ_OPS and len(node.input) > 1:
                self.scales.add(node.input[1])
            for i in FLOAT32_ONLY_INPUTS.get(node.op_type, ()):
                if i < len(node.input) and node.input[i]:
                    self.pinned.add(node.input[i])

    def _convert_tensor(self, t: TensorProto, name: str) -> TensorProto:
        """``t`` as float16; ``name`` is the graph tensor it defines (decides whether it is a scale)."""
        arr = numpy_helper.to_array(t)
        is_scale = name in self.scales
        b, n_clamped, n_small = to_fp16_array(arr, positive=is_scale)
        self.tensors += 1
        self.clamped += n_clamped
        if is_scale:
            self.raised += n_small
        else:
            self.flushed += n_small
        return numpy_helper.from_array(b, t.name or None)

    def initializers(self) -> None:
        for i, init in enumerate(self.g.initializer):
            if init.data_type == TensorProto.FLOAT and init.name not in self.pinned:
                self.g.initializer[i].CopyFrom(self._convert_tensor(init, init.name))

    def nodes(self) -> None:
        for node in self.g.node:
            out_pinned = any(o in self.pinned for o in node.output)
            if node.op_type == "Constant" and not out_pinned:
                self._constant(node)
            elif node.op_type == "ConstantOfShape" and not out_pinned:
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                        attr.t.CopyFrom(self._convert_tensor(attr.t, node.output[0]))
            elif node.op_type == "Cast" and not out_pinned:
                for attr in node.attribute:
                    if attr.name == "to" and attr.i == TensorProto.FLOAT:
                        attr.i = TensorProto.FLOAT16

    def _constant(self, node: onnx.NodeProto) -> None:
        for attr in list(node.attribute):
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(self._convert_tensor(attr.t, node.output[0]))
            elif attr.name in ("value_float", "value_floats"):
                arr = np.array(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
                node.attribute.remove(attr)
                tensor = self._convert_tensor(numpy_helper.from_array(arr), node.output[0])
                node.attribute.append(helper.make_attribute("value", tensor))

    def pinned_runtime_inputs(self) -> None:
        """Computed tensors feeding float32-only inputs get a Cast back to float32."""
        constants = {i.name for i in self.g.initializer} | {
            o for n in self.g.node if n.op_type == "Constant" for o in n.output
        }
        graph_inputs = {i.name for i in self.g.input}
        new_nodes: list[onnx.NodeProto] = []
        done: dict[str, str] = {}
        for node in self.g.node:
            for i in FLOAT32_ONLY_INPUTS.get(node.op_type, ()):
                if i >= len(node.input) or not node.input[i]:
                    continue
                src = node.input[i]
                if src in constants or (src in graph_inputs and self.keep_io_types):
                    continue
                if src not in done:
                    done[src] = f"{src}__{_CAST_PREFIX}_fp32"
                    new_nodes.append(_cast(src, done[src], TensorProto.FLOAT))
                node.input[i] = done[src]
            new_nodes.append(node)
        self.casts += len(done)
        del self.g.node[:]
        self.g.node.extend(new_nodes)

    def io(self) -> None:
        g = self.g
        head: list[onnx.NodeProto] = []
        tail: list[onnx.NodeProto] = []
        for vi in g.input:
            if vi.type.tensor_type.elem_type != TensorProto.FLOAT or vi.name in {i.name for i in g.initializer}:
                continue
            if not self.keep_io_types:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT16
                continue
            new = f"{vi.name}__{_CAST_PREFIX}"
            for node in g.node:
                for k, name in enumerate(node.input):
                    if name == vi.name and not (node.op_type in FLOAT32_ONLY_INPUTS and k in FLOAT32_ONLY_INPUTS[node.op_type]):
                        node.input[k] = new
            head.append(_cast(vi.name, new, TensorProto.FLOAT16))
        input_names = {i.name for i in g.input}
        for vo in g.output:
            if vo.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            if not self.keep_io_types:
                vo.type.tensor_type.elem_type = TensorProto.FLOAT16
                continue
            if vo.name in input_names:  # an input passed straight through keeps its float32
                continue
            new = f"{vo.name}__{_CAST_PREFIX}"
            for node in g.node:
                for k, name in enumerate(node.output):
                    if name == vo.name:
                        node.output[k] = new
                for k, name in enumerate(node.input):
                    if name == vo.name:
                        node.input[k] = new
            tail.append(_cast(new, vo.name, TensorProto.FLOAT))
        self.casts += len(head) + len(tail)
        nodes = head + list(g.node) + tail
        del g.node[:]
        g.node.extend(nodes)


def _cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], name=f"{_CAST_PREFIX}_cast_{dst}", to=to)


def fp16_conversion(model: onnx.ModelProto, *, keep_io_types: bool = True) -> tuple[onnx.ModelProto, Fp16Stats]:
    """Like :func:`convert_float_to_fp16`, returning the counts instead of warning about them."""
    _check_supported(model)
    m = copy.deepcopy(model)
    opset_from = None
    has_qdq = any(n.op_type in _QDQ_OPS for n in m.graph.node)
    if has_qdq and _default_opset(m) < QDQ_MIN_OPSET:
        opset_from = _default_opset(m)
        try:
            m = onnx.version_converter.convert_version(m, QDQ_MIN_OPSET)
        except Exception as exc:  # the converter raises its own C++ error types
            raise ValueError(
                f"cannot raise the model from opset {opset_from} to {QDQ_MIN_OPSET}, which float16 Q/DQ needs "
                f"({type(exc).__name__}: {exc}); export the model with opset_version={QDQ_MIN_OPSET} instead"
            ) from exc
    p = _Pass(m, keep_io_types)
    p.initializers()
    p.nodes()
    p.pinned_runtime_inputs()
    p.io()
    del m.graph.value_info[:]  # stale float32 annotations; types are re-derived from the graph
    try:
        onnx.checker.check_model(m, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ValueError(
            f"the float16 graph does not type-check ({exc}); an operator in it may not accept float16. "
            "Keep that part in float32 (build without fp16_fallback) and report the operator to qfold."
        ) from exc
    stats = Fp16Stats(p.tensors, p.clamped, p.flushed, p.raised, p.casts, opset_from)
    return m, stats


def convert_float_to_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True) -> onnx.ModelProto:
    """Return a copy of the Q/DQ ``model`` whose unquantized parts run in float16.

    Float32 initializers, constants and casts become float16, Q/DQ scales included (the graph is
    raised to opset 19 if it has Q/DQ); int8 codes and zero points are unchanged. With
    ``keep_io_types`` the graph still takes and returns float32 (Casts at the I/O). The input
    model is not modified. Values clamped to +-65504, flushed to 0 or scales raised to ``2**-24``
    are counted in one ``UserWarning``. See the module docstring for the type rules.

    Raises:
        TypeError: ``model`` is not an ``onnx.ModelProto``.
        ValueError: the graph has subgraphs or external data, its opset cannot be raised to 19,
            or the result does not type-check.
    """
    m, s = fp16_conversion(model, keep_io_types=keep_io_types)
    if s.clamped or s.flushed or s.scales_raised:
        warnings.warn(
            f"FP16 conversion: {s.clamped} value(s) clamped to +-65504, {s.flushed} tiny value(s) flushed to 0, "
            f"{s.scales_raised} Q/DQ scale(s) raised to 2**-24; if accuracy drops, keep those layers in float32",
            UserWarning,
            stacklevel=2,
        )
    return m
