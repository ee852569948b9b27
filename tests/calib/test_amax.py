"""Amax searches: analytic quantiles, the slow entropy reference, brute-force mse, properties."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    abs_quantile,
    entropy_reference,
    last_argmin,
    mse_on_samples,
    quantile_samples,
)

from calib import (
    CalibMethod,
    CalibrationError,
    Histogram,
    HistogramObserver,
    compute_amax,
)
from calib.amax import entropy_divergences

GOLDEN = Path(__file__).parent / "golden" / "amax_golden.json"
KINDS = ["uniform", "gaussian", "laplace"]


def obs_of(x, num_bins=2048) -> HistogramObserver:
    o = HistogramObserver(num_bins)
    o.update(torch.as_tensor(x))
    return o


@pytest.fixture(scope="module")
def samples():
    return {k: quantile_samples(k, 200_000) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_max_is_exact(kind, samples):
    x = samples[kind]
    assert obs_of(x).compute_amax("max") == float(np.abs(x).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [50.0, 90.0, 99.0, 99.9])
def test_percentile_matches_the_analytic_quantile_within_one_bin(kind, p, samples):
    o = obs_of(samples[kind])
    got = o.compute_amax(CalibMethod("percentile", percentile=p))
    assert abs(got - abs_quantile(kind, p / 100)) <= o.histogram.width + 1e-3 * abs_quantile(kind, p / 100)
    assert abs(got - float(np.quantile(np.abs(samples[kind]), p / 100))) <= o.histogram.width


def test_percentile_100_is_the_max():
    x = torch.randn(1000)
    assert obs_of(x).compute_amax(CalibMethod("percentile", percentile=100)) == float(x.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_entropy_equals_the_slow_reference(kind, samples):
    h = obs_of(samples[kind]).histogram
    cand, kl = entropy_reference(h.counts)
    fast_cand, fast_kl = entropy_divergences(h.counts, 128, 128)
    assert fast_cand.tolist() == cand
    np.testing.assert_allclose(fast_kl, kl, rtol=1e-9, atol=1e-12)
    assert compute_amax(h, "entropy") == min(cand[last_argmin(kl)] * h.width, h.amax)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_bins=st.integers(130, 400),
    zero_frac=st.floats(0, 0.7),
    spike=st.booleans(),
)
def test_entropy_equals_the_slow_reference_on_random_histograms(seed, n_bins, zero_frac, spike):
    """Sparse, spiky histograms (empty bins, big zero bin, empty last bins) exercise every branch."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(512, np.int64)
    counts[:n_bins] = rng.integers(0, 50, n_bins) * (rng.random(n_bins) > zero_frac)
    counts[n_bins - 1] = max(counts[n_bins - 1], 1)
    if spike:
        counts[0] += 10_000
    cand, kl = entropy_reference(counts, 128, 128)
    fast_cand, fast_kl = entropy_divergences(counts, 128, 128)
    assert fast_cand.tolist() == cand
    finite = np.isfinite(kl)
    assert np.array_equal(np.isfinite(fast_kl), finite)
    np.testing.assert_allclose(fast_kl[finite], np.array(kl)[finite], rtol=1e-9, atol=1e-12)
    h = Histogram(counts, 0, float(n_bins), int(counts.sum()))
    if finite.any():
        assert compute_amax(h, "entropy") == cand[last_argmin(kl)]


def test_entropy_clips_a_long_tail():
    """Gaussian bulk plus a few far outliers: entropy must clip well below the max."""
    x = torch.cat([torch.randn(100_000), torch.tensor([50.0, -60.0])])
    o = obs_of(x)
    assert o.compute_amax("max") == 60.0
    assert 2.5 < o.compute_amax("entropy") < 10.0


