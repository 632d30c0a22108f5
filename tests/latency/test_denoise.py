"""Latency-curve denoising: noise goes, steps stay, periods are found, lookups stay in class."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.latency import (
    PERIODS,
    DenoisedCurve,
    alignment_classes,
    candidate_counts,
    class_of,
    denoise,
    denoise_2d,
    interpolate,
)

COUNTS = np.arange(32, 97)


def staircase(counts: np.ndarray, period: int, drop: float = 0.4) -> np.ndarray:
    """A runtime-like curve: linear growth, a jump after every aligned count, fast aligned counts."""
    blocks = (counts - 1) // period
    return 0.5 + 0.02 * counts + 0.3 * blocks - drop * (counts % period == 0)


def spiky(truth: np.ndarray, seed: int, jitter: float = 0.02, spikes: float = 0.15) -> np.ndarray:
    """Jitter plus one-sided interference spikes (+0..100%), as on a shared machine."""
    rng = np.random.default_rng(seed)
    hit = rng.random(truth.shape) < spikes
    return (
        truth
        * (1 + jitter * rng.standard_normal(truth.shape))
        * (1 + hit * rng.random(truth.shape))
    )


def assert_monotone_within_classes(counts: np.ndarray, values: np.ndarray, period: int) -> None:
    order = np.argsort(counts)
    for k in {class_of(int(c), period) for c in counts}:
        chain = [values[i] for i in order if class_of(int(counts[i]), period) == k]
        assert np.all(np.diff(chain) >= 0), f"class {k} not monotone"


# ------------------------------------------------------------------------------------ 1-D


@pytest.mark.parametrize("seed", range(4))
def test_planted_noise_is_removed(seed: int) -> None:
    truth = staircase(COUNTS, 16)
    raw = spiky(truth, seed)
    curve = denoise(COUNTS, raw, 16)
    assert np.abs(curve.fitted - truth).mean() < 0.75 * np.abs(raw - truth).mean()
    np.testing.assert_array_equal(curve.raw, raw)  # raw figures kept alongside
    np.testing.assert_array_equal(curve.counts, COUNTS)
    assert curve.period == 16
    assert_monotone_within_classes(COUNTS, curve.fitted, 16)


def test_symmetric_noise_is_removed() -> None:
    truth = staircase(COUNTS, 16)
    raw = truth * (1 + 0.05 * np.random.default_rng(7).standard_normal(truth.shape))
    fitted = denoise(COUNTS, raw, 16).fitted
    assert np.abs(fitted - truth).mean() < 0.9 * np.abs(raw - truth).mean()


@pytest.mark.parametrize("period", [8, 16])
def test_planted_steps_survive(period: int) -> None:
    truth = staircase(COUNTS, period)
    raw = truth * (1 + 0.01 * np.random.default_rng(1).standard_normal(truth.shape))
    f = dict(zip(COUNTS.tolist(), denoise(COUNTS, raw, period).fitted, strict=True))
    t = dict(zip(COUNTS.tolist(), truth, strict=True))
    aligned = [c for c in COUNTS[1:-1] if c % period == 0]
    for c in aligned:  # aligned counts stay faster than both neighbours, by most of the step
        for n in (c - 1, c + 1):
            assert f[n] - f[c] > 0.6 * (t[n] - t[c]), (c, n)


def test_period_one_is_plain_monotone_fit() -> None:
    truth = 1.0 + 0.01 * COUNTS
    raw = spiky(truth, 3)
    fitted = denoise(COUNTS, raw, 1).fitted
    assert np.all(np.diff(fitted) >= 0)
    assert np.abs(fitted - truth).mean() < np.abs(raw - truth).mean()


def test_denoise_fills_unmeasured_counts() -> None:
    truth = staircase(COUNTS, 16)
    raw = truth.copy()
    missing = (COUNTS % 7 == 3) & (COUNTS % 16 != 0)
    raw[missing] = np.nan
    curve = denoise(COUNTS, raw, 16)
    assert np.all(np.isfinite(curve.fitted))
    np.testing.assert_allclose(curve.fitted[missing], truth[missing], rtol=0.1)
    assert curve.to_dict()["raw"][int(np.flatnonzero(missing)[0])] is None


def test_denoise_is_scale_free() -> None:
    raw = spiky(staircase(COUNTS, 16), 0)
    a = denoise(COUNTS, raw, 16).fitted
    b = denoise(COUNTS, raw * 1000, 16).fitted
    np.testing.assert_allclose(b, a * 1000, rtol=1e-3)


@pytest.mark.parametrize(
    ("counts", "times", "period", "error"),
    [
        ([1, 2, 3], [1.0, 2.0, 3.0], 12, "power of two"),
        ([1, 2, 2], [1.0, 2.0, 3.0], 1, "unique"),
        ([1, 2, 3], [1.0, 2.0], 1, "length"),
        ([1, 2, 3], [np.nan] * 3, 1, "finite"),
        ([1, 2, 3], [-1.0, -1.0, -1.0], 1, "positive"),
    ],
)
def test_denoise_rejects_bad_input(counts, times, period: int, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        denoise(counts, times, period)


# ------------------------------------------------------------------------------------ 2-D


def test_denoise_2d() -> None:
    cin = np.arange(16, 49, 2)
    cout = np.arange(16, 49, 2)
    truth = np.outer(staircase(cin, 8), staircase(cout, 8))
    rng = np.random.default_rng(0)
    raw = truth * (1 + 0.03 * rng.standard_normal(truth.shape))
    raw[rng.random(truth.shape) < 0.1] *= 1.8
    raw[3, 5] = np.nan
    grid = denoise_2d(cin, cout, raw, 8)
    assert grid.fitted.shape == truth.shape
    assert np.all(np.isfinite(grid.fitted))
    seen = np.isfinite(raw)
    assert np.abs(grid.fitted - truth)[seen].mean() < 0.75 * np.abs(raw - truth)[seen].mean()
    for j in range(len(cout)):
        assert_monotone_within_classes(cin, grid.fitted[:, j], 8)
    for i in range(len(cin)):
        assert_monotone_within_classes(cout, grid.fitted[i, :], 8)
    # the step along c_out survives: 24 and 40 (aligned) beat their even neighbours
    col = {int(c): j for j, c in enumerate(cout)}
    for c in (24, 40):
        assert np.all(grid.fitted[:, col[c]] < grid.fitted[:, col[c + 2]])


# ------------------------------------------------------------------------- period detection


@pytest.mark.parametrize("period", [8, 16, 32])
@pytest.mark.parametrize("seed", range(3))
def test_period_detected(period: int, seed: int) -> None:
    raw = spiky(staircase(COUNTS, period, drop=0.5), seed, spikes=0.1)
    found = alignment_classes(COUNTS, raw)
    assert found.period == period
    assert set(found.evidence) == set(PERIODS) - {1}


def test_period_detected_on_the_design_figures() -> None:
    # DESIGN.md §5, ONNX Runtime CPU on an AVX-512 machine: 48 and 64 fast, 61-63 and 65-80 slow.
    counts = np.arange(40, 82)
    times = np.where(counts <= 48, 0.55, np.where(counts <= 60, 0.87, 1.3))
    times = np.where(counts > 64, 1.48, times)
    times = np.where(counts == 64, 0.89, times)
    times = np.where(counts == 80, 1.48, times)
    times = np.where(counts == 81, 1.7, times)
    times = np.where(counts < 48, 0.8, times)
    assert alignment_classes(counts, times).period == 16


@pytest.mark.parametrize("seed", range(3))
def test_no_structure_gives_period_one(seed: int) -> None:
    truth = 0.5 + 0.02 * COUNTS
    raw = truth * (1 + 0.03 * np.random.default_rng(seed).standard_normal(truth.shape))
    assert alignment_classes(COUNTS, raw).period == 1


def test_period_needs_unaligned_neighbours() -> None:
    counts = np.arange(32, 97, 8)  # a grid of aligned counts only says nothing about alignment
    assert alignment_classes(counts, 0.02 * counts).period == 1


# ---------------------------------------------------------------- classes and candidates

periods = st.sampled_from(PERIODS)


@given(c=st.integers(0, 4096), period=periods)
@settings(deadline=None)  # no timing in tests: a busy machine must not fail them
def test_class_of(c: int, period: int) -> None:
    k = class_of(c, period)
    assert 0 <= k <= period.bit_length() - 1
    assert c % (1 << k) == 0
    if k < period.bit_length() - 1:  # not in the top class: exactly k factors of two
        assert c % (1 << (k + 1)) != 0
    else:
        assert c % period == 0


@given(
    max_count=st.integers(1, 2048),
    period=periods,
    coarse=st.one_of(st.none(), st.integers(1, 128)),
    zero=st.booleans(),
)
@settings(deadline=None)
def test_candidate_counts(max_count: int, period: int, coarse: int | None, zero: bool) -> None:
    counts = candidate_counts(max_count, period, coarse, include_zero=zero)
    assert counts == sorted(set(counts))
    assert counts[-1] == max_count
    assert (counts[0] == 0) == zero
    assert all(0 < c <= max_count for c in counts[int(zero) :])
    assert all(c % period == 0 for c in counts[:-1])  # every candidate but the full width aligned
    step = period if coarse is None else -(-coarse // period) * period
    inner = [c for c in counts if 0 < c < max_count]
    assert inner == list(range(step, max_count, step))


def test_candidate_counts_examples() -> None:
    assert candidate_counts(64, 16, 16) == [16, 32, 48, 64]
    assert candidate_counts(70, 16, 24) == [32, 64, 70]
    assert candidate_counts(10, 16) == [10]
    assert candidate_counts(8, 1, include_zero=True) == list(range(9))
    with pytest.raises(ValueError):
        candidate_counts(0, 8)


@st.composite
def curves(draw: st.DrawFn) -> DenoisedCurve:
    period = draw(periods)
    counts = sorted(draw(st.sets(st.integers(1, 200), min_size=1, max_size=60)))
    fitted = draw(st.lists(st.floats(0.01, 100), min_size=len(counts), max_size=len(counts)))
    arr = np.asarray(fitted)
    return DenoisedCurve(np.asarray(counts), arr.copy(), arr, period)


@given(curve=curves(), c=st.integers(1, 200))
@settings(max_examples=200, deadline=None)
def test_interpolate_stays_in_class(curve: DenoisedCurve, c: int) -> None:
    k = class_of(c, curve.period)
    same = {
        int(x): float(f)
        for x, f in zip(curve.counts, curve.fitted, strict=True)
        if class_of(int(x), curve.period) == k
    }
    if c in same:
        assert interpolate(curve, c) == same[c]
        return
    below = [x for x in same if x < c]
    above = [x for x in same if x > c]
    if not below or not above:
        with pytest.raises(ValueError, match="alignment class"):
            interpolate(curve, c)
        return
    lo, hi = max(below), min(above)
    value = interpolate(curve, c)
    # between its two same-class neighbours, whatever other classes lie in between
    assert min(same[lo], same[hi]) - 1e-9 <= value <= max(same[lo], same[hi]) + 1e-9
    expected = same[lo] + (same[hi] - same[lo]) * (c - lo) / (hi - lo)
    assert value == pytest.approx(expected)


def test_interpolate_ignores_other_classes() -> None:
    counts = np.array([48, 56, 63, 64, 65, 80])
    fitted = np.array([1.0, 1.5, 2.0, 1.2, 2.5, 2.0])
    by8 = DenoisedCurve(counts, fitted, fitted, 8)
    # 72 lies between the aligned 64 and 80; the slow 65 next to it plays no part
    assert interpolate(by8, 72) == pytest.approx(1.6)
    assert interpolate(by8, 64) == 1.2
    by16 = DenoisedCurve(counts, fitted, fitted, 16)
    with pytest.raises(ValueError, match="alignment class"):
        interpolate(by16, 72)  # 8 mod 16: only 56 of that class was measured
    assert interpolate(by16, 56) == 1.5
