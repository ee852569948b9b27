"""PyTorch Lightning integration: a callback that runs :func:`qfold.qat.step` after every batch.

Importing this module needs Lightning (``lightning`` or the older ``pytorch_lightning``); the rest
of :mod:`qfold.qat` never imports it.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from qfold.qat.passes import step

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "qfold.qat.lightning needs PyTorch Lightning (pip install lightning); without it, call qfold.qat.step(model) after each optimizer step"
        ) from exc

__all__ = ["QATCallback"]


class QATCallback(pl.Callback):
    """PyTorch Lightning callback: :func:`qfold.qat.step` after every training batch."""

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, *args: Any, **kwargs: Any) -> None:
        step(pl_module)
