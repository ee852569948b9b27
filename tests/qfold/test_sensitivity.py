"""Per-layer sensitivity (cone re-evaluation vs full re-runs), calibration "auto", and the mixed-precision search."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import calib
from calib.auto import auto_amax, error_moments
from qfold import pipeline as pl
from qfold.budget.fallback import search_fallback
from qfold.budget.sensitivity import layer_sensitivity
from qfold.config import PTQConfig
from qfold.quant.prepare import quant_layers

FAST = PTQConfig(progress=False).replace(eval={"plots": False, "layer_report": False})


class Small(nn.Module):
    """conv-relu x3 with a residual add, pooling and a linear head (every quant point read by one layer)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        c = torch.relu(self.c3(b) + a)
        return self.fc(c.mean((2, 3)))


def _prepared(model: nn.Module, x: torch.Tensor, config: PTQConfig = FAST):
    folded, _ = pl.fold_stage(model, config, x[:2])
    bounded, _ = pl.bound_stage(folded, x, config)
    fq, plan, _ = pl.calibrate_stage(bounded, x, config)
    return fq, plan


def test_cone_reevaluation_equals_full_reruns_and_the_real_fake_quant_model():
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(40, 1, 12, 12)
    y = torch.randint(0, 4, (40,))
    fq, plan = _prepared(model, x)
    cone = layer_sensitivity(fq, plan, x, y, reference=model, batch_size=16, method="cone")
    full = layer_sensitivity(fq, plan, x, y, reference=model, batch_size=16, method="full")
    assert [(s.name, s.only_quantized, s.only_float) for s in cone.layers] == [(s.name, s.only_quantized, s.only_float) for s in full.layers]
    assert cone.meta["evaluated_nodes_per_batch"] < full.meta["evaluated_nodes_per_batch"]
    with torch.no_grad():
        ref = model(x).double().numpy()
        all_q = fq(x).double().numpy()
    assert cone.all_quantized.sqnr_db == pytest.approx(10 * np.log10((ref**2).sum() / ((ref - all_q) ** 2).sum()), rel=1e-9)
    # "only c3 float" is the real model with c3's weight and input quantizer off (c3 is the only reader of its point)
    layer = quant_layers(fq)["c3"]
    q_in = [n for n in fq.graph.nodes if n.op == "call_module" and n.target == "c3"][0].args[0]
    act = fq.get_submodule(q_in.target)
    layer.enabled.fill_(False)
    act.enabled.fill_(False)
    with torch.no_grad():
        out = fq(x).double().numpy()
    layer.enabled.fill_(True)
    act.enabled.fill_(True)
    got = next(s for s in cone.layers if s.name == "c3").only_float.sqnr_db
    assert got == pytest.approx(10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()), rel=1e-9)
    assert [s.rank for s in cone.layers] == list(range(1, len(plan.layers) + 1))


def test_auto_score_is_mse_plus_coherent_mean_error_and_falls_back_to_max():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=1_000_000))
    x[:2] = 60.0  # two huge outliers: max wastes the range, clipping them is worth it
    obs = calib.HistogramObserver(2048)
    obs.update(torch.from_numpy(x))
    h = obs.histogram
    choice = auto_amax(h, coherence=1.0)
    assert choice.method != "max" and choice.amax < 60
    mse, mean = error_moments(h, choice.amax)
    assert choice.scores[choice.method] == pytest.approx(mse)
    heavy = auto_amax(h, coherence=1e6)  # a huge coherent weight makes any clipping bias cost more than range
    assert heavy.scores["max"] == pytest.approx(error_moments(h, 60.0)[0] + (1e6 - 1) * error_moments(h, 60.0)[1] ** 2)
    assert heavy.method == min(heavy.scores, key=heavy.scores.get) or heavy.method == "max"
    flat = calib.HistogramObserver(2048)
    flat.update(torch.linspace(-3, 3, 10_000))  # uniform: no candidate beats max by the 20 % margin
    assert auto_amax(flat.histogram).method == "max"
    assert calib.compute_amax(flat, "auto") == pytest.approx(3.0)
    with pytest.raises(ValueError, match="coherence"):
        auto_amax(h, coherence=-1.0)


def test_auto_calibration_records_choices_and_is_not_worse_than_max_on_the_reference_resnet(tmp_path):
    from qfold.examples import load_data, load_model

    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    model = load_model("resnet")
    sq = {}
    for method in ("max", "auto"):  # the shipped split: 512 calibration, 1,000 test images (all models: BENCHMARKS.md)
        cfg = FAST.replace(calib={"method": method})
        fq, plan = _prepared(model, cx, cfg)
        with torch.no_grad():
            ref, out = model(tx).double(), fq(tx).double()
        sq[method] = float(10 * torch.log10((ref**2).sum() / ((ref - out) ** 2).sum()))
    assert sq["auto"] >= sq["max"] - 1e-9
    res = pl.run_ptq(model, cx[:128], tx[:64], ty[:64], config=FAST.replace(calib={"method": "auto"}), out_dir=tmp_path)
    table = json.loads((tmp_path / "calibration.json").read_text())
    assert table["method"] == "auto" and table["schema"] == 1
    auto = table["meta"]["auto"]
    assert set(auto["tensors"]) == set(table["amax"]) and auto["check"]["kept"] in ("auto", "max")
    for key, t in auto["tensors"].items():
        assert set(t["candidates"]) == {"max", "percentile", "mse", "entropy"} and t["method"] in t["candidates"]
        if auto["check"]["kept"] == "max":
            assert table["amax"][key] >= t["candidates"]["max"] - 1e-12  # concat groups may share a larger max
    assert calib.CalibTable.load_json(tmp_path / "calibration.json").method == "auto"
    text = (tmp_path / "calibration.json").read_bytes()
    pl.run_ptq(model, cx[:128], tx[:64], ty[:64], config=FAST.replace(calib={"method": "auto"}), out_dir=tmp_path / "again")
    assert (tmp_path / "again" / "calibration.json").read_bytes() == text  # deterministic
    assert res.accuracy.stages["engine"].sqnr_db > 30


