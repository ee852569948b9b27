"""Fewer passes over the data (issue 17): the same numbers as running every model separately."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import ResNetStyle, randomize_bn

from qfold.bound import formulas as bm
from qfold.bound.passes import bound_relu
from qfold.capture import trace
from qfold.config import PTQConfig
from qfold.pipeline import run_ptq
from qfold.quant import plan_quantization, prepare_fake_quant
from qfold.quant.modules import QuantLayer
from qfold.quant.prepare import act_quantizers, quant_layers
from qfold.report import stages as ev


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _scaled(model: nn.Module, k: float) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(k)
    return model.eval()


def _fake_quant(model: nn.Module, x: torch.Tensor):
    gm = trace(model)
    fq = prepare_fake_quant(gm, plan_quantization(gm))
    for q in act_quantizers(fq).values():
        q.set_amax(float(x.abs().max()))
    for layer in quant_layers(fq).values():
        layer.refresh_weight_amax()
    return gm, fq


def test_paired_pass_gives_each_models_outputs_and_the_layer_sqnr() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(37, 3, 8, 8)
    gm, fq = _fake_quant(model, x)
    names = ["conv1", "conv2", "fc"]
    a, b, sq = ev.paired_logits(gm, fq, names, x, 16)
    np.testing.assert_array_equal(a, ev.run_logits(gm, x, 16))
    np.testing.assert_array_equal(b, ev.run_logits(fq, x, 16))
    # per-layer SQNR from outputs captured separately, one model at a time
    for n in names:
        outs = []
        for m in (gm, fq):
            got = []
            h = m.get_submodule(n).register_forward_hook(lambda _m, _i, o, got=got: got.append(o.detach().double()))
            with torch.no_grad():
                m(x)
            h.remove()
            outs.append(got[0])
        want = 10 * math.log10(float((outs[0] ** 2).sum()) / float(((outs[0] - outs[1]) ** 2).sum()))
        assert sq[n] == pytest.approx(want, rel=1e-6)  # float32 energies (metrics.energy)
        assert math.isfinite(sq[n]) and sq[n] > 10
    assert ev.layer_sqnr(gm, fq, names, x, 16) == sq


@pytest.mark.parametrize("spread", [1e-3, 1.0, 1e4])
def test_float32_channel_histograms_equal_the_float64_ones(spread: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 5000, generator=g) * spread * torch.logspace(-3, 3, 6)[:, None]).float()
    x[2] = 0.0  # a dead channel
    x[3, :10] = torch.tensor(1e-42)  # subnormal float32 values
    h32 = h64 = bm.hist_empty(6, 256)
    for part in x.split(1700, dim=1):
        h32 = bm.hist_update(h32, part)
        h64 = bm.hist_update(h64, part.double())
    assert torch.equal(h32.counts, h64.counts) and torch.equal(h32.hi, h64.hi) and torch.equal(h32.maxv, h64.maxv)
    assert int(h32.counts.sum()) == 6 * 5000 and h32.counts[0].sum() == 5000


def test_bound_report_numbers_from_the_statistics_pass() -> None:
    """above6, output SQNR and agreement equal what separate runs of both models measure."""
    torch.manual_seed(0)
    model = _scaled(Net(), 3.0)
    x = 4 * torch.randn(40, 3, 8, 8)
    rows = []  # rows through any first conv (the traced copy's or the bounded model's)
    h = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: rows.append(a[0].shape[0]) if isinstance(m, nn.Conv2d) and m.in_channels == 3 else None
    )
    try:
        bounded, rep = bound_relu(model, [x[:16], x[16:32], x[32:]])
    finally:
        h.remove()
    assert sum(rows) == 2 + 40 + 40  # a two-row shape probe, the statistics pass, the bounded model's pass
    with torch.no_grad():
        ref, out = model(x).double(), bounded(x).double()
        pre1 = model.conv1(x)
        pre2 = model.conv2(F.relu(pre1)) + F.relu(pre1)
    assert rep.samples == 40
    assert rep.output_sqnr_db == pytest.approx(10 * math.log10(float((ref**2).sum()) / float(((ref - out) ** 2).sum())), rel=1e-9)
    assert rep.top1_agreement == float((ref.argmax(1) == out.argmax(1)).double().mean())
    assert [s.above6_fp32 for s in rep.sites] == [float((pre1 > 6).double().mean()), float((pre2 > 6).double().mean())]
    assert rep.sites[0].above6_fp32 > 0.01


def test_bound_report_of_a_model_without_relu_sites() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3), nn.Hardtanh(0.0, 6.0)).eval()
    x = torch.randn(10, 3, 8, 8) * 5
    bounded, rep = bound_relu(model, x, mode="swap")
    with torch.no_grad():
        assert torch.equal(bounded(x), model(x))
    assert rep.sites == () and len(rep.already_bounded) == 2
    assert rep.samples == 10 and rep.output_sqnr_db == math.inf and rep.top1_agreement == 1.0


def test_stage_samples_limits_folded_bounded_and_layers_only(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(ResNetStyle()).eval()
    cx, ex = torch.randn(48, 3, 12, 12), torch.randn(50, 3, 12, 12)
    ey = torch.arange(50) % 5
    cfg = PTQConfig(progress=False).replace(calib={"batch_size": 16}, eval={"plots": False, "batch_size": 16})
    full = run_ptq(model, cx, ex, ey, config=cfg, out_dir=tmp_path / "full").accuracy
    part = run_ptq(model, cx, ex, ey, config=cfg.replace(eval={"stage_samples": 20}), out_dir=tmp_path / "part").accuracy
    assert full.stage_samples == {} and "stage_samples" not in full.to_dict()
    assert part.stage_samples == {"folded": 20, "bounded": 20, "fake_quant": 50, "engine": 50, "layers": 20}
    # a subset stage's drop compares with the reference on the same samples
    assert part.reference["subset"]["samples"] == 20 and full.drop_pp("engine") == part.drop_pp("engine")
    ref20 = float((ev.run_logits(model, ex[:20], 16).argmax(1) == ey[:20].numpy()).mean())
    assert part.reference["subset"]["top1"] == ref20 and part.drop_pp("folded") == pytest.approx(100 * (ref20 - part.stages["folded"].top1))
    assert "Measured on a subset" in part.to_markdown()
    assert part.stages["engine"] == full.stages["engine"]  # the same engine on the same batches
    assert part.stages["fake_quant"].agreement == full.stages["fake_quant"].agreement
    assert part.stages["fake_quant"].sqnr_db == pytest.approx(full.stages["fake_quant"].sqnr_db, rel=1e-5)
    # the folded stage on 20 samples is the full run's first 20 rows
    ref = ev.run_logits(model, ex[:20], 16)
    assert part.stages["folded"].top1 == ev.stage_metrics(ref, ev.run_logits(trace(model), ex[:20], 16), ey[:20]).top1
    assert part.stages["folded"].sqnr_db > 60 and {layer.name for layer in part.layers} == {layer.name for layer in full.layers}
    with pytest.raises(ValueError, match="stage_samples must be >= 1"):
        cfg.replace(eval={"stage_samples": 0})


class _Rows:
    """Counts the rows every forward of a model's first conv (3 input channels) sees: one pass of
    ``n`` samples adds ``n``. A global module hook, so it also sees traced and prepared copies."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __enter__(self) -> "_Rows":
        def pre(m: nn.Module, args: tuple) -> None:
            conv = m.layer if isinstance(m, QuantLayer) else m  # QuantLayer runs its conv without calling it
            if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
                self.calls.append(args[0].shape[0])
        self.h = torch.nn.modules.module.register_module_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc: object) -> None:
        self.h.remove()


