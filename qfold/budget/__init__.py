"""Meeting an accuracy budget: which layers hurt, and the fewest to keep in float.

- :mod:`qfold.budget.sensitivity`: per-layer sensitivity (only-this-layer int8 / float).
- :mod:`qfold.budget.fallback`: the search for the float layers that meet ``eval.max_drop_pp``.
"""
from qfold.budget.sensitivity import SensitivityReport, layer_sensitivity

__all__ = ["SensitivityReport", "layer_sensitivity"]
