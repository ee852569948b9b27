"""qfold: from an FP32 PyTorch model to a fast, measured int8 engine."""

__version__ = "0.1.0"
