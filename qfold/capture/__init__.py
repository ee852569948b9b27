"""Model -> graph: torch.fx tracing, the torch.export fallback, and keeping the model's interface.

- :mod:`qfold.capture.trace`: :func:`trace` (a deep copy, never the user's model) and :func:`capture_info`.
- :mod:`qfold.capture.exported`: a ``torch.export`` program turned into a GraphModule the passes read.
- :mod:`qfold.capture.keep_attrs`: the traced copy keeps the original's attributes and methods.
"""
from qfold.capture.trace import FX_CAPTURE, capture_info, trace

__all__ = ["FX_CAPTURE", "capture_info", "trace"]
