"""Up-front checks of everything a run is given, before the first forward pass.

Each check raises :class:`InputError` (a ``ValueError``) with one line naming the cause and the
fix, or returns warnings (plain strings) for inputs that work but are probably a mistake. The CLI
turns an ``InputError`` into exit status 2; nothing here writes a file.

- :func:`check_types` -- the typed configuration schema (called by :func:`qfold.config.from_dict`).
- :func:`check_model_and_data` -- model interface, calibration/evaluation data and labels,
  checked against one cheap trial forward pass on one sample.
- :func:`check_onnx_file` -- the input of ``qfold build`` is a readable ONNX with Q/DQ nodes.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qfold.errors import InputError, InputWarning
from qfold.fx import is_eval

#: Fewer calibration samples than this gives a warning (amax from a handful of inputs is noise).
MIN_CALIB_SAMPLES = 16


# --------------------------------------------------------------------------- configuration schema

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" (or left out)" if len(args) < len(typing.get_args(tp)) else "")
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return {bool: "a boolean (true/false, unquoted)", int: "an integer", float: "a finite number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, value converted to the field's Python type) for one TOML value against one type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(arg, value)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:  # tuple[str, ...]: a list of strings, or one string taken as one pattern
        if isinstance(value, str):
            return True, (value,)
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return ok, tuple(value) if ok else value
    return True, value


def check_types(section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` (one TOML table) against the field types of dataclass ``cls``.

    Returns the values converted (ints to floats, one string to a one-pattern tuple). Raises
    :class:`InputError` naming the key, the expected type and the value given. ``"false"`` is not
    a boolean and ``"2048"`` is not an integer: nothing is coerced from strings. A single string
    for a list of patterns (``keep_float = "stem.0"``) is taken as one pattern.
    """
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        ok, conv = _coerce(hints[f.name], value)
        if not ok:
            key = f"{section}.{f.name}" if section else f.name
            raise InputError(f"{key} must be {_type_name(hints[f.name])}, "
                             f"got {type(value).__name__} {value!r}; fix the value (--config file or command-line flag)")
        out[f.name] = conv
    return out


# --------------------------------------------------------------------------- model and data

@dataclass(frozen=True)
class TrialResult:
    """What one trial forward pass told: the output shape for one sample."""

    out_shape: tuple[int, ...]

    @property
    def classes(self) -> int | None:
        return self.out_shape[1] if len(self.out_shape) == 2 else None


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)):
            return name, m
    return None


def _expected(model: nn.Module) -> str:
    first = _first_layer(model)
    if first is None:
        return ""
    name, m = first
    if isinstance(m, nn.Linear):
        return f"; its first layer {name!r} (Linear) takes inputs whose last dimension is {m.in_features}"
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}[type(m)]
    dims = f"N, {m.in_channels}, " + {1: "L", 2: "H, W", 3: "D, H, W"}[nd]
    return f"; its first layer {name!r} ({type(m).__name__}) expects rank-{nd + 2} input ({dims})"


def check_model_interface(model: nn.Module) -> None:
    """The model is an eval-mode ``nn.Module`` whose ``forward`` takes one input tensor."""
    if not isinstance(model, nn.Module):
        raise InputError(f"the model is a {type(model).__name__}, not a torch.nn.Module; pass a module")
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    required = [p.name for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(required) > 1:
        raise InputError(f"model.forward takes {len(required)} inputs ({', '.join(required)}); qfold supports models "
                         "with one input tensor: wrap the model so forward(x) builds the others")


def trial_forward(model: nn.Module, x: torch.Tensor, what: str) -> TrialResult:
    """Run ``model`` on the first sample of ``x``; a failure or an unsupported output is an InputError."""
    sample = x[:1]
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:  # any error of the user's model on this input
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what} of shape {tuple(x.shape)} does not fit the model ({type(exc).__name__}: {detail})"
                         f"{_expected(model)}; give data shaped and preprocessed as the model expects") from exc
    if not isinstance(out, torch.Tensor):
        kind = type(out).__name__
        raise InputError(f"the model returns a {kind}; qfold supports models returning one tensor of logits (N, classes): "
                         "wrap the model so forward returns only the output to quantize")
    if out.ndim < 1 or out.shape[0] != 1:
        raise InputError(f"the model maps one sample to an output of shape {tuple(out.shape)}; qfold expects (N, ...) "
                         "with the batch as the first dimension")
    if not out.is_floating_point():
        raise InputError(f"the model returns {out.dtype} outputs; qfold expects float logits")
    return TrialResult(tuple(out.shape))


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise InputError(f"{what} has dtype {x.dtype}; give float inputs, preprocessed as the model expects")
    bad = ~torch.isfinite(x)
    if bad.any():
        first = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0]) if x.ndim > 0 and x.shape[0] else 0
        raise InputError(f"{what} contains NaN/Inf (first at sample {first}); clean the data first")


