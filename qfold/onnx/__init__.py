"""Step 4: the Q/DQ ONNX: export, TensorRT's explicit-quantization rules, the ONNX Runtime rendering.

- :mod:`qfold.onnx.graph`: the ONNX graph vocabulary (index, names, node kinds).
- :mod:`qfold.onnx.export`: fake-quant model -> normalized, byte-reproducible Q/DQ ONNX.
- :mod:`qfold.onnx.qdq`: Q/DQ normalization, activation scales and the precision map.
- :mod:`qfold.onnx.trt_rules`: the TensorRT placement rules, checked.
- :mod:`qfold.onnx.ort_render` / :mod:`qfold.onnx.ort_target`: the ONNX Runtime int8 rendering
  of the same calibration, per CPU target.
- :mod:`qfold.onnx.tensor_amax`: the calibration's amax of the tensors only that rendering
  quantizes, matched to ONNX tensors and carried in the file.
- :mod:`qfold.onnx.fp16`: float32 -> float16 conversion for TensorRT's FP16 fallback.
"""
from qfold.onnx.export import ExportConfig, export_onnx
from qfold.onnx.tensor_amax import attach_tensor_amax

__all__ = ["ExportConfig", "attach_tensor_amax", "export_onnx"]