def test_calibration_pass_completes_the_bound_report() -> None:
    """The deferred report equals bound_relu's, with the bounded pass taken from calibration."""
    from qfold.bound.passes import BoundConfig, bound_relu_deferred
    from qfold.pipeline import calibrate_stage

    torch.manual_seed(0)
    model = _scaled(Net(), 3.0)
    x = 4 * torch.randn(40, 3, 8, 8)
    data = [x[:16], x[16:32], x[32:]]
    want_gm, want = bound_relu(model, data, quantile=0.99)  # caps low enough to clip some values
    with _Rows() as rows:
        gm, pending = bound_relu_deferred(model, data, config=BoundConfig(quantile=0.99))
    assert rows.calls == [2, 16, 16, 8]  # the shape probe and the statistics pass; no bounded pass
    assert not pending.complete
    with pytest.raises(Exception, match="ran over 0 batches"):
        pending.report()
    cfg = PTQConfig(progress=False).replace(calib={"batch_size": 16})
    with _Rows() as rows:
        calibrate_stage(gm, x, cfg, bound_report=pending)
    assert rows.calls == [16, 16, 8]  # calibration's own pass, nothing more
    got = pending.report()
    assert got == want and got.output_sqnr_db < math.inf and max(s.clipped for s in got.sites) > 0
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), want_gm.state_dict().values()))


