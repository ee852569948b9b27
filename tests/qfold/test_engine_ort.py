"""qfold.engine: registry, the ONNX Runtime backend (build/load/run), engine files and metadata."""
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

sys.path.insert(0, os.path.dirname(__file__))
from fq_models import ResNetish, calibrate

from qfold.engine import BACKENDS, EngineConfig, get_backend
from qfold.engine.base import metadata_path
from qfold.engine.ort import OrtBackend, ort_max_amax
from qfold.onnx.export import export_onnx
from qfold.onnx.qdq import tensors_needing_amax_for_ort

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qdq(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    net = calibrate(ResNetish(width=8, blocks=1), x)
    return export_onnx(net, x[:1], tmp_path_factory.mktemp("m") / "m.onnx"), net, x


def test_registry_names_and_errors() -> None:
    assert set(BACKENDS) == {"onnxruntime", "tensorrt"}
    assert isinstance(get_backend("onnxruntime"), OrtBackend)
    with pytest.raises(ValueError, match="known backends: onnxruntime, tensorrt"):
        get_backend("openvino")


def test_build_load_run_matches_fake_quant(qdq, tmp_path: Path) -> None:
    path, net, x = qdq
    model = onnx.load(path)
    amax = ort_max_amax(model, tensors_needing_amax_for_ort(model), [x.numpy()])
    backend = get_backend("onnxruntime")
    config = EngineConfig(intra_op_threads=1)
    info = backend.build(path, tmp_path / "e.onnx", config, extra_amax=amax)
    engine = backend.load(tmp_path / "e.onnx", config)
    got = engine.run(x.numpy())
    with torch.no_grad():
        want = net(x).numpy()
    step = np.abs(want).max() / 127
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 4 * step  # extra Q/DQ on conv outputs: a few output steps at most
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    meta = json.loads(metadata_path(tmp_path / "e.onnx").read_text())
    assert meta["onnx_sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert meta["versions"] == {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    assert meta["extra"]["providers"] == ["CPUExecutionProvider"]
    assert meta["extra"]["float_for_lack_of_amax"] == [] and meta["extra"]["rendering"]["uint8_activations"]
    assert engine.info.onnx_sha256 == info.onnx_sha256
    assert sorted(os.listdir(tmp_path)) == ["e.onnx", "e.onnx.json"]  # no temporary files left


def test_build_is_deterministic_and_reports_missing_amax(qdq, tmp_path: Path) -> None:
    path, _, x = qdq
    b = OrtBackend()
    i1 = b.build(path, tmp_path / "a.onnx")
    b.build(path, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert i1.extra["float_for_lack_of_amax"] == tensors_needing_amax_for_ort(onnx.load(path))
    assert np.isfinite(b.load(tmp_path / "a.onnx").run(x.numpy())).all()


def test_errors_are_clear_and_leave_nothing_behind(qdq, tmp_path: Path) -> None:
    path = qdq[0]
    b = OrtBackend()
    with pytest.raises(FileNotFoundError, match="qfold export"):
        b.build(tmp_path / "missing.onnx", tmp_path / "e.onnx")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="build the engine first"):
        b.load(tmp_path / "e.onnx")
    b.build(path, tmp_path / "e.onnx")
    with pytest.raises(TypeError, match="astype"):
        b.load(tmp_path / "e.onnx").run(np.zeros((1, 3, 16, 16), np.int64))
    (tmp_path / "e.onnx").write_bytes((tmp_path / "e.onnx").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256 differs"):
        b.load(tmp_path / "e.onnx")
    with pytest.raises(ValueError, match="device"):
        b.build(path, tmp_path / "f.onnx", EngineConfig(device="tpu"))


@pytest.mark.skipif(bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers())),
                    reason="this onnxruntime has GPU providers; the missing-provider error cannot be provoked")
def test_cuda_without_gpu_providers_errors(qdq, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        OrtBackend().build(qdq[0], tmp_path / "e.onnx", EngineConfig(device="cuda"))


def test_ort_max_amax_is_the_max_abs_of_the_tensor(qdq) -> None:
    path, _, x = qdq
    model = onnx.load(path)
    name = tensors_needing_amax_for_ort(model)[0]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = float(np.abs(sess.run([name], {"input": x.numpy()})[0]).max())
    got = ort_max_amax(model, [name], [x[:8].numpy(), x[8:].numpy()])
    assert got == {name: pytest.approx(want, rel=1e-6)}


def test_the_self_check_rows_follow_the_input_size():
    """Small inputs: up to 256 rows; a 224x224 image: 27 (4 Mi input values); never under 8."""
    from qfold.engine.ort import self_check_rows

    assert self_check_rows(64) == 256 and self_check_rows(3 * 224 * 224) == 27 and self_check_rows(10**9) == 8
