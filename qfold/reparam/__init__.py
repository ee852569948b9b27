"""Step 1a: RepVGG-style structural re-parameterization (parallel conv/BN/identity branches -> one conv).

- :mod:`qfold.reparam.formulas`: kernel padding and branch merging arithmetic (pure torch).
- :mod:`qfold.reparam.passes`: the graph pass, :func:`reparameterize`, and its report.
"""
from qfold.reparam.passes import (
    LeftCandidate,
    MergedBlock,
    ReparamReport,
    reparameterize,
)

__all__ = ["LeftCandidate", "MergedBlock", "ReparamReport", "reparameterize"]
