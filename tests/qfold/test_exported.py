"""Saved ExportedPrograms import as module graphs that compute the same and fold/quantize like the originals."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from qfold.capture.exported import from_exported_program
from qfold.examples import MODELS, load_data, load_model
from qfold.fold.passes import fold_batchnorm


@pytest.mark.parametrize("name", sorted(MODELS))
def test_imported_program_matches_the_model_and_folds_the_same(name):
    model = load_model(name)
    x, _ = load_data("calib")
    ep = torch.export.export(model, (x[:2],))
    gm = from_exported_program(ep)
    with torch.no_grad():
        torch.testing.assert_close(gm(x[:16]), model(x[:16]), rtol=1e-5, atol=1e-5)
    _, ref_report = fold_batchnorm(model)
    folded, report = fold_batchnorm(gm)
    assert len(report.folded) == len(ref_report.folded) and len(report.left) == len(ref_report.left)
    with torch.no_grad():
        torch.testing.assert_close(folded(x[:16]), model(x[:16]), rtol=1e-4, atol=1e-4)


def test_conv_transpose_linear_and_names_survive():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 12 * 12, 5)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 5, 5)
    gm = from_exported_program(torch.export.export(model, (x,)))
    assert isinstance(gm.get_submodule("0"), nn.ConvTranspose2d) and isinstance(gm.get_submodule("4"), nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_cli_ptq_from_a_saved_program(tmp_path):
    model = load_model("resnet")
    x, _ = load_data("calib")
    torch.export.save(torch.export.export(model, (x[:1],)), tmp_path / "resnet.pt2")
    np.savez(tmp_path / "calib.npz", x=x[:64].numpy())
    r = subprocess.run([sys.executable, "-m", "qfold.cli", "export", "--model", "resnet.pt2", "--calib-data", "calib.npz",
                        "--no-progress", "--out", "o"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "model_qdq.onnx").is_file()
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    r = subprocess.run([sys.executable, "-m", "qfold.cli", "fold", "--model", "bad.pt2", "--calib-data", "calib.npz"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "not a readable ExportedProgram" in r.stderr
