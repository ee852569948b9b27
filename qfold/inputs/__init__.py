"""What the user brings: model and data sources, and the checks run on them before any work.

- :mod:`qfold.inputs.sources`: ``--model`` / ``--data`` specs -> a model and tensors; batching.
- :mod:`qfold.inputs.validate`: the configuration schema, the trial forward, ONNX file checks.
- :mod:`qfold.inputs.rows`: rows per forward, sized to the cache.
"""
from qfold.inputs.rows import FALLBACK_ROWS, auto_rows, rows, with_rows
from qfold.inputs.sources import batches, load_data, load_model
from qfold.inputs.validate import check_model_and_data

__all__ = ["FALLBACK_ROWS", "auto_rows", "batches", "check_model_and_data", "load_data", "load_model", "rows", "with_rows"]
