"""Generate the golden files of the calib tests (run by hand; tests only read them).

    python tools/make_golden.py

* tests/calib/golden/sample.trtcache: a TensorRT calibration cache written byte by byte here,
  independently of calib's writer (header, then ``name: %08x`` of the big-endian float32 bits of
  each scale). Includes scale 1/127 (``3c010204``) and a tensor name containing ':'.
* tests/calib/golden/amax_golden.json: amax of every method on deterministic quantile samples
  of U(-1,1), N(0,1) and Laplace(0,1), as computed by this version of calib. A change in any
  number is a behaviour change to review, then regenerate.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "calib"))

import torch  # noqa: E402
from reference import quantile_samples  # noqa: E402

from calib import CalibMethod, HistogramObserver  # noqa: E402
from calib.atomic import atomic_write_text  # noqa: E402

GOLDEN = ROOT / "tests" / "calib" / "golden"
CACHE_SCALES = {
    "input": 1.0 / 127.0,
    "conv1.out": 255.0 / 127.0,
    "layer1.0/conv1/Conv_output_0": 0.0123,
    "onnx::Conv_7:0": 6.0 / 127.0,
    "tiny": 2.0**-100 / 127.0,
}
METHODS = {
    "max": CalibMethod("max"),
    "percentile_99.9": CalibMethod("percentile", percentile=99.9),
    "percentile_99.99": CalibMethod("percentile", percentile=99.99),
    "entropy": CalibMethod("entropy"),
    "mse": CalibMethod("mse"),
}
N_SAMPLES = 200_000


def trt_cache_text() -> str:
    lines = ["TRT-100300-EntropyCalibration2"]
    for name, scale in CACHE_SCALES.items():
        (bits,) = struct.unpack(">I", struct.pack(">f", scale))
        lines.append("%s: %08x" % (name, bits))
    return "\n".join(lines) + "\n"


def amax_golden() -> dict:
    out: dict = {"n_samples": N_SAMPLES, "num_bins": 2048, "amax": {}}
    for kind in ("uniform", "gaussian", "laplace"):
        obs = HistogramObserver(2048)
        obs.update(torch.from_numpy(quantile_samples(kind, N_SAMPLES)))
        out["amax"][kind] = {k: obs.compute_amax(m) for k, m in METHODS.items()}
    return out


def main() -> None:
    atomic_write_text(GOLDEN / "sample.trtcache", trt_cache_text())
    atomic_write_text(GOLDEN / "amax_golden.json", json.dumps(amax_golden(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN / 'sample.trtcache'} and {GOLDEN / 'amax_golden.json'}")


if __name__ == "__main__":
    main()