def test_bound_values_takes_the_caps_from_the_leading_rows() -> None:
    """bound.values: the caps come from exactly the leading rows that give every channel that many
    values (the smallest map sets the rows), whatever the batch size; the statistics pass reads
    the whole batches holding them, and the report compares those."""
    from qfold.bound.passes import BoundConfig, bound_relu_deferred
    from qfold.pipeline import calibrate_stage

    torch.manual_seed(0)
    model = _scaled(Net(), 3.0)
    x = 4 * torch.randn(40, 3, 8, 8)
    x[32:] *= 3  # the batch past the subset would raise the caps if it were read
    smallest = min(math.prod(s[2:]) for s in _site_shapes(model, x[:2]))
    want_gm, want = bound_relu(model, [x[:20]], config=BoundConfig(quantile=0.99, values=0))  # the caps' rows
    with _Rows() as rows:
        gm, pending = bound_relu_deferred(model, [x[:16], x[16:32], x[32:]], config=BoundConfig(quantile=0.99, values=20 * smallest))
    assert rows.calls[-2:] == [16, 16] and sum(r for r in rows.calls if r == 16) == 32  # 20 rows: two whole batches
    with pytest.raises(ValueError, match="bound.values must be >= 0"):
        BoundConfig(values=-1)
    calibrate_stage(gm, x, PTQConfig(progress=False).replace(calib={"batch_size": 16}), bound_report=pending)
    got = pending.report()
    assert [s.caps for s in got.sites] == [s.caps for s in want.sites] and got.samples == 32
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), want_gm.state_dict().values()))
    one_gm, _ = bound_relu_deferred(model, [x[:40]], config=BoundConfig(quantile=0.99, values=20 * smallest))
    assert all(torch.equal(a, b) for a, b in zip(one_gm.state_dict().values(), want_gm.state_dict().values()))  # one batch: same caps
    _, everything = bound_relu(model, [x[:16], x[16:32], x[32:]], config=BoundConfig(quantile=0.99, values=0))
    assert everything.samples == 40 and everything.sites != got.sites  # the third batch matters when read


def _site_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple]:
    from qfold.bound.passes import _shapes
    from qfold.capture import trace
    from qfold.fx import relu_site

    gm = trace(model)
    shapes = _shapes(gm, x)
    return [shapes[n.name] for n in gm.graph.nodes if relu_site(gm, n) is not None]


def test_deferred_report_of_a_model_without_relu_sites_is_complete() -> None:
    from qfold.bound.passes import BoundConfig, bound_relu_deferred

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(10, 3, 8, 8)
    with _Rows() as rows:
        gm, pending = bound_relu_deferred(model, x, config=BoundConfig())
    assert pending.complete and rows.calls == [2, 1]  # a shape probe and a one-row output probe, no pass
    with pending.observe(gm), torch.no_grad():
        gm(x)  # watches nothing
    assert pending.report() == bound_relu(model, x)[1]


def test_calibration_part_passes_over_the_data(tmp_path) -> None:
    """fold, bound and calibrate of a ReLU ResNet: two full passes in PyTorch (statistics, calibration)."""
    from qfold.pipeline import bound_stage, calibrate_stage, fold_stage

    torch.manual_seed(0)
    model = randomize_bn(ResNetStyle()).eval()
    cx = torch.randn(48, 3, 12, 12)
    cfg = PTQConfig(progress=False).replace(calib={"batch_size": 16})
    with _Rows() as rows:
        folded, _ = fold_stage(model, cfg, cx[:2])
        bounded, pending = bound_stage(folded, cx, cfg, defer_report=True)
        calibrate_stage(bounded, cx, cfg, bound_report=pending)
    full = [n for n in rows.calls if n > 2]
    assert full == [16, 16, 16] * 2, rows.calls  # statistics pass, calibration pass
    assert sum(n for n in rows.calls if n <= 2) <= 8  # the fold's and the bound's probes: a few samples
    assert pending.report().samples == 48


