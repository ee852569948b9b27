"""all_reduce_observers over two gloo processes on CPU equals one process seeing all the data."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from calib import CalibrationError, HistogramObserver, all_reduce_observers

NAMES = ["a", "b", "dead"]


def data(rank: int) -> dict[str, list[torch.Tensor]]:
    """Each rank sees different data; rank 1's 'a' has the larger range (its histogram is coarser)."""
    g = torch.Generator().manual_seed(100 + rank)
    return {
        "a": [torch.randn(500, generator=g) * (1 + 40 * rank) for _ in range(3)],
        "b": [torch.rand(64, generator=g) * (3 - rank) for _ in range(2)],
        "dead": [torch.zeros(10)],
    }


def observers_for(parts: list[dict[str, list[torch.Tensor]]]) -> dict[str, HistogramObserver]:
    obs = {n: HistogramObserver() for n in NAMES}
    for part in parts:
        for n in NAMES:
            for x in part[n]:
                obs[n].update(x)
    return obs


def _worker(rank: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        obs = observers_for([data(rank)])
        all_reduce_observers(obs)
        torch.save({n: o.state_dict() for n, o in obs.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        bad = {n: HistogramObserver() for n in (NAMES if rank == 0 else NAMES[:2])}
        try:
            all_reduce_observers(bad)
            msg = "no error"
        except CalibrationError as exc:
            msg = str(exc)
        with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
            f.write(msg)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_merge_to_the_single_process_result(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_worker, args=(f"tcp://127.0.0.1:{_free_port()}", str(tmp_path)), nprocs=2, join=True)
    single = observers_for([data(0), data(1)])
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for n in NAMES:
            got = HistogramObserver()
            got.load_state_dict(state[n])
            want = single[n].histogram
            assert np.array_equal(got.histogram.counts, want.counts), (rank, n)
            assert got.histogram.exponent == want.exponent and got.num_samples == want.num_samples
            for m in ["max", "percentile", "entropy", "mse"]:
                assert got.compute_amax(m) == single[n].compute_amax(m)
        assert "different tensors" in (tmp_path / f"err{rank}.txt").read_text()


def test_without_a_process_group_the_error_says_what_to_do():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    with pytest.raises(CalibrationError, match="init_process_group"):
        all_reduce_observers({"a": HistogramObserver()})
