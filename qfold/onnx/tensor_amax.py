"""The amax of the tensors only the ONNX Runtime rendering quantizes, measured by calibration.

TensorRT's profile leaves some tensors float that ONNX Runtime's integer kernels need quantized
(a conv output on a residual branch, an Add feeding a float op:
:func:`qfold.onnx.ort_render.tensors_needing_amax_for_ort`). Their float ``max |x|`` is measured in
the same calibration pass as every quantizer's (``node_amax`` by fx node name,
:func:`qfold.quant.calibrate.calibrate_model`), so they cost no pass of their own. Which fx node an
ONNX tensor is cannot be read from names (each exporter names nodes its own way), so it is found by
value: one probe batch runs through the Q/DQ ONNX (ONNX Runtime, optimizations off) and through the
fake-quant model, both with activations in float and weights int8-valued (the activation Q/DQ
pairs bypassed in the ONNX, the activation quantizers off in PyTorch): the same function, so the
outputs agree to float rounding at any depth, where quantized activations would diverge by
rounding flips. An ONNX tensor is the fx node whose output matches it in shape and value; a
tensor with no such node, or with several whose amax differ, is left out (the engine build then
measures it in ONNX Runtime).

The result travels in the Q/DQ ONNX itself, as the metadata entry :data:`METADATA_KEY` (JSON
``{tensor name: amax}``), so an engine built later from the file alone (``qfold build``) needs no
data for them. TensorRT ignores metadata.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx

from calib.atomic import atomic_write_bytes
from qfold.onnx.export import serialize
from qfold.onnx.ort_render import tensors_needing_amax_for_ort
from qfold.quant.prepare import quantization_disabled

__all__ = ["METADATA_KEY", "attach_tensor_amax", "match_tensors", "recorded_tensor_amax"]

METADATA_KEY = "qfold.ort_tensor_amax"
#: a match: relative L2 error of the node's output against the ONNX tensor at most this (float
#: rounding of two runtimes: 3e-5 after one resnet18 block, 1e-3 after resnet50's 50 layers, while
#: the other same-shaped nodes are 90-140 % away), and every node with another amax at least
#: MATCH_MARGIN times farther.
MATCH_TOLERANCE = 0.05
MATCH_MARGIN = 4.0


class _Keep(fx.Interpreter):
    """Runs a GraphModule, keeping a copy of the named nodes' outputs (later in-place ops may overwrite them)."""

    def __init__(self, gm: fx.GraphModule, names: Iterable[str]) -> None:
        super().__init__(gm)
        self.names, self.kept = set(names), {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.kept[n.name] = out.detach().float().contiguous().numpy().copy()
        return out


def _float_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the Q/DQ ``model`` whose activation Q -> DQ pairs are bypassed (weight DQs stay)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    q_in = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    bypass = {n.output[0]: q_in[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_in}
    if any(o.name in bypass for o in m.graph.output):  # a model output read through Q/DQ: left as it is
        return m
    for n in m.graph.node:
        for k, name in enumerate(n.input):
            if name in bypass:
                n.input[k] = bypass[name]
    read = {name for n in m.graph.node for name in n.input}  # after the rewiring: what is still read
    keep = [n for n in m.graph.node if not (n.output[0] in bypass or (n.output[0] in q_in and n.output[0] not in read))]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def _onnx_tensors(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    m = _float_activations(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every named tensor exists
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(names, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})
    return dict(zip(names, got))


def match_tensors(model: onnx.ModelProto, fq: fx.GraphModule, node_amax: Mapping[str, float], probe: torch.Tensor,
                  tensors: list[str] | None = None) -> dict[str, str]:
    """ONNX tensor name -> fx node name of ``fq``, for ``tensors`` (default: those the ORT rendering needs).

    Only nodes in ``node_amax`` are candidates. A tensor maps to the node whose output on
    ``probe`` (a small input batch) is closest to it, if within :data:`MATCH_TOLERANCE` and every
    node with a different amax is :data:`MATCH_MARGIN` times farther (nodes with the same amax,
    such as an identity in between, are the same answer).
    """
    tensors = tensors_needing_amax_for_ort(model) if tensors is None else tensors
    if not tensors:
        return {}
    want = _onnx_tensors(model, tensors, probe.numpy())
    keep = _Keep(fq, node_amax)
    with torch.inference_mode(), quantization_disabled(fq, activations_only=True):
        keep.run(probe.contiguous())
    found: dict[str, str] = {}
    for t, ref in want.items():
        energy = float(np.square(ref, dtype=np.float64).sum())
        if energy == 0.0:
            continue
        close = sorted((float(np.square(out - ref, dtype=np.float64).sum()) / energy, n)
                       for n, out in keep.kept.items() if out.shape == ref.shape)
        if not close or close[0][0] > MATCH_TOLERANCE**2:
            continue
        best, rival = close[0], next((c for c in close if node_amax[c[1]] != node_amax[close[0][1]]), None)
        if rival is None or rival[0] >= best[0] * MATCH_MARGIN**2:
            found[t] = best[1]
    return found


def attach_tensor_amax(path: str | Path, fq: fx.GraphModule, node_amax: Mapping[str, float], probe: torch.Tensor) -> dict[str, float]:
    """Write the amax of the tensors the ORT rendering needs into the Q/DQ ONNX at ``path`` (atomically).

    Returns ``{tensor: amax}`` as written; tensors without a match are left out. A model that
    needs none is not rewritten.
    """
    path = Path(path)
    model = onnx.load(str(path))
    found = match_tensors(model, fq, node_amax, probe)
    if not found:
        return {}
    amax = {t: float(node_amax[n]) for t, n in sorted(found.items())}
    entry = next((p for p in model.metadata_props if p.key == METADATA_KEY), None) or model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(amax, sort_keys=True)
    atomic_write_bytes(path, serialize(model))
    return amax


def recorded_tensor_amax(model: onnx.ModelProto) -> dict[str, float]:
    """The ``{tensor: amax}`` :func:`attach_tensor_amax` wrote into ``model`` ({} when none)."""
    entry = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        return {}
    try:
        got = json.loads(entry.value)
        return {str(k): float(v) for k, v in got.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"the ONNX metadata entry {METADATA_KEY!r} is not a JSON object of tensor amax ({exc}); "
                         f"re-export the model") from exc
