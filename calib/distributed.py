"""Merge observers across ``torch.distributed`` ranks: the exact sum of every rank's histograms.

Three collectives, all on CPU tensors so gloo works: MAX of each observer's exact amax, then each
rank coarsens its counts to the common bin width (``calib.histogram``), then SUM of the counts
and sample numbers. Integer sums and float maxima do not depend on reduction order, so every
rank ends with the same histograms, equal to collecting all the data in one process.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

from calib.errors import CalibrationError
from calib.histogram import E_MIN, exponent_for
from calib.observer import HistogramObserver


def _layout_key(observers: dict[str, HistogramObserver]) -> int:
    text = "\n".join(f"{n}\t{observers[n].num_bins}" for n in sorted(observers))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def all_reduce_observers(observers: dict[str, HistogramObserver], group: object = None) -> None:
    """Replace every observer, in place, by the merge of that observer over all ranks of ``group``.

    All ranks must pass observers with the same names and bin counts (checked; a mismatch raises
    CalibrationError on every rank). Requires an initialised default process group.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise CalibrationError("torch.distributed is not initialised; call dist.init_process_group first")
    names = sorted(observers)
    key = torch.tensor([_layout_key(observers), -_layout_key(observers)], dtype=torch.int64)
    dist.all_reduce(key, op=dist.ReduceOp.MAX, group=group)
    if int(key[0]) != -int(key[1]):
        raise CalibrationError("ranks observe different tensors or bin counts; pass the same names and num_bins on every rank")
    if not names:
        return
    amax = torch.tensor([observers[n].histogram.amax for n in names], dtype=torch.float64)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    rows, nums = [], []
    for n, a in zip(names, amax.tolist()):
        h = observers[n].histogram
        rows.append(torch.from_numpy(h.rebinned(exponent_for(a, h.num_bins))))
        nums.append(h.num_samples)
    counts = torch.cat(rows)
    num = torch.tensor(nums, dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(num, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for i, (n, a) in enumerate(zip(names, amax.tolist())):
        nb = observers[n].num_bins
        c = counts[offset : offset + nb].numpy().astype(np.int64).copy()
        offset += nb
        e = exponent_for(a, nb)
        observers[n].load_state_dict(
            {"counts": c, "exponent": E_MIN - 1 if e is None else e, "amax": a, "num_samples": int(num[i])}
        )