class FragileResNet(nn.Module):
    """The reference ResNet plus a spike path on the classifier's input: exactly zero unless the top-left
    pixel exceeds 3 (no normalized MNIST image does: their maximum is 2.82), else 10,000 x the excess.
    Two calibration images get 3.5 there, so the fc layer's input has a few huge outliers."""

    def __init__(self) -> None:
        super().__init__()
        from qfold.examples import load_model

        self.net = load_model("resnet")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        h = torch.flatten(n.pool(n.layer4(n.layer3(n.layer2(n.layer1(n.stem(x)))))), 1)
        return n.fc(h + 10000.0 * torch.relu(x[:, :, 0, 0] - 3.0))


def test_fragile_layer_is_ranked_first_and_kept_float_by_the_search(tmp_path):
    from qfold.examples import load_data

    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    cx = cx[:128].clone()
    cx[:2, 0, 0, 0] = 3.5
    model = FragileResNet().eval()
    cfg = FAST.replace(eval={"max_drop_pp": 1.0, "fallback": "auto"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # separate evaluation data: no warning
        res = pl.run_ptq(model, cx, tx[:200], ty[:200], config=cfg, out_dir=tmp_path)
    fb = json.loads((tmp_path / "fallback.json").read_text())
    sens = json.loads((tmp_path / "sensitivity.json").read_text())
    assert sens["layers"][0]["name"] == "net.fc"
    assert sens["layers"][0]["only_quantized"]["sqnr_db"] < sens["layers"][1]["only_quantized"]["sqnr_db"] - 10
    assert fb["steps"][0]["float_layers"] == [] and fb["steps"][0]["drop_pp"] > 1.0  # all int8 misses the budget
    assert fb["met"] and fb["float_layers"] == ["net.fc"]
    assert res.accuracy.drop_pp("engine") <= 1.0
    assert res.accuracy.drop_pp("engine") == pytest.approx(fb["steps"][fb["chosen_step"]]["drop_pp"])  # the build is the step
    prec = json.loads((tmp_path / "model_qdq.precision.json").read_text())
    assert prec["layers"]["net.fc"].startswith("float (fallback search")
    assert "net.fc" in (tmp_path / "config.fallback.toml").read_text()


def test_search_reports_best_when_the_budget_cannot_be_met_and_warns_on_shared_data():
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(48, 1, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1)  # the FP32 model is 100 % right; a budget of -50 pp cannot be met
    cfg = FAST.replace(eval={"max_drop_pp": -50.0, "fallback": "auto"})
    folded, _ = pl.fold_stage(model, cfg, x[:2])
    with pytest.warns(UserWarning, match="evaluation data is the calibration data"):
        fb = search_fallback(model, folded, x, x, y, cfg)
    assert not fb.met and fb.steps[-1].float_layers == tuple(fb.ranking[:-1])  # grew to all layers but one
    best = min(fb.steps, key=lambda s: (s.drop_pp, len(s.float_layers), s.step))
    assert fb.chosen == best.step
    with pytest.raises(ValueError, match="labelled evaluation data"):
        search_fallback(model, folded, x, x, None, cfg)
    with pytest.raises(ValueError, match="needs eval.max_drop_pp"):
        FAST.replace(eval={"fallback": "auto"})


def test_cli_sensitivity_writes_the_ranked_table_and_fallback_needs_a_budget(tmp_path):
    import subprocess
    import sys

    from qfold.examples import load_data

    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    np.savez(tmp_path / "calib.npz", x=cx[:64].numpy())
    np.savez(tmp_path / "test.npz", x=tx[:48].numpy(), y=ty[:48].numpy())
    common = ["--model", "qfold.examples:load_model", "--calib-data", "calib.npz", "--no-progress"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "qfold.cli", *a], cwd=tmp_path, capture_output=True, text=True, timeout=900)  # noqa: E731
    r = run("sensitivity", *common, "--eval-data", "test.npz", "--out", "s")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert len(data["layers"]) == 13 and data["samples"] == 48 and (tmp_path / "s" / "sensitivity.png").is_file()
    sq = [layer["only_quantized"]["sqnr_db"] for layer in data["layers"]]
    assert sq == sorted(sq) and "| 1 |" in (tmp_path / "s" / "sensitivity.md").read_text()
    r = run("ptq", *common, "--fallback", "auto", "--out", "p")
    assert r.returncode == 2 and "needs eval.max_drop_pp" in r.stderr
