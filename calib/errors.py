"""The one exception type of ``calib``: every message names the cause and the fix."""
from __future__ import annotations


class CalibrationError(ValueError):
    """Calibration cannot go on: no data, NaN/Inf data, a tensor never observed, a bad file."""
