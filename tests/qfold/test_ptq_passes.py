"""Fewer passes over the data (issue 17): the same numbers as running every model separately."""
from __future__ import annotations

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
        assert sq[n] == pytest.approx(want, rel=1e-9)
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
