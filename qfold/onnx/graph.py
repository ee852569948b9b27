"""Small read/write helpers over an ``onnx.ModelProto`` graph, shared by the Q/DQ passes.

No file I/O, no inference. A :class:`GraphIndex` is a snapshot (producers, consumers,
initializers); passes rebuild it after each structural change, which is cheap for CNN graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

Q = "QuantizeLinear"
DQ = "DequantizeLinear"
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATIONS = ("Relu", "Clip")
#: ops where ``Q(op(x)) == op(Q(x))`` for a shared (scale, zero point): data is only moved or selected.
COMMUTING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice")


@dataclass
class GraphIndex:
    """Producer / consumer / initializer lookups for one graph snapshot."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    inits: dict[str, onnx.TensorProto]
    outputs: set[str]

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for o in node.output:
                producer[o] = node
            for i in node.input:
                if i:
                    consumers.setdefault(i, []).append(node)
        inits = {t.name: t for t in graph.initializer}
        return cls(graph, producer, consumers, inits, {o.name for o in graph.output})

    def array(self, name: str) -> np.ndarray | None:
        """The initializer ``name`` as numpy, or None when it is not a constant."""
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def users(self, name: str) -> list[onnx.NodeProto]:
        return self.consumers.get(name, [])

    def op_of(self, name: str) -> str | None:
        p = self.producer.get(name)
        return None if p is None else p.op_type

    def dq_of(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear that produces ``name``, if any."""
        p = self.producer.get(name)
        return p if p is not None and p.op_type == DQ else None

    def quantized(self, name: str, depth: int = 0) -> bool:
        """``name`` is a DQ output, or comes from data-movement ops / Concat whose data inputs all are
        (TensorRT propagates DQ forward across them)."""
        if self.dq_of(name) is not None:
            return True
        p = self.producer.get(name)
        if p is None or depth > 16 or p.op_type not in COMMUTING + ("Concat",):
            return False
        data = list(p.input) if p.op_type == "Concat" else [p.input[0]]
        return all(self.quantized(t, depth + 1) for t in data)

    def is_weight_dq(self, dq: onnx.NodeProto) -> bool:
        """A DQ reading a constant (initializer, or a Q of an initializer before normalization)."""
        src = dq.input[0]
        if src in self.inits:
            return True
        q = self.producer.get(src)
        return q is not None and q.op_type == Q and q.input[0] in self.inits


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's Python value, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or replace) an attribute."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def replace_initializer(graph: onnx.GraphProto, array: np.ndarray, name: str) -> None:
    """Add initializer ``name`` (replacing one of the same name)."""
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            del graph.initializer[i]
            break
    a = np.asarray(array)  # (np.ascontiguousarray would turn a 0-d scale into shape (1,))
    graph.initializer.append(numpy_helper.from_array(a if a.flags.c_contiguous else a.copy(order="C"), name))


def remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs reach no graph output, then initializers nothing reads (in place)."""
    g = model.graph
    live = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(g.node)):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = set(live)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    names = {t.name for t in inits}
    vis = [v for v in g.value_info if v.name in used and v.name not in names]
    del g.value_info[:]
    g.value_info.extend(vis)


def unique_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_1``, ``base_2``... whichever is free; the result is added to ``taken``."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in use (for collision-free new names)."""
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names
