"""Scoped observation of a model's tensors and the calibration loop.

Hooks are forward (pre-)hooks registered inside a ``with`` block and removed in ``finally``;
no class is patched and the model's parameters and buffers are never touched.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from calib.errors import CalibrationError
from calib.method import CalibMethod
from calib.observer import HistogramObserver

_POINT = re.compile(r"^(?P<module>[^:]*)(?::(?P<kind>input(?P<k>\d+)|output))?$")


@dataclass(frozen=True)
class ObservePoint:
    """Where a tensor is read: positional input ``index`` of ``module``, or its output (index None)."""

    module: str
    index: int | None = 0

    @staticmethod
    def parse(name: str) -> "ObservePoint":
        """``"conv1"`` (first input), ``"add:input1"`` (second input), ``"relu:output"`` (output)."""
        m = _POINT.match(name)
        if m is None:
            raise CalibrationError(f"bad tensor name {name!r}: use 'module', 'module:input<k>' or 'module:output'")
        if m.group("kind") == "output":
            return ObservePoint(m.group("module"), None)
        return ObservePoint(m.group("module"), int(m.group("k") or 0))


def _check_names(model: nn.Module, names: Sequence[str]) -> dict[str, ObservePoint]:
    if isinstance(names, str):
        raise CalibrationError("names must be a list of module names, not a single string")
    if len(set(names)) != len(names):
        raise CalibrationError(f"duplicate tensor names: {sorted(n for n in set(names) if list(names).count(n) > 1)}")
    points = {n: ObservePoint.parse(n) for n in names}
    modules = dict(model.named_modules())
    unknown = [n for n, p in points.items() if p.module not in modules]
    if unknown:
        known = [k for k in modules if k][:20]
        raise CalibrationError(
            f"no submodule named {unknown} in {type(model).__name__}; names are qualified module names "
            f"as in model.named_modules(), e.g. {known}"
        )
    return points


def _hook(name: str, point: ObservePoint, obs: HistogramObserver) -> Callable:
    def observe_tensor(x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"tensor {name!r}: the observed value is a {type(x).__name__}, not a tensor")
        try:
            obs.update(x)
        except CalibrationError as exc:
            raise CalibrationError(f"tensor {name!r}: {exc}") from None

    if point.index is None:
        return lambda _m, _args, out: observe_tensor(out)

    def pre(_m: nn.Module, args: tuple) -> None:
        if len(args) <= point.index:
            raise CalibrationError(
                f"tensor {name!r}: the module was called with {len(args)} positional inputs, "
                f"so input {point.index} does not exist"
            )
        observe_tensor(args[point.index])

    return pre


@contextlib.contextmanager
def observe(
    model: nn.Module,
    names: Sequence[str],
    *,
    observer_factory: Callable[[], HistogramObserver] = HistogramObserver,
) -> Iterator[dict[str, HistogramObserver]]:
    """Observe tensors of ``model`` while the block runs; yields ``{name: observer}``.

    A name ``"m"`` observes the first positional input of submodule ``m`` (the activation input
    of a conv/linear), ``"m:input1"`` its second input (e.g. the skip input of an add module),
    ``"m:output"`` its output. The hooks are removed when the block exits, even on error.
    """
    points = _check_names(model, names)
    observers = {n: observer_factory() for n in names}
    handles = []
    try:
        for n, p in points.items():
            mod = model.get_submodule(p.module)
            hook = _hook(n, p, observers[n])
            handles.append(mod.register_forward_hook(hook) if p.index is None else mod.register_forward_pre_hook(hook))
        yield observers
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class CalibResult:
    """What :func:`calibrate` found: the observers (reusable with other methods) and the amax."""

    observers: dict[str, HistogramObserver]
    amax: dict[str, float]
    method: CalibMethod
    num_batches: int
    extra: dict = field(default_factory=dict)

    def recompute(self, method: CalibMethod | str) -> dict[str, float]:
        """Amax of every tensor by another method, from the same histograms (no new forward passes)."""
        return {n: o.compute_amax(method) for n, o in self.observers.items()}


def _run(model: nn.Module, batch: object, device: torch.device | str | None) -> None:
    def to(t: object) -> object:
        return t.to(device) if device is not None and isinstance(t, torch.Tensor) else t

    if isinstance(batch, torch.Tensor):
        model(to(batch))
    elif isinstance(batch, (tuple, list)):
        model(*[to(t) for t in batch])
    elif isinstance(batch, dict):
        model(**{k: to(v) for k, v in batch.items()})
    else:
        raise CalibrationError(
            f"a calibration batch must be a Tensor, a tuple/list of positional inputs or a dict of keyword "
            f"inputs, got {type(batch).__name__}"
        )


def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor | tuple | dict],
    names: Sequence[str],
    *,
    method: CalibMethod | str = CalibMethod("entropy"),
    progress: bool = True,
    device: torch.device | str | None = None,
    num_bins: int = 2048,
) -> CalibResult:
    """Run ``model`` over ``batches`` (no grad, eval mode) and compute the amax of ``names``.

    The model is put in eval mode for the run and each module's training flag is restored after,
    so BatchNorm statistics are never updated. ``device`` moves each batch (not the model).

    Raises:
        CalibrationError: no batches (calib never substitutes random data); NaN/Inf in a batch,
            naming the batch index and the tensor; tensors that no batch reached, listed.
    """
    m = CalibMethod.parse(method)
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    modes = {mod: mod.training for mod in model.modules()}
    n = 0
    try:
        model.eval()
        with observe(model, names, observer_factory=lambda: HistogramObserver(num_bins)) as observers, torch.no_grad():
            for i, batch in enumerate(tqdm(batches, total=total, disable=not progress, desc="calibrate", unit="batch")):
                try:
                    _run(model, batch, device)
                except CalibrationError as exc:
                    raise CalibrationError(f"calibration batch {i}: {exc}") from None
                n += 1
    finally:
        for mod, training in modes.items():
            mod.training = training
    if n == 0:
        raise CalibrationError(
            "no calibration data: the batches iterable was empty. calib never falls back to random data; "
            "pass a few hundred representative samples (a DataLoader or a list of input tensors)"
        )
    missing = [k for k, o in observers.items() if o.num_samples == 0]
    if missing:
        raise CalibrationError(
            f"tensors never observed in {n} batches: {missing}; their modules did not run in forward "
            "(unused branch?) - drop them from names or feed inputs that reach them"
        )
    return CalibResult(observers, {k: o.compute_amax(m) for k, o in observers.items()}, m, n)
