"""Step 1b: fold every BatchNorm into the convolution or linear layer next to it.

- :mod:`qfold.fold.formulas`: the fold arithmetic (pure torch, float64).
- :mod:`qfold.fold.sites`: what counts as a BatchNorm, and where one is called.
- :mod:`qfold.fold.passes`: the graph pass, :func:`fold_batchnorm`.
- :mod:`qfold.fold.report`: what was folded, what was left and why.
"""
from qfold.errors import FoldError
from qfold.fold.passes import fold_batchnorm
from qfold.fold.report import FoldEntry, FoldReport

__all__ = ["FoldEntry", "FoldError", "FoldReport", "fold_batchnorm"]
