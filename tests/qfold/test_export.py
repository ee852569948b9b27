"""qfold.onnx.export: fake-quant PyTorch -> TensorRT-profile Q/DQ ONNX; ORT matches torch within one step."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from fq_models import Mixed, ResNetish, calibrate

from calib.spec import INT8_WEIGHT_AXIS0, quantize_ref
from qfold.onnx.export import ExportConfig, export_onnx, precision_map_path
from qfold.onnx.qdq import check_trt_rules

torch.set_num_threads(1)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    return calibrate(ResNetish(width=8, blocks=1), x), x


@pytest.mark.parametrize("factory", [lambda: ResNetish(width=8, blocks=1), lambda: Mixed(c=8)], ids=["resnet", "mixed"])
def test_ort_matches_fake_quant_within_one_output_step(factory, tmp_path: Path) -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16)
    model = calibrate(factory(), x)
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    with torch.no_grad():
        want = model(x).numpy()
    got = _run(path, x.numpy())
    step = np.abs(want).max() / 127
    assert np.abs(got - want).max() <= step
    assert check_trt_rules(onnx.load(path)) == []


def test_export_is_byte_identical_and_writes_precision_map(resnet, tmp_path: Path) -> None:
    model, x = resnet
    a = export_onnx(model, x[:1], tmp_path / "a.onnx")
    b = export_onnx(model, x[:1], tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    pm = json.loads(precision_map_path(a).read_text())
    assert precision_map_path(a).read_bytes() == precision_map_path(b).read_bytes()
    assert set(pm.values()) == {"int8"} and len(pm) == sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "a.precision.json", "b.onnx", "b.precision.json"]


def test_weights_are_int8_initializers_quantized_like_tensorrt(resnet, tmp_path: Path) -> None:
    model, x = resnet
    m = onnx.load(export_onnx(model, x[:1], tmp_path / "m.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    stem_dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    codes = inits[stem_dq.input[0]]
    w = model.stem.weight.detach().numpy()
    amax = np.abs(w).reshape(w.shape[0], -1).max(1)
    assert codes.dtype == np.int8
    assert np.abs(codes.astype(int) - quantize_ref(w, amax, INT8_WEIGHT_AXIS0)).max() <= 1
    assert np.mean(codes == quantize_ref(w, amax, INT8_WEIGHT_AXIS0)) > 0.999
    assert not any(n.op_type == "Constant" for n in m.graph.node)
    assert all(any(a.name == "axis" for a in n.attribute) for n in m.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits)


def test_dynamic_batch(resnet, tmp_path: Path) -> None:
    model, x = resnet
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    for n in (1, 5):
        assert _run(path, x[:n].numpy()).shape == (n, 10)
    fixed = export_onnx(model, x[:2], tmp_path / "f.onnx", ExportConfig(dynamic_batch=False))
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _run(fixed, x[:3].numpy())


def test_user_model_is_not_modified(resnet, tmp_path: Path) -> None:
    model, x = resnet
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()


def test_bad_config_and_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset must be >= 13"):
        ExportConfig(opset=12)
    with pytest.raises(ValueError, match="exporter"):
        ExportConfig(exporter="tflite")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.Tensor"):
        export_onnx(nn.Conv2d(3, 4, 3), np.zeros((1, 3, 8, 8)), tmp_path / "m.onnx")  # type: ignore[arg-type]


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("forward failed on purpose")


def test_failed_export_leaves_previous_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="on purpose"):
        export_onnx(_Boom(), torch.zeros(1, 3, 8, 8), path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.onnx"]


def test_float_model_exports_with_both_exporters(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x).numpy()
    for exporter in ("torchscript", "dynamo"):
        path = export_onnx(model, x, tmp_path / f"{exporter}.onnx", ExportConfig(exporter=exporter, opset=17 if exporter == "torchscript" else 18))
        assert np.allclose(_run(path, x.numpy()), want, atol=1e-5)
        assert not precision_map_path(path).exists()  # no Q/DQ, no precision map
        clip = [n for n in onnx.load(path).graph.node if n.op_type == "Clip"]
        names = {t.name for t in onnx.load(path).graph.initializer}
        assert all(i in names for n in clip for i in n.input[1:] if i)
