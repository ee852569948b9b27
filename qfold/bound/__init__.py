"""Step 2: bound activations, ReLU -> ReLU6, by default without changing the function.

- :mod:`qfold.bound.formulas`: per-channel statistics and the rescale arithmetic (pure torch).
- :mod:`qfold.bound.sites`: which ReLUs can be bounded and which layers rescale with them.
- :mod:`qfold.bound.passes`: the pass, :func:`bound_relu` (and :func:`bound_relu_deferred`).
- :mod:`qfold.bound.report`: what was bounded, where it clips, what it cost.
"""
from qfold.bound.passes import (
    BoundConfig,
    BoundReport,
    PendingReport,
    SiteReport,
    bound_relu,
    bound_relu_deferred,
)
from qfold.errors import BoundError

__all__ = ["BoundConfig", "BoundError", "BoundReport", "PendingReport", "SiteReport", "bound_relu", "bound_relu_deferred"]
