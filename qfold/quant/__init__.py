"""Quantization placement, fake-quant modules and the prepared (fake-quant) model.

Placement is decided once, on the traced graph, and shared by PTQ fake-quant, QAT and the Q/DQ
ONNX export, so that what is measured in PyTorch is what the engine runs.
"""
from qfold.quant.modules import ActQuant, QuantLayer
from qfold.quant.plan import LayerPlan, QuantPlan, QuantPoint, plan_quantization
from qfold.quant.prepare import prepare_fake_quant

__all__ = [
    "ActQuant",
    "LayerPlan",
    "QuantLayer",
    "QuantPlan",
    "QuantPoint",
    "plan_quantization",
    "prepare_fake_quant",
]
