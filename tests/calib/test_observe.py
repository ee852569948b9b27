"""Scoped observation and the calibration loop on real small models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from calib import (
    CalibMethod,
    CalibrationError,
    HistogramObserver,
    calibrate,
    observe,
    weight_amax,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 3, 1)
        self.unused = nn.Linear(4, 4)
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.bn(self.conv1(x))))
        return self.fc((x + y).mean(dim=(2, 3)))


class Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


NAMES = ["conv1", "conv2", "fc"]


def batches(n=4, bs=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(bs, 3, 8, 8, generator=g) for _ in range(n)]


def test_observe_sees_the_first_input_of_each_module_and_removes_its_hooks():
    model = Block().eval()
    x = batches(1)[0]
    with observe(model, NAMES) as obs:
        with torch.no_grad():
            model(x)
    assert obs["conv1"].compute_amax("max") == float(x.abs().max())
    inner = model.relu(model.bn(model.conv1(x))).detach()
    assert obs["conv2"].compute_amax("max") == float(inner.abs().max())
    assert obs["conv2"].num_samples == inner.numel()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_hooks_are_removed_when_the_block_raises():
    model = Block()
    with pytest.raises(RuntimeError, match="boom"):
        with observe(model, NAMES):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_input_k_and_output_points():
    add = Add()
    holder = nn.Sequential()
    holder.add_module("add", add)
    a, b = torch.full((4,), 2.0), torch.full((4,), -3.0)
    with observe(holder, ["add", "add:input1", "add:output"]) as obs:
        add(a, b)
    assert [obs[n].compute_amax("max") for n in ["add", "add:input1", "add:output"]] == [2.0, 3.0, 1.0]


def test_unknown_names_are_listed():
    with pytest.raises(CalibrationError, match=r"no submodule named \['convX', 'fc2'\].*conv1"):
        with observe(Block(), ["conv1", "convX", "fc2"]):
            pass
    with pytest.raises(CalibrationError, match="bad tensor name"):
        with observe(Block(), ["conv1:in"]):
            pass


def test_calibrate_matches_manual_observation_and_does_not_touch_the_model():
    model = Block().train()
    model.bn.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = calibrate(model, batches(), NAMES, method="percentile", progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert model.training and model.bn.training  # modes restored
    ref = HistogramObserver()
    for x in batches():
        ref.update(x)
    assert res.amax["conv1"] == ref.compute_amax("percentile")
    assert res.num_batches == 4 and res.method == CalibMethod("percentile")
    assert res.recompute("max")["conv1"] == max(float(x.abs().max()) for x in batches())


def test_calibrate_is_deterministic_and_batch_size_independent():
    model = Block().eval()
    data = torch.cat(batches())
    a = calibrate(model, list(data.split(1)), NAMES, progress=False)
    b = calibrate(model, list(data.split(12)), NAMES, progress=False)
    assert a.amax["conv1"] == b.amax["conv1"]  # input tensor: exactly the same values
    for n in NAMES:  # deeper tensors: conv kernels may round differently per batch size
        assert a.recompute("max")[n] == pytest.approx(b.recompute("max")[n], rel=1e-5)
        assert abs(a.amax[n] - b.amax[n]) <= a.observers[n].histogram.width + 1e-5 * a.amax[n]


class _Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add = Add()

    def forward(self, a, b):
        return self.add(a, b)


def test_calibrate_accepts_tuples_dicts_and_generators():
    data = [(torch.ones(3), torch.full((3,), 4.0)), {"a": torch.ones(3), "b": torch.full((3,), -5.0)}]
    res = calibrate(_Wrap(), (d for d in data), ["add:input1"], method="max", progress=False)
    assert res.amax["add:input1"] == 5.0 and res.num_batches == 2


def test_no_data_is_an_error_never_random_data():
    with pytest.raises(CalibrationError, match="no calibration data.*never falls back to random data"):
        calibrate(Block(), [], NAMES, progress=False)


def test_nan_names_the_batch_and_the_tensor():
    data = batches()
    data[2] = data[2].clone()
    data[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"batch 2: tensor 'conv1': .*NaN"):
        calibrate(Block(), data, NAMES, progress=False)


def test_inf_inside_the_model_names_the_tensor():
    model = Block().eval()
    with torch.no_grad():
        model.conv1.bias[0] = float("inf")
    with pytest.raises(CalibrationError, match=r"batch 0: tensor 'conv2': .*(Inf|NaN)"):
        calibrate(model, batches(), NAMES, progress=False)


def test_tensors_never_observed_are_listed():
    with pytest.raises(CalibrationError, match=r"never observed in 4 batches: \['unused'\]"):
        calibrate(Block(), batches(), NAMES + ["unused"], progress=False)


def test_bad_batch_type():
    with pytest.raises(CalibrationError, match="batch must be a Tensor"):
        calibrate(Block(), [np.zeros((1, 3, 8, 8))], NAMES, progress=False)


def test_progress_bar_runs(capsys):
    calibrate(Block(), batches(2), NAMES, progress=True)
    assert "calibrate" in capsys.readouterr().err


@pytest.mark.parametrize("shape,axis", [((8, 3, 3, 3), 0), ((3, 8, 3, 3), 1), ((5, 7), 0)])
def test_weight_amax_per_channel(shape, axis):
    w = torch.randn(shape)
    w.select(axis, 1).zero_()
    got = weight_amax(w, axis)
    assert got.shape == (shape[axis],) and got[1] == 0
    for c in range(shape[axis]):
        assert got[c] == w.select(axis, c).abs().max()


def test_weight_amax_errors():
    with pytest.raises(CalibrationError, match="axis 2 is out of range.*ConvTranspose"):
        weight_amax(torch.ones(4, 4), 2)
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        weight_amax(torch.tensor([[float("nan")]]), 0)


@pytest.mark.cuda
def test_cuda_tensors_give_the_same_histogram_as_cpu():
    x = torch.randn(10_000) * 3
    a, b = HistogramObserver(), HistogramObserver()
    a.update(x)
    b.update(x.cuda())
    assert np.array_equal(a.histogram.counts, b.histogram.counts)
    for m in ["max", "percentile", "entropy", "mse"]:
        assert a.compute_amax(m) == b.compute_amax(m)
    model = Block().cuda().eval()
    res = calibrate(model, batches(), NAMES, progress=False, device="cuda")
    assert res.amax["conv1"] == calibrate(Block().eval(), batches(), ["conv1"], progress=False).amax["conv1"]
