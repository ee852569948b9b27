"""calib: streaming, mergeable, deterministic int8 calibration (never imports qfold).

Collect |x| histograms once (:class:`HistogramObserver`, :func:`observe`, :func:`calibrate`),
choose the amax method afterwards (:class:`CalibMethod`: max, percentile, entropy, mse), merge
across processes (:func:`all_reduce_observers`), and save tables (:class:`CalibTable` JSON,
TensorRT calibration caches).
"""
__version__ = "0.1.0"

from calib.amax import compute_amax as compute_histogram_amax
from calib.distributed import all_reduce_observers
from calib.errors import CalibrationError
from calib.histogram import Histogram
from calib.method import CalibMethod
from calib.observe import CalibResult, ObservePoint, calibrate, observe
from calib.observer import HistogramObserver, weight_amax
from calib.spec import (
    INT8_PER_TENSOR,
    QuantSpec,
    fake_quant_ref,
    quantize_ref,
    scale_from_amax,
)
from calib.table import CalibTable, hash_batches, hash_model, versions
from calib.trtcache import (
    TrtCacheHeader,
    read_trt_cache,
    write_trt_cache,
    write_trt_cache_note,
)


def compute_amax(source: "HistogramObserver | Histogram", method: "CalibMethod | str" = "entropy") -> float:
    """Amax of an observer or a histogram by ``method`` (never modifies it)."""
    if isinstance(source, HistogramObserver):
        return source.compute_amax(method)
    if isinstance(source, Histogram):
        if source.num_samples == 0:
            raise CalibrationError("this histogram is empty: the tensor was never observed")
        return compute_histogram_amax(source, method)
    raise CalibrationError(f"compute_amax needs a HistogramObserver or a Histogram, got {type(source).__name__}")


__all__ = [
    "INT8_PER_TENSOR", "CalibMethod", "CalibResult", "CalibTable", "CalibrationError", "Histogram",
    "HistogramObserver", "ObservePoint", "QuantSpec", "TrtCacheHeader", "all_reduce_observers", "calibrate",
    "compute_amax", "fake_quant_ref", "hash_batches", "hash_model", "observe", "quantize_ref", "read_trt_cache",
    "scale_from_amax", "versions", "weight_amax", "write_trt_cache", "write_trt_cache_note",
]
