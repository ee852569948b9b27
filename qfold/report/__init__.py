"""Step 6: the accuracy report, stage by stage (folded, bounded, fake-quant, engine) and per layer.

- :mod:`qfold.report.metrics`: SQNR, agreement, top-k (pure numpy).
- :mod:`qfold.report.stages`: running each stage, the report, its files and plots.
"""
from qfold.report.stages import AccuracyReport, LayerMetrics, StageMetrics

__all__ = ["AccuracyReport", "LayerMetrics", "StageMetrics"]
