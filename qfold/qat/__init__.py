"""Quantization-aware training inside your own PyTorch loop: ``prepare``, ``step``, ``convert``, ``export``.

- :mod:`qfold.qat.formulas`: the fold-with-batch-statistics arithmetic (pure torch).
- :mod:`qfold.qat.modules`: the QAT modules (Conv+BN with simulated fold, fake-quant layers).
- :mod:`qfold.qat.passes`: the graph rewrite and the schedule.
- :mod:`qfold.qat.deploy`: ``export``, the trained model as Q/DQ ONNX.
- :mod:`qfold.qat.lightning`: ``QATCallback`` for PyTorch Lightning (needs Lightning).
"""
from qfold.qat.deploy import export
from qfold.qat.passes import QATConfig, amax_parameters, convert, prepare, step

__all__ = ["QATConfig", "amax_parameters", "convert", "export", "prepare", "step"]
