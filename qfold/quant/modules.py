"""Fake-quant modules: a per-tensor activation quantizer and a weight-quantizing layer wrapper.

Both compute exactly what a TensorRT int8 engine computes: ``scale = amax / 127``, round half to
even, clamp to [-128, 127], zero point 0 (``torch.fake_quantize_*`` ops, which the ONNX exporter
turns into QuantizeLinear/DequantizeLinear pairs). All state lives in buffers, so it travels with
``state_dict`` and ``torch.distributed`` broadcasts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from calib.spec import fake_quant_inference_torch, scale_from_amax_torch
from qfold.fx import CONV, CONV_TRANSPOSE

QMIN, QMAX = -128, 127


def inference_fast_path(x: torch.Tensor) -> bool:
    """True when a fake-quant forward may take :func:`calib.spec.fake_quant_inference_torch`:
    no gradient is recorded, ``x`` is a plain tensor (not a tracer's fake or functional one) and
    nothing is tracing, exporting or compiling, which must see the fused op to emit Q/DQ."""
    return (
        not torch.is_grad_enabled()
        and type(x) is torch.Tensor
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def weight_axis(layer: nn.Module) -> int:
    """The output-channel axis of a layer's weight: 1 for ConvTranspose, else 0."""
    return 1 if isinstance(layer, CONV_TRANSPOSE) else 0


class ActQuant(nn.Module):
    """Per-tensor int8 fake quantization of an activation at one quant point.

    Disabled (the default after construction) it is the identity, which is the state in which
    calibration observes its input. ``amax`` and ``enabled`` are buffers.
    """

    def __init__(self, amax: float = 0.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.register_buffer("amax", torch.tensor(float(amax), dtype=torch.float32, device=device))
        self.register_buffer("enabled", torch.tensor(False, device=device))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32, device=device), persistent=False)

    def set_amax(self, amax: float) -> None:
        """Set the clipping threshold and enable quantization."""
        self.amax.fill_(float(amax))
        self.enabled.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return x
        amax = self.amax if self.amax.dtype == torch.float32 else self.amax.float()
        scale = scale_from_amax_torch(amax)
        # fake_quantize wants float32; casting only when needed keeps the exported graph Cast-free
        xf = x if x.dtype == torch.float32 else x.float()
        if inference_fast_path(xf):
            y = fake_quant_inference_torch(xf, scale)
        else:
            y = torch.fake_quantize_per_tensor_affine(xf, scale, self.zero_point, QMIN, QMAX)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"amax={float(self.amax):.6g}, enabled={bool(self.enabled)}"


class QuantLayer(nn.Module):
    """A Conv/ConvTranspose/Linear whose weight is fake-quantized per output channel.

    The wrapped layer is kept as ``self.layer`` with its own Parameters (not copies), so an
    optimizer built on the float model keeps training the same tensors. ``weight_amax`` is a
    buffer refreshed from the weight by :meth:`refresh_weight_amax` (max calibration, which is
    exact for weights).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(layer, (CONV, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv*/ConvTranspose*/Linear, got {type(layer).__name__}")
        self.layer = layer
        self.axis = weight_axis(layer)
        dev, n = layer.weight.device, layer.weight.shape[self.axis]
        self.register_buffer("weight_amax", torch.zeros(n, device=dev))
        self.register_buffer("enabled", torch.tensor(True, device=dev))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32, device=dev), persistent=False)
        self.refresh_weight_amax()
        self._wq_cache: tuple | None = None

    @torch.no_grad()
    def refresh_weight_amax(self) -> None:
        """weight_amax[c] = max |W| over everything but the channel axis."""
        w = self.layer.weight.detach()
        dims = [d for d in range(w.ndim) if d != self.axis]
        self.weight_amax.copy_(w.abs().amax(dim=dims).to(self.weight_amax.dtype))

    def quantized_weight(self) -> torch.Tensor:
        """The weight the engine runs: per-channel fake-quantized."""
        w = self.layer.weight
        amax = self.weight_amax if self.weight_amax.dtype == torch.float32 else self.weight_amax.float()
        scale = scale_from_amax_torch(amax)
        zp = self.zero_point
        if zp.device != w.device:
            zp = zp.to(w.device)
        wf = w if w.dtype == torch.float32 else w.float()
        wq = torch.fake_quantize_per_channel_affine(wf, scale, zp, self.axis, QMIN, QMAX)
        return wq if w.dtype == torch.float32 else wq.to(w.dtype)

    def _inference_weight(self) -> torch.Tensor:
        """:meth:`quantized_weight` for a forward that records no gradient, computed once per
        version of the weight and of ``weight_amax`` (an optimizer step or ``copy_`` bumps it)."""
        w, amax = self.layer.weight, self.weight_amax
        if w.is_inference() or amax.is_inference():  # no version counter to key a cache on
            return self.quantized_weight()
        c = getattr(self, "_wq_cache", None)  # (weight, its version, amax, its version, result); None before the first call
        if c is not None and c[0] is w and c[1] == w._version and c[2] is amax and c[3] == amax._version:
            return c[4]
        wf = w.detach() if w.dtype == torch.float32 else w.detach().float()
        a = amax if amax.dtype == torch.float32 else amax.float()
        wq = fake_quant_inference_torch(wf, scale_from_amax_torch(a), self.axis)
        wq = wq if w.dtype == torch.float32 else wq.to(w.dtype)
        self._wq_cache = (w, w._version, amax, amax._version, wq)
        return wq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not bool(self.enabled):
            w = layer.weight
        elif inference_fast_path(x):
            w = self._inference_weight()
        else:
            w = self.quantized_weight()
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        if isinstance(layer, CONV_TRANSPOSE):
            fn = _CONV_TRANSPOSE[len(layer.kernel_size)]
            return fn(x, w, layer.bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
        # Conv's own (private) _conv_forward: the module's padding_mode, stride, dilation and groups
        # with another weight. The public route, torch.func.functional_call, swaps module state on
        # every call of this hot path; QAT's QuantConvBn uses the same method for the same reason.
        return layer._conv_forward(x, w, layer.bias)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, enabled={bool(self.enabled)}"
