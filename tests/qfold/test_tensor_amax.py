"""The calibration pass measures the tensors only the ONNX Runtime rendering quantizes (qfold.onnx.tensor_amax)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from models import ResNetStyle, randomize_bn

from qfold.config import PTQConfig
from qfold.engine.ort import OrtBackend
from qfold.onnx.ort_render import tensors_needing_amax_for_ort
from qfold.onnx.tensor_amax import METADATA_KEY, match_tensors, recorded_tensor_amax
from qfold.pipeline import bound_stage, calibrate_stage, export_stage, fold_stage


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(ResNetStyle()).eval()
    cx = torch.randn(48, 3, 12, 12)
    cfg = PTQConfig(progress=False).replace(calib={"batch_size": 16})
    folded, _ = fold_stage(model, cfg, cx[:2])
    bounded, _ = bound_stage(folded, cx, cfg)
    fq, plan, cres = calibrate_stage(bounded, cx, cfg)
    path, _ = export_stage(fq, cx[:1], tmp_path_factory.mktemp("e"), cfg, cres=cres)
    return bounded, fq, cres, cx, path


def _float_amax_per_call(model: torch.nn.Module, x: torch.Tensor) -> dict[tuple[str, int], float]:
    """max |output| of every module call of the float model over ``x``, keyed (module name, call index)."""
    got: dict[tuple[str, int], float] = {}
    calls: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if name:
            def hook(_m, _i, out, name=name):
                k = (name, calls.get(name, 0))
                calls[name] = k[1] + 1
                got[k] = max(got.get(k, 0.0), float(out.detach().abs().max()))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(x), 16):
            calls.clear()
            model(x[i : i + 16])
    for h in hooks:
        h.remove()
    return got


def test_the_onnx_carries_the_float_amax_of_every_tensor_the_ort_rendering_needs(calibrated):
    bounded, fq, cres, cx, path = calibrated
    model = onnx.load(str(path))
    needed = tensors_needing_amax_for_ort(model)
    recorded = recorded_tensor_amax(model)
    assert needed and sorted(recorded) == sorted(needed)
    # independently of the taps: forward hooks on the float (bounded) model, matched by module and call
    expect = _float_amax_per_call(bounded, cx)
    nodes = {n.name: n for n in fq.graph.nodes}
    for t, node in match_tensors(model, fq, cres.extra["node_amax"], cx[:1]).items():
        n = nodes[node]
        assert n.op == "call_module", (t, node)
        call = [m.name for m in fq.graph.nodes if m.op == "call_module" and m.target == n.target].index(node)
        assert recorded[t] == pytest.approx(expect[(n.target, call)], rel=1e-6), (t, node)


def test_an_engine_builds_from_the_recorded_amax_without_data_as_well_as_with_an_ort_pass(calibrated, tmp_path):
    _, fq, _, cx, path = calibrated
    backend = OrtBackend()
    recorded = backend.build(path, tmp_path / "a.ort.onnx")  # no data: the ONNX has the amax
    assert recorded.extra["float_for_lack_of_amax"] == [] and recorded.extra["extra_amax_measured_in_onnxruntime"] == []
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    data = [b.numpy() for b in cx.split(16)]
    measured = backend.build(tmp_path / "bare.onnx", tmp_path / "b.ort.onnx", data=data)  # the fallback: a run in ORT
    needed = tensors_needing_amax_for_ort(bare)
    assert measured.extra["extra_amax_measured_in_onnxruntime"] == needed
    assert backend.build(tmp_path / "bare.onnx", tmp_path / "c.ort.onnx").extra["float_for_lack_of_amax"] == needed
    # the two amax differ by the fake-quant noise the ORT run includes (the float model has none)
    for t in needed:
        assert recorded.extra["extra_amax"][t] == pytest.approx(measured.extra["extra_amax"][t], rel=0.15)
    with torch.no_grad():
        want = fq(cx).numpy()
    sqnr = {}
    for info in (recorded, measured):
        out = backend.load(tmp_path / info.engine_path).run(cx.numpy())
        sqnr[info.engine_path] = 10 * np.log10(np.sum(want**2) / np.sum((want - out) ** 2))
    assert sqnr["a.ort.onnx"] > sqnr["b.ort.onnx"] - 1.0, sqnr  # this tiny random net is noisy in both (~17 dB)


def test_no_match_without_a_candidate_and_a_corrupt_entry_is_an_error(calibrated, tmp_path):
    _, fq, cres, cx, path = calibrated
    model = onnx.load(str(path))
    amax = cres.extra["node_amax"]
    assert len(match_tensors(model, fq, amax, cx[:1])) == len(tensors_needing_amax_for_ort(model))
    assert match_tensors(model, fq, {}, cx[:1]) == {}
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    assert json.loads(entry.value)
    entry.value = "[1, 2"
    with pytest.raises(ValueError, match="re-export the model"):
        recorded_tensor_amax(model)
