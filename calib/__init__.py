"""calib: streaming, mergeable, deterministic int8 calibration (never imports qfold)."""
from calib.spec import INT8_PER_TENSOR, QuantSpec, fake_quant_ref, quantize_ref, scale_from_amax

__all__ = ["INT8_PER_TENSOR", "QuantSpec", "fake_quant_ref", "quantize_ref", "scale_from_amax"]
