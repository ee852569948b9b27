"""Histogram binning: exact, bounded, order- and batch-size-independent, mergeable."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calib import CalibrationError, Histogram, HistogramObserver
from calib.histogram import E_MIN, coarsen, exponent_for

METHODS = ["max", "percentile", "entropy", "mse"]


def observed(chunks, num_bins=2048):
    o = HistogramObserver(num_bins)
    for c in chunks:
        o.update(c)
    return o


def same_hist(a: Histogram, b: Histogram) -> bool:
    return (np.array_equal(a.counts, b.counts) and a.exponent == b.exponent and a.amax == b.amax
            and a.num_samples == b.num_samples)


@pytest.mark.parametrize("amax", [1e-30, 0.3, 1.0, 1.5, 2047.0, 2048.0, 2049.0, 3.4e38])
def test_exponent_is_the_smallest_power_of_two_that_covers_amax(amax):
    e = exponent_for(amax, 2048)
    assert amax < 2048 * 2.0**e
    assert e == E_MIN or amax >= 2048 * 2.0 ** (e - 1)


def test_bin_counts_match_a_direct_count():
    x = torch.randn(5000, dtype=torch.float64) * 3
    h = observed([x]).histogram
    w = h.width
    expect = np.bincount(np.floor(np.abs(x.numpy()) / w).astype(np.int64), minlength=2048)
    assert np.array_equal(h.counts, expect)
    assert h.amax == float(x.abs().max()) and h.num_samples == 5000
    assert 1024 <= h.amax / w < 2048  # data fills between half and all of the bins


def test_coarsen_sums_adjacent_bins():
    c = np.arange(8, dtype=np.int64)
    assert coarsen(c, 1).tolist() == [1, 5, 9, 13, 0, 0, 0, 0]
    assert coarsen(c, 2).tolist() == [6, 22, 0, 0, 0, 0, 0, 0]
    assert coarsen(c, 5).tolist() == [28, 0, 0, 0, 0, 0, 0, 0]


def test_growing_range_keeps_the_bin_count_bounded():
    o = HistogramObserver(512)
    for k in range(30):
        o.update(torch.rand(100) * 10.0**k)
    assert o.histogram.counts.shape == (512,) and o.num_samples == 3000


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-20, 20), n=st.integers(1, 400))
def test_batch_size_and_order_do_not_change_the_histogram(seed, log_scale, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g) * math.exp(log_scale)
    whole = observed([x]).histogram
    ones = observed(list(x.split(1))).histogram
    shuffled = observed(list(x[torch.randperm(n, generator=g)].split(32))).histogram
    assert same_hist(whole, ones) and same_hist(whole, shuffled)


def test_batch_size_1_and_32_give_identical_amax_for_every_method():
    x = torch.randn(64, 8, 5, 5) * torch.linspace(0.1, 3, 64)[:, None, None, None]
    a = observed(list(x.split(1)))
    b = observed(list(x.split(32)))
    for m in METHODS:
        assert a.compute_amax(m) == b.compute_amax(m)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), parts=st.integers(2, 6))
def test_merge_of_parts_equals_the_whole(seed, parts):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(int(torch.randint(1, 200, (1,), generator=g))) * float(torch.rand(1, generator=g) * 100)
              for _ in range(parts)]
    whole = observed(chunks)
    merged = HistogramObserver()
    for c in chunks:
        merged.merge(observed([c]))
    assert same_hist(whole.histogram, merged.histogram)
    for m in METHODS:
        assert merged.compute_amax(m) == whole.compute_amax(m)


def test_zeros_only_then_data():
    o = observed([torch.zeros(10)])
    assert o.histogram.exponent is None
    for m in METHODS:
        assert o.compute_amax(m) == 0.0
    o.update(torch.tensor([0.5, -1.0]))
    assert o.histogram.counts[0] >= 10 and o.num_samples == 12 and o.compute_amax("max") == 1.0


def test_half_precision_and_integer_inputs_are_counted_exactly():
    x = torch.randn(1000)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt)
        assert same_hist(observed([xh]).histogram, observed([xh.float()]).histogram)
    assert observed([torch.arange(-5, 6)]).compute_amax("max") == 5.0


@pytest.mark.parametrize("bad,what", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_nan_and_inf_are_rejected_and_leave_the_observer_unchanged(bad, what):
    o = observed([torch.ones(4)])
    before = o.state_dict()
    with pytest.raises(CalibrationError, match=what):
        o.update(torch.tensor([1.0, bad]))
    after = o.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_never_observed_raises():
    with pytest.raises(CalibrationError, match="never observed"):
        HistogramObserver().compute_amax("max")


def test_state_dict_round_trip_and_validation():
    o = observed([torch.randn(300) * 7])
    p = HistogramObserver()
    p.load_state_dict(o.state_dict())
    assert same_hist(o.histogram, p.histogram)
    bad = o.state_dict()
    bad["num_samples"] = torch.tensor(1)
    with pytest.raises(CalibrationError, match="inconsistent"):
        p.load_state_dict(bad)
    with pytest.raises(CalibrationError, match="missing"):
        p.load_state_dict({"counts": bad["counts"]})


def test_bad_options_are_clear_errors():
    with pytest.raises(CalibrationError, match="at least 256"):
        HistogramObserver(16)
    with pytest.raises(CalibrationError, match="256 and 2048"):
        HistogramObserver(256).merge(HistogramObserver(2048))
    with pytest.raises(CalibrationError, match="torch.Tensor"):
        HistogramObserver().update([1.0, 2.0])