def test_engine_check_reuses_the_calibration_run_of_the_qdq_graph(tmp_path) -> None:
    """The Q/DQ graph's outputs kept by ort_calibrate_with_outputs are what the rendering check
    computes itself: the engine and its metadata (check numbers included) come out identical."""
    import json

    import onnx
    import onnxruntime as ort

    from qfold.engine.ort import OrtBackend, ort_calibrate, ort_calibrate_with_outputs
    from qfold.onnx.export import export_onnx
    from qfold.onnx.qdq import tensors_needing_amax_for_ort

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(48, 3, 8, 8)
    _, fq = _fake_quant(model, x)
    path = export_onnx(fq, x[:1], tmp_path / "m.onnx")
    qdq = onnx.load(str(path))
    tensors = tensors_needing_amax_for_ort(qdq)
    assert tensors  # the residual branch's conv output
    data = [b.numpy() for b in x.split(16)]
    amax, outs = ort_calibrate_with_outputs(qdq, tensors, data, keep=2)
    assert amax == ort_calibrate(qdq, tensors, data) and len(outs) == 2
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for b, o in zip(data, outs):
        np.testing.assert_array_equal(o, sess.run(None, {sess.get_inputs()[0].name: b})[0])
    b = OrtBackend()
    b.build(path, tmp_path / "a.onnx", extra_amax=amax, check_data=data[:2])
    b.build(path, tmp_path / "b.onnx", extra_amax=amax, check_data=data[:2], check_reference=outs)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    meta = [json.loads((tmp_path / f"{k}.onnx.json").read_text()) for k in "ab"]
    for m in meta:
        m.pop("engine_path")
    assert meta[0] == meta[1] and meta[0]["extra"]["rendering_check"]["samples"] == 32
    with pytest.raises(ValueError, match="do not match the check batches"):
        b.build(path, tmp_path / "c.onnx", extra_amax=amax, check_data=data, check_reference=outs)


def test_channels_last_runs_change_only_rounding(tmp_path) -> None:
    """config.channels_last: the same quantization up to float32 summation order; the user's model untouched."""
    torch.manual_seed(0)
    model = randomize_bn(ResNetStyle()).eval()
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    cx = torch.randn(32, 3, 12, 12)
    cfg = PTQConfig(progress=False).replace(calib={"batch_size": 16}, eval={"plots": False, "batch_size": 16})
    ref = run_ptq(model, cx, config=cfg, out_dir=tmp_path / "a")
    cl = run_ptq(model, cx, config=dataclasses.replace(cfg, channels_last=True), out_dir=tmp_path / "b")
    assert all(torch.equal(v, before[k][0]) and v.stride() == before[k][1] for k, v in model.state_dict().items())
    convs = [m for m in cl.fake_quant.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert ref.amax.keys() == cl.amax.keys()
    assert all(cl.amax[k] == pytest.approx(v, rel=1e-5) for k, v in ref.amax.items())
    for stage in ("fake_quant", "engine"):
        assert cl.accuracy.stages[stage].sqnr_db == pytest.approx(ref.accuracy.stages[stage].sqnr_db, abs=0.05)
    # nothing clipped here: both bound reports measure float32 rounding only (> 100 dB), in different orders
    assert min(cl.reports["bound"].output_sqnr_db, ref.reports["bound"].output_sqnr_db) > 100
    assert cl.reports["bound"].sites == ref.reports["bound"].sites or all(
        a.name == b.name and a.caps == pytest.approx(b.caps, rel=1e-5) for a, b in zip(cl.reports["bound"].sites, ref.reports["bound"].sites))


def test_histograms_of_a_channels_last_tensor_equal_the_contiguous_ones() -> None:
    """Both histograms flatten in memory order (a view for channels-last): the same counts."""
    from calib.observer import HistogramObserver

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 9, 7, generator=g) * torch.logspace(-2, 2, 6).view(1, 6, 1, 1)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    a, b = HistogramObserver(2048), HistogramObserver(2048)
    a.update(x)
    b.update(xc)
    assert np.array_equal(a.histogram.counts, b.histogram.counts) and a.histogram.amax == b.histogram.amax
    h1 = bm.hist_update(bm.hist_empty(6, 256), x, axis=1)
    h2 = bm.hist_update(bm.hist_empty(6, 256), xc, axis=1)
    assert torch.equal(h1.counts, h2.counts) and torch.equal(h1.maxv, h2.maxv) and int(h1.counts.sum()) == x.numel()
