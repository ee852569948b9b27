"""qfold.report.metrics: golden values computed by hand, edge cases, and invariances."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qfold.report import metrics as metrics


def test_sqnr_golden() -> None:
    # signal 1 + 4 = 5, noise 0.1**2 = 0.01 -> 10*log10(500) = 26.98970004336019
    assert metrics.sqnr_db([1.0, 2.0], [1.0, 2.1]) == pytest.approx(26.98970004336019, abs=1e-9)
    # numpy and torch inputs give the same number
    r = np.array([[3.0, -4.0]])
    t = torch.tensor([[3.0, -3.0]], dtype=torch.float64)
    assert metrics.sqnr_db(torch.from_numpy(r), t) == pytest.approx(10 * math.log10(25.0 / 1.0))


def test_sqnr_edges() -> None:
    assert metrics.sqnr_db([1.0, 2.0], [1.0, 2.0]) == math.inf
    assert metrics.sqnr_db([0.0, 0.0], [1.0, 0.0]) == -math.inf
    assert metrics.sqnr_db_from_energy(100.0, 1.0) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="same shape"):
        metrics.sqnr_db([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.sqnr_db([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="energies"):
        metrics.sqnr_db_from_energy(-1.0, 1.0)


def test_top1_agreement_golden() -> None:
    ref = np.array([[0.0, 1.0, 0.5], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    test = np.array([[0.0, 2.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert metrics.top1_agreement(ref, test) == 0.5  # rows 0 and 2 agree
    # axis selects the class axis (segmentation-style (N, K, H) outputs)
    seg = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # argmax over K per position: [0, 1]
    seg2 = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]])  # [0, 0]
    assert metrics.top1_agreement(seg, seg2, axis=1) == 0.5


def test_topk_accuracy_golden() -> None:
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    y = np.array([2, 0, 0])
    assert metrics.topk_accuracy(logits, y, 1) == pytest.approx(1 / 3)
    assert metrics.topk_accuracy(logits, y, 2) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(logits, torch.tensor(y), 3) == 1.0
    with pytest.raises(ValueError, match="labels"):
        metrics.topk_accuracy(logits, y[:2], 1)
    with pytest.raises(ValueError, match="k must be"):
        metrics.topk_accuracy(logits, y, 4)


def test_max_abs_err_golden() -> None:
    assert metrics.max_abs_err([1.0, -2.0, 3.0], [1.5, -4.0, 3.0]) == 2.0
    assert metrics.max_abs_err(np.zeros((0,)), np.zeros((0,))) == 0.0


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, 16, elements=finite), arrays(np.float64, 16, elements=finite), st.floats(1e-3, 1e3))
def test_sqnr_invariant_to_common_scale(ref: np.ndarray, test: np.ndarray, k: float) -> None:
    a = metrics.sqnr_db(ref, test)
    b = metrics.sqnr_db(k * ref, k * test)
    if math.isfinite(a):
        assert b == pytest.approx(a, abs=1e-6)
    else:
        assert b == a or not math.isfinite(b)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (6, 4), elements=finite), arrays(np.float64, (6, 4), elements=finite), st.permutations(range(6)))
def test_agreement_symmetric_and_row_order_free(a: np.ndarray, b: np.ndarray, perm: list[int]) -> None:
    v = metrics.top1_agreement(a, b)
    assert v == metrics.top1_agreement(b, a)
    assert v == metrics.top1_agreement(a[perm], b[perm])
    assert v == pytest.approx(sum(int(np.argmax(a[i]) == np.argmax(b[i])) for i in range(6)) / 6)


def test_energy_matches_the_float64_sum_in_any_layout():
    """metrics.energies' signal: float32 dot products, within 1e-5 of the exact float64 sum here; layouts and dtypes agree."""
    import torch

    from qfold.report.metrics import energies

    def energy(x: torch.Tensor) -> float:
        return energies(x, x)[0]

    torch.manual_seed(0)
    x = torch.randn(8, 16, 28, 28)
    exact = float(x.double().square().sum())
    assert energy(x) == pytest.approx(exact, rel=1e-5)
    assert energy(x.contiguous(memory_format=torch.channels_last)) == pytest.approx(exact, rel=1e-5)
    assert energy(x.double()) == pytest.approx(exact, rel=1e-12)
    assert energy(x.half()) == pytest.approx(float(x.half().double().square().sum()), rel=1e-5)
    assert energy(torch.zeros(0)) == 0.0


@pytest.mark.parametrize("chunk", [7, 1000, metrics.PAIR_CHUNK])
def test_energies_match_float64_sums_in_any_layout(chunk: int) -> None:
    """metrics.energies: signal and noise energy in one read, whatever the chunk and the layouts."""
    torch.manual_seed(0)
    ref = torch.randn(4, 16, 14, 14)
    test = ref + 0.01 * torch.randn_like(ref)
    sig, noise = float(ref.double().square().sum()), float((ref.double() - test.double()).square().sum())
    for r, t in [(ref, test), (ref.contiguous(memory_format=torch.channels_last), test),
                 (ref.contiguous(memory_format=torch.channels_last), test.contiguous(memory_format=torch.channels_last))]:
        got = metrics.energies(r, t, chunk=chunk)
        assert got[0] == pytest.approx(sig, rel=1e-5) and got[1] == pytest.approx(noise, rel=1e-4)
    assert metrics.energies(ref, ref.clone()) == (pytest.approx(sig, rel=1e-5), 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.energies(ref, test[:2])
