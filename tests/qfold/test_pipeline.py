"""End to end: the PTQ pipeline on the shipped example, the CLI in a subprocess, the edge build."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qfold.config import PTQConfig
from qfold.errors import QualityGateError
from qfold.examples import load_data, load_model
from qfold.pipeline import run_ptq

REPO = Path(__file__).resolve().parents[2]
FAST = PTQConfig(progress=False).replace(calib={"method": "max"}, eval={"plots": False})


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq")
    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    res = run_ptq(load_model("resnet"), cx[:256], tx[:300], ty[:300], config=FAST.replace(eval={"plots": True}), out_dir=out)
    return res, out, tx[:300]


def test_artifacts_are_complete_and_valid(example_run):
    res, out, _ = example_run
    names = {p.name for p in out.iterdir()}
    assert {"model_qdq.onnx", "calibration.json", "calibration.trtcache", "engine.ort.onnx", "accuracy.json",
            "accuracy.md", "model_qdq.precision.json", "reports.json", "layer_sqnr.png", "activation_histograms.png"} <= names
    model = onnx.load(str(out / "model_qdq.onnx"))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("DequantizeLinear") > 10
    assert res.reports["trt_rule_violations"] == []
    assert res.reports["fold"].left == () or len(res.reports["fold"].left) == 0
    acc = json.loads((out / "accuracy.json").read_text())
    for stage in ("folded", "bounded", "fake_quant", "engine"):
        assert set(acc["stages"][stage]) == {"top1", "top5", "agreement", "sqnr_db", "max_abs_err"}
    assert acc["layers"] and acc["layers"][0]["sqnr_db"] <= acc["layers"][-1]["sqnr_db"]  # worst first
    header = (out / "calibration.trtcache").read_text().splitlines()[0]
    assert header.startswith("TRT-") and header.endswith("MinMaxCalibration")


def test_accuracy_loss_is_small_and_stages_are_consistent(example_run):
    res, _, _ = example_run
    st = res.accuracy.stages
    assert st["folded"].sqnr_db > 100  # folding is exact to float rounding
    assert st["bounded"].agreement >= 0.99
    assert st["fake_quant"].sqnr_db > 30 and st["engine"].sqnr_db > 30
    assert res.accuracy.drop_pp("engine") <= 1.0


def test_trt_profile_onnx_in_ort_matches_fake_quant_within_one_output_step(example_run):
    res, out, tx = example_run
    sess = ort.InferenceSession(str(out / "model_qdq.onnx"), providers=["CPUExecutionProvider"])
    x = tx[:64]
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = res.fake_quant(x).numpy()
    step = np.abs(ref).max() / 127  # one int8 step of the output tensor
    assert np.abs(got - ref).max() <= step


def test_bad_inputs_have_clear_errors(tmp_path):
    model = load_model("resnet")
    cx, _ = load_data("calib")
    with pytest.raises(ValueError, match=r"training mode; call model.eval\(\)"):
        run_ptq(model.train(), cx[:8], config=FAST, out_dir=tmp_path)
    model.eval()
    with pytest.raises(ValueError, match="no calibration data"):
        run_ptq(model, cx[:0], config=FAST, out_dir=tmp_path)
    bad = cx[:8].clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf.*sample 3"):
        run_ptq(model, bad, config=FAST, out_dir=tmp_path)
    with pytest.raises(ValueError, match="matches no"):
        run_ptq(model, cx[:8], config=FAST.replace(export={"keep_float": ["nothing.here"]}), out_dir=tmp_path)


def test_budget_exceeded_raises_after_writing_reports(tmp_path):
    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    cfg = FAST.replace(eval={"max_drop_pp": -100.0, "layer_report": False}, bound={"mode": "off"})
    with pytest.raises(QualityGateError, match="exceeds the budget"):
        run_ptq(load_model("resnet"), cx[:64], tx[:64], ty[:64], config=cfg, out_dir=tmp_path)
    assert (tmp_path / "accuracy.md").is_file()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qfold.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_ptq_example_end_to_end(tmp_path):
    r = _cli("ptq", "--example", "--out", "out", "--no-progress", "--method", "max", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| engine |" in r.stdout
    acc = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert acc["reference"]["samples"] == 1000 and acc["stages"]["engine"]["agreement"] > 0.98
    r = _cli("ptq", "--example", "--out", "out2", "--no-progress", "--method", "max", "--bound-mode", "off",
             "--max-drop", "-100", "--stage-samples", "100", cwd=tmp_path)
    assert r.returncode == 3 and "exceeds the budget" in r.stderr
    part = json.loads((tmp_path / "out2" / "accuracy.json").read_text())
    assert part["stage_samples"]["folded"] == 100 and part["stage_samples"]["engine"] == 1000
    assert part["reference"]["subset"]["samples"] == 100


def test_cli_errors_name_the_cause(tmp_path):
    r = _cli("ptq", "--model", "no_such_module:factory", "--calib-data", "x.npy", cwd=tmp_path)
    assert r.returncode == 2 and "cannot import module 'no_such_module'" in r.stderr
    r = _cli("ptq", "--model", "qfold.examples:load_model", "--calib-data", "missing.npy", cwd=tmp_path)
    assert r.returncode == 2 and "missing.npy does not exist" in r.stderr
    r = _cli("ptq", "--model", "qfold.examples:load_model", cwd=tmp_path)
    assert r.returncode == 2 and "no calibration data" in r.stderr
    np.save(tmp_path / "ints.npy", np.zeros((4, 1, 28, 28), np.int64))
    r = _cli("ptq", "--model", "qfold.examples:load_model", "--calib-data", "ints.npy", cwd=tmp_path)
    assert r.returncode == 2 and "dtype" in r.stderr
    r = _cli("ptq", "--example", "--method", "kl", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'kl'" in r.stderr


def test_cli_subcommands_from_npz_data(tmp_path):
    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    np.savez(tmp_path / "calib.npz", x=cx[:64].numpy())
    np.savez(tmp_path / "test.npz", x=tx[:64].numpy(), y=ty[:64].numpy())
    common = ["--model", "qfold.examples:load_model", "--calib-data", "calib.npz", "--no-progress"]
    r = _cli("fold", *common, "--out", "f", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fold = json.loads((tmp_path / "f" / "fold_report.json").read_text())
    assert fold["entries"] and all(e["status"] == "folded" for e in fold["entries"])
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "f" / "model_folded.onnx")).graph.node}
    r = _cli("export", *common, "--method", "max", "--out", "e", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("build", "e/model_qdq.onnx", "--out", "nb", cwd=tmp_path)
    # the residual conv branches' amax travel in the ONNX from the calibration pass: no data needed for them
    assert r.returncode == 0 and "run in float" not in r.stderr, r.stderr
    meta = json.loads((tmp_path / "nb" / "engine.ort.onnx.json").read_text())["extra"]
    assert meta["extra_amax"] and meta["float_for_lack_of_amax"] == [] and meta["extra_amax_measured_in_onnxruntime"] == []
    r = _cli("build", "e/model_qdq.onnx", "--out", "b", "--calib-data", "calib.npz", cwd=tmp_path)
    assert r.returncode == 0 and "run in float" not in r.stderr, r.stderr
    assert json.loads((tmp_path / "b" / "engine.ort.onnx.json").read_text())["extra"]["extra_amax"] == meta["extra_amax"]
    r = _cli("eval", *common, "--eval-data", "test.npz", "--engine", "b/engine.ort.onnx", "--out", "v", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "v" / "engine_accuracy.json").read_text())["stages"]["engine"]["top1"] > 0.9


def _write_build(tmp_path: Path, out: str) -> Path:
    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    np.savez(tmp_path / "calib.npz", x=cx[:128].numpy())
    np.savez(tmp_path / "test.npz", x=tx[:128].numpy(), y=ty[:128].numpy())
    toml = tmp_path / f"{out}.toml"
    toml.write_text(
        f'[model]\nexample = "resnet"\n[data]\ncalib = "calib.npz"\neval = "test.npz"\n[output]\ndir = "{out}"\n'
        '[calib]\nmethod = "percentile"\n[eval]\nmax_drop_pp = 2.0\nplots = false\n'
    )
    return toml


def test_edge_build_is_reproducible_byte_for_byte(tmp_path):
    from qfold.edge import run_build

    m1 = run_build(_write_build(tmp_path, "a"))
    m2 = run_build(_write_build(tmp_path, "b"))
    assert m1["artifacts"] == m2["artifacts"]
    for name in ("model_qdq.onnx", "calibration.json", "calibration.trtcache", "engine.ort.onnx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert name in m1["artifacts"]
    assert m1["versions"]["torch"] and m1["accuracy"]["exceeded_by_pp"] is None


def test_edge_build_script_exits_3_over_budget(tmp_path):
    toml = _write_build(tmp_path, "c")
    toml.write_text(toml.read_text().replace("max_drop_pp = 2.0", "max_drop_pp = -100.0"))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_edge.py"), str(toml)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["accuracy"]["exceeded_by_pp"] > 0


def test_the_repository_example_build_runs(tmp_path):
    """tools/edge/example.toml, as shipped (only the output folder redirected)."""
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_edge.py"), str(REPO / "tools" / "edge" / "example.toml"),
                        "--out", str(tmp_path / "example")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "example" / "manifest.json").read_text())
    assert manifest["accuracy"]["engine_top1_drop_pp"] <= manifest["accuracy"]["budget_pp"]
    assert {"model_qdq.onnx", "calibration.json", "calibration.trtcache", "engine.ort.onnx"} <= set(manifest["artifacts"])
