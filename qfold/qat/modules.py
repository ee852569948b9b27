"""QAT modules: Conv+BN with the fold simulated, weight-tracking layers, trainable activation quantizers.

They subclass the PTQ fake-quant modules (:class:`qfold.quant.QuantLayer`, :class:`qfold.quant.ActQuant`)
so that every helper that knows those (``quantization_disabled``, ``quant_layers``) knows these, and
they keep the user's layers (the same ``nn.Conv*``, ``nn.BatchNorm*`` objects, hence the same
Parameters). All quantizer state is in buffers (or, for a learned ``amax``, a Parameter under the
same ``state_dict`` key), so ``state_dict`` resumes a run and DDP broadcasts it. Formulas:
:mod:`qfold.qat.formulas`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from calib.spec import scale_from_amax_torch
from qfold.fx import BATCH_NORM, CONV, CONV_TRANSPOSE
from qfold.qat import formulas as qat_math
from qfold.quant.modules import QMAX, QMIN, ActQuant, QuantLayer

_BN = BATCH_NORM


def can_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """True when ``bn(conv(x))`` can be trained as one folded layer: a (non-transposed) Conv1/2/3d
    followed by a BatchNorm over its output channels that tracks running statistics."""
    return (
        isinstance(conv, CONV)
        and not isinstance(conv, CONV_TRANSPOSE)
        and isinstance(bn, _BN)
        and bn.track_running_stats
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


class ConvBn(nn.Module):
    """A Conv followed by its BatchNorm, as one graph node (the float model's function, unchanged).

    Only a placeholder between graph rewrite and quantizer insertion, and the form a Conv+BN kept
    in float takes; :class:`QuantConvBn` is the trained one.
    """

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        if not can_pair(conv, bn):
            raise TypeError(f"cannot pair {type(conv).__name__} with {type(bn).__name__} for QAT folding")
        self.conv = conv
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _fake_quant_weight(w: torch.Tensor, amax: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    scale = scale_from_amax_torch(amax.float())
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero_point.to(w.device), 0, QMIN, QMAX).to(w.dtype)


class QATQuantLayer(QuantLayer):
    """A :class:`QuantLayer` whose per-channel ``weight_amax`` follows the weight until frozen.

    ``weight_amax`` (max calibration, exact for weights) is recomputed from the current weight at
    every forward while the buffer ``frozen`` is False.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.register_buffer("frozen", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.frozen):
            self.refresh_weight_amax()
        return super().forward(x)


class QuantConvBn(QuantLayer):
    """Conv + BatchNorm trained as the folded, weight-quantized conv the engine will run.

    ``self.layer`` is the user's conv, ``self.bn`` the user's BatchNorm (same objects). The weight
    that is fake-quantized per channel is ``W * gamma / sqrt(running_var + eps)``. In training mode
    with ``bn_frozen`` False the output is corrected to batch statistics and the running statistics
    are updated as ``nn.BatchNorm`` would (momentum, or the cumulative average when momentum is
    None); otherwise it is exactly ``conv(x, fq(W')) + b'`` (see :mod:`qfold.qat.formulas`). This module's
    own mode decides, not ``bn.training``; ``bn`` is never called as a module.

    Buffers: ``weight_amax`` (per output channel), ``enabled``, ``frozen`` (weight amax),
    ``bn_frozen``.
    """

    def __init__(self, pair: ConvBn) -> None:
        super().__init__(pair.conv)  # QuantLayer computes a provisional weight_amax from the raw weight
        self.bn = pair.bn
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("bn_frozen", torch.tensor(False))
        self.refresh_weight_amax()

    def fold_scale(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` (differentiable in gamma)."""
        return qat_math.fold_scale(self.bn.weight, self.bn.running_var, self.bn.eps)

    def folded_weight(self, sf: torch.Tensor | None = None) -> torch.Tensor:
        """``W'``, float (not quantized)."""
        return qat_math.fold_weight(self.layer.weight, self.fold_scale() if sf is None else sf)

    def folded_bias(self, sf: torch.Tensor | None = None) -> torch.Tensor:
        """``b'`` with the running statistics."""
        sf = self.fold_scale() if sf is None else sf
        return qat_math.fold_bias(self.layer.bias, self.bn.running_mean, sf, self.bn.bias)

    @torch.no_grad()
    def refresh_weight_amax(self) -> None:
        """weight_amax[c] = max |W'[c]| of the folded weight (the raw weight before ``bn`` is set)."""
        if "bn" not in self._modules:
            super().refresh_weight_amax()
            return
        w = self.folded_weight().detach()
        self.weight_amax.copy_(w.abs().reshape(w.shape[0], -1).amax(dim=1).to(self.weight_amax.dtype))

    def _bn_train(self, z: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        factor = 0.0 if bn.momentum is None else bn.momentum
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, factor, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sf = self.fold_scale()
        w = self.folded_weight(sf)
        if not bool(self.frozen):
            with torch.no_grad():
                self.weight_amax.copy_(w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).to(self.weight_amax.dtype))
        if bool(self.enabled):
            w = _fake_quant_weight(w, self.weight_amax, self.zero_point)
        if self.training and not bool(self.bn_frozen):
            u = self.layer._conv_forward(x, w, None)  # private: see qfold.quant.modules.QuantLayer.forward
            z = qat_math.divide_channels(u, qat_math.safe_divisor(sf))
            if self.layer.bias is not None:
                z = qat_math.add_channel_bias(z, self.layer.bias)
            return self._bn_train(z)
        # the bias inside the conv, as in the converted layer: bit-identical to what convert() gives
        return self.layer._conv_forward(x, w, self.folded_bias(sf).to(w.dtype))

    def extra_repr(self) -> str:
        return f"enabled={bool(self.enabled)}, frozen={bool(self.frozen)}, bn_frozen={bool(self.bn_frozen)}"


class QATActQuant(ActQuant):
    """Per-tensor activation fake quantizer for training: straight-through, amax tracked or learned.

    Enabled from construction. Until ``initialized`` (calibration or the first training batch) a
    training forward sets ``amax`` to the batch's max |x|; then, while not ``frozen``:

    * ``learn=False``: ``amax <- (1 - momentum) * amax + momentum * max|x|`` per training batch
      (momentum 0 keeps the calibrated amax), gradient to ``x`` only;
    * ``learn=True``: ``amax`` is an ``nn.Parameter`` trained by LSQ (:func:`qfold.qat.formulas.lsq_fake_quant`).

    Eval mode (and frozen) uses the stored amax as PTQ's :class:`ActQuant` does.
    """

    def __init__(self, *, learn: bool = False, momentum: float = 0.01) -> None:
        super().__init__()
        if learn:
            amax = self._buffers.pop("amax")
            self.amax = nn.Parameter(amax.clone())
        self.learn = learn
        self.momentum = float(momentum)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("frozen", torch.tensor(False))
        self.enabled.fill_(True)

    @torch.no_grad()
    def set_amax(self, amax: float) -> None:
        """Set the clipping threshold (calibration or a resumed value); enables and initializes."""
        self.amax.fill_(float(amax))
        self.enabled.fill_(True)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        peak = x.detach().abs().amax().float()
        if not bool(self.initialized):
            self.amax.copy_(peak)
            self.initialized.fill_(True)
        elif not self.learn and self.momentum > 0:
            self.amax.copy_(qat_math.ema(self.amax, peak, self.momentum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return x
        live = self.training and not bool(self.frozen)
        if live:
            self._observe(x)
        elif not bool(self.initialized):
            raise RuntimeError(
                "this activation quantizer has no amax yet: pass calib_data to qfold.qat.prepare, or run "
                "a training step (model.train(), forward) before evaluating the QAT model"
            )
        if live and self.learn:
            return qat_math.lsq_fake_quant(x.float(), self.amax, QMIN, QMAX).to(x.dtype)
        scale = scale_from_amax_torch(self.amax.detach().float())
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, self.zero_point, QMIN, QMAX).to(x.dtype)

    def extra_repr(self) -> str:
        mode = "learned" if self.learn else f"tracked(momentum={self.momentum})"
        return f"amax={float(self.amax):.6g}, {mode}, frozen={bool(self.frozen)}, enabled={bool(self.enabled)}"