def test_mse_of_uniform_data_is_the_analytic_optimum():
    """U(0,1), 127 levels: minimise a**3/(12*127**2) + (1-a)**3/3  ->  a = 254/255."""
    o = obs_of(quantile_samples("uniform", 200_000))
    assert abs(o.compute_amax("mse") - 254 / 255) <= 2 * o.histogram.width


@pytest.mark.parametrize("kind", KINDS)
def test_mse_is_near_the_brute_force_optimum_on_raw_samples(kind, samples):
    x = samples[kind].astype(np.float64)
    o = obs_of(samples[kind])
    grid = np.linspace(0.3, 1.0, 400) * np.abs(x).max()
    best = min(mse_on_samples(x, a) for a in grid)
    assert mse_on_samples(x, o.compute_amax("mse")) <= best * 1.02


@pytest.mark.parametrize("kind", KINDS)
def test_golden_amax(kind, samples):
    golden = json.loads(GOLDEN.read_text())
    o = obs_of(samples[kind])
    methods = {"max": CalibMethod("max"), "percentile_99.9": CalibMethod("percentile", percentile=99.9),
               "percentile_99.99": CalibMethod("percentile", percentile=99.99),
               "entropy": CalibMethod("entropy"), "mse": CalibMethod("mse")}
    for key, m in methods.items():
        assert o.compute_amax(m) == pytest.approx(golden["amax"][kind][key], rel=1e-12), key


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), j=st.integers(-30, 30), method=st.sampled_from(["max", "percentile", "entropy", "mse"]))
def test_scaling_by_a_power_of_two_scales_amax_exactly(seed, j, method):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(seed)) ** 3
    k = 2.0**j
    assert obs_of(x * k).compute_amax(method) == k * obs_of(x).compute_amax(method)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.floats(1e-3, 1e3))
def test_scaling_by_any_positive_k(seed, k):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b = obs_of(x), obs_of(x * k)
    assert b.compute_amax("max") == pytest.approx(k * a.compute_amax("max"), rel=1e-12)
    tol = b.histogram.width + k * a.histogram.width
    assert abs(b.compute_amax("percentile") - k * a.compute_amax("percentile")) <= tol


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ps=st.lists(st.floats(0.01, 100), min_size=2, max_size=8))
def test_percentile_is_monotone(seed, ps):
    o = obs_of(torch.randn(2000, generator=torch.Generator().manual_seed(seed)).exp())
    vals = [o.compute_amax(CalibMethod("percentile", percentile=p)) for p in sorted(ps)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vals[-1] <= o.compute_amax("max")


def test_compute_is_idempotent_and_never_mutates_the_histogram():
    x = torch.relu(torch.randn(10_000))  # many exact zeros: entropy rewrites bin 0 on its copy
    o = obs_of(x)
    before = o.histogram.counts.copy()
    first = {m: o.compute_amax(m) for m in ["entropy", "mse", "percentile", "max"]}
    second = {m: o.compute_amax(m) for m in ["entropy", "mse", "percentile", "max"]}
    assert first == second and np.array_equal(o.histogram.counts, before)
    for m, v in first.items():
        assert 0 < v <= first["max"], m


def test_unknown_method_and_bad_parameters_are_clear_errors():
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'.*entropy"):
        CalibMethod("kl")
    with pytest.raises(CalibrationError, match="percentile"):
        CalibMethod("percentile", percentile=0)
    with pytest.raises(CalibrationError, match="start_bin"):
        CalibMethod("entropy", start_bin=16)
    with pytest.raises(CalibrationError, match="never observed"):
        compute_amax(Histogram.empty(), "max")


def test_tiny_values_fall_back_to_max_when_there_are_too_few_bins():
    x = torch.tensor([1e-38, 2e-38, 3e-39])  # below the finest bin width 2**-126 * 2048
    o = obs_of(x)
    for m in ["entropy", "mse"]:
        assert o.compute_amax(m) == pytest.approx(2e-38, rel=1e-6)
    assert math.isfinite(o.compute_amax("percentile"))
