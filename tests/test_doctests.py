"""The docstring examples of the pure modules run as tests."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["calib.spec", "calib.trtcache", "qfold.engine.trt_install", "qfold.fold.formulas", "qfold.report.metrics", "qfold.bound.formulas",
           "qfold.onnx.fp16", "qfold.engine", "qfold.examples", "qfold.outdir"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} lost its docstring examples"
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
