"""Shared test fixtures: deterministic seeds and device/backend markers that skip with a reason."""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module of tiny-tensor tests: faster than several, and kinder
    to a shared machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is visible to torch here"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            why = "the tensorrt package is not installed" if not has_trt else "no CUDA device is visible"
            item.add_marker(pytest.mark.skip(reason=f"needs TensorRT on a CUDA machine: {why}"))
