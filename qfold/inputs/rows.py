"""How many rows per forward: the largest batch whose biggest layer output stays cache-sized.

A convolution's output is written once and read by the next layer; when a batch's outputs fit in
the last-level cache the next layer reads them from there instead of from memory. On the issue-17
benchmark (2 cores, 32 MiB L3, 224x224 inputs) the stage report ran fastest at 4-8 rows per
forward: resnet50 at 4 rows took 0.53x the time of 16 rows and mobilenet_v2 0.52x, while resnet18
was flat from 4 to 16. Inputs of 28x28 have outputs a hundred times smaller and want hundreds of
rows, where per-call overhead dominates. One fixed number fits neither, so the default is
measured: one forward of one row records the largest module output, and a batch gets as many
rows as fit that output in :data:`ACTIVATION_BUDGET` bytes. A constant, not the cache size read
from the machine, so the same options batch the same way everywhere.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qfold.config import PTQConfig
from qfold.fx import eval_mode

ACTIVATION_BUDGET = 16 << 20  # bytes of the largest layer output of one batch: half of a 32 MiB L3
MAX_ROWS = 256


def largest_output_bytes(model: nn.Module, row: torch.Tensor) -> int:
    """Bytes of the largest tensor a module of ``model`` outputs (or of ``row`` itself) for ``row``
    (one sample with its batch dimension); one forward in eval and inference mode, so no
    BatchNorm statistics move (every training flag is restored)."""
    sizes = [row.numel() * row.element_size()]

    def hook(_m: nn.Module, _i: tuple, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with eval_mode(model):
            model(row)
    finally:
        for h in handles:
            h.remove()
    return max(sizes)


def auto_rows(model: nn.Module, row: torch.Tensor, budget: int = ACTIVATION_BUDGET, max_rows: int = MAX_ROWS) -> int:
    """Rows per forward: ``budget // largest_output_bytes``, between 1 and ``max_rows``."""
    return max(1, min(max_rows, budget // max(1, largest_output_bytes(model, row[:1]))))


FALLBACK_ROWS = 16  # where no model is at hand to measure (feeding an engine)


def rows(batch_size: int | None, model: nn.Module, x: torch.Tensor) -> int:
    """``batch_size`` when given, else :func:`auto_rows` of ``model`` on ``x[:1]``."""
    return batch_size if batch_size is not None else auto_rows(model, x[:1])


def with_rows(config: PTQConfig, model: nn.Module, calib_x: torch.Tensor, eval_x: torch.Tensor | None = None) -> PTQConfig:
    """``config`` with ``calib.batch_size`` and ``eval.batch_size`` set (measured where unset;
    one row of each data set, or of ``calib_x`` for both when ``eval_x`` is None)."""
    calib_rows = rows(config.calib.batch_size, model, calib_x)
    eval_rows = rows(config.eval.batch_size, model, calib_x if eval_x is None else eval_x)
    if (calib_rows, eval_rows) == (config.calib.batch_size, config.eval.batch_size):
        return config
    return config.replace(calib={"batch_size": calib_rows}, eval={"batch_size": eval_rows})