def check_model_and_data(
    model: nn.Module,
    calib_x: torch.Tensor | None,
    eval_x: torch.Tensor | None = None,
    eval_y: torch.Tensor | None = None,
    *,
    max_drop_pp: float | None = None,
) -> list[str]:
    """Every check of the model against its data, before any work. Returns warnings.

    One trial forward pass per data set (one sample each) proves the shapes fit the model and
    gives the number of classes, against which the labels are checked.
    """
    warnings: list[str] = []
    check_model_interface(model)
    if not is_eval(model):  # any submodule: a BatchNorm in training mode normalises with batch statistics
        raise InputError("the model is in training mode; call model.eval() before post-training quantization")
    if calib_x is None or calib_x.ndim == 0 or calib_x.shape[0] == 0:
        raise InputError("no calibration data: give a few hundred representative inputs (qfold never calibrates on random data)")
    _check_finite(calib_x, "calibration data")
    trial = trial_forward(model, calib_x, "calibration data")
    n = int(calib_x.shape[0])
    if n < MIN_CALIB_SAMPLES:
        warnings.append(f"only {n} calibration sample{'s' * (n != 1)}: activation ranges from so few inputs are unreliable; "
                        "give a few hundred representative inputs")
    if eval_x is not None:
        if eval_x.ndim == 0 or eval_x.shape[0] == 0:
            raise InputError("the evaluation data is empty; give inputs, or leave it out to evaluate on the calibration data")
        _check_finite(eval_x, "evaluation data")
        if tuple(eval_x.shape[1:]) != tuple(calib_x.shape[1:]):
            raise InputError(f"evaluation samples have shape {tuple(eval_x.shape[1:])} but calibration samples "
                             f"{tuple(calib_x.shape[1:])}; give both data sets with the model's input shape")
    if eval_y is not None:
        check_labels(eval_y, int((calib_x if eval_x is None else eval_x).shape[0]), trial)
    elif max_drop_pp is not None:
        raise InputError(f"an accuracy budget (--max-drop / eval.max_drop_pp = {max_drop_pp}) is set but the evaluation data "
                         "has no labels, so the top-1 drop cannot be measured; give --eval-data with labels ('y') or drop the budget")
    return warnings


def check_labels(y: torch.Tensor, n: int, trial: TrialResult) -> None:
    """Labels are ``n`` integer class indices in ``[0, classes)`` of the model's (N, classes) output."""
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"labels have dtype {y.dtype}; give integer class indices")
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"labels have shape {tuple(y.shape)} for {n} inputs; give one integer class index per input")
    k = trial.classes
    if k is None:
        raise InputError(f"the model's output for one sample has shape {trial.out_shape}, not (1, classes), so labels cannot be "
                         "scored; leave the labels out or return logits (N, classes)")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        bad = sorted({v for v in (lo, hi) if v < 0 or v >= k})
        raise InputError(f"labels out of range: found {', '.join(map(str, bad))} but the model has {k} classes (0..{k - 1}); "
                         "give labels as class indices matching the model's outputs")


# --------------------------------------------------------------------------- ONNX input of `qfold build`

_MAGIC = {b"\x93NUMPY": "a NumPy .npy array", b"PK\x03\x04": "a zip archive (a torch .pt checkpoint?)", b"\x80": "a Python pickle (a torch checkpoint?)"}


def check_onnx_file(path: str | Path) -> Any:
    """Load the ONNX that ``qfold build`` is given, or raise an InputError saying what the file is.

    Returns the loaded ``onnx.ModelProto``. A float ONNX (no QuantizeLinear/DequantizeLinear) is
    an error: nothing in it would run in int8.
    """
    import onnx

    path = Path(path)
    fix = "pass the model_qdq.onnx that `qfold export` or `qfold ptq` wrote"
    if not path.is_file():
        raise InputError(f"Q/DQ ONNX {path} does not exist; run `qfold export` first")
    head = path.read_bytes()[:8]
    if not head:
        raise InputError(f"{path} is empty, not an ONNX model; {fix}")
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            raise InputError(f"{path} is {kind}, not an ONNX model; {fix}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, checker errors, truncated files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {detail[:200]}); {fix}") from exc
    if not model.graph.node:
        raise InputError(f"{path} is not a readable ONNX model (it has no nodes; truncated or not ONNX); {fix}")
    ops = {n.op_type for n in model.graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} & ops:
        raise InputError(f"{path} is a float ONNX with no QuantizeLinear/DequantizeLinear nodes, so nothing would run in int8; "
                         "export the Q/DQ ONNX with `qfold export` (or `qfold ptq`)")
    return model


def check_ptq_inputs(model: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor | None, eval_y: torch.Tensor | None,
                     max_drop_pp: float | None = None) -> None:
    """:func:`check_model_and_data`, its warnings issued as :class:`InputWarning`.

    Raises:
        InputError: bad input (a ValueError), named with its fix.
    """
    for w in check_model_and_data(model, calib_x, eval_x, eval_y, max_drop_pp=max_drop_pp):
        warnings.warn(w, InputWarning, stacklevel=3)
