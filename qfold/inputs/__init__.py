"""What the user brings: model and data sources, and the checks run on them before any work.

- :mod:`qfold.inputs.sources`: ``--model`` / ``--data`` specs -> a model and tensors; batching.
- :mod:`qfold.inputs.validate`: the configuration schema, the trial forward, ONNX file checks.
"""
from qfold.inputs.sources import batches, load_data, load_model
from qfold.inputs.validate import check_model_and_data

__all__ = ["batches", "check_model_and_data", "load_data", "load_model"]
