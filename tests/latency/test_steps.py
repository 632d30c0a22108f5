"""Period detection: both step shapes, refinement to coarser periods, robustness to spikes."""

from __future__ import annotations

import numpy as np
import pytest

from fxprune.latency.steps import detect_period, refine_period, staircase_period

COUNTS = np.arange(44, 85)


def aligned_faster(counts: np.ndarray, period: int, fine: int = 4) -> np.ndarray:
    """A linear trend, slow unless aligned to ``fine``, faster still at multiples of ``period``."""
    t = 1.0 + 0.02 * counts
    t = t * np.where(counts % fine == 0, 1.0, 1.4)
    return t * np.where(counts % period == 0, 0.8, 1.0)


def staircase(counts: np.ndarray, period: int) -> np.ndarray:
    """Every count costs what the next multiple of ``period`` does."""
    return 0.2 + 0.01 * (-(-counts // period) * period)


@pytest.mark.parametrize("period", [8, 16])
def test_refine_finds_the_coarser_step(period):
    assert refine_period(COUNTS, aligned_faster(COUNTS, period), 4) == period


def test_refine_keeps_a_period_without_coarser_steps():
    assert refine_period(COUNTS, aligned_faster(COUNTS, 4), 4) == 4


@pytest.mark.parametrize("period", [4, 8, 16])
def test_staircase_period(period):
    assert staircase_period(COUNTS, staircase(COUNTS, period)) == period


def test_staircase_survives_spikes_and_jitter():
    rng = np.random.default_rng(0)
    t = staircase(COUNTS, 8) * (1 + 0.01 * rng.standard_normal(len(COUNTS)))
    t[[5, 17, 30]] *= 1.8  # interference spikes
    assert staircase_period(COUNTS, t) == 8


def test_smooth_curve_has_no_period():
    t = 0.2 + 0.01 * COUNTS
    assert staircase_period(COUNTS, t) == 1
    assert detect_period(COUNTS, t) == 1


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        (aligned_faster(COUNTS, 4), 4),
        (aligned_faster(COUNTS, 16), 16),
        (staircase(COUNTS, 8), 8),
    ],
    ids=["aligned-4", "aligned-16", "staircase-8"],
)
def test_detect_period(times, expected):
    assert detect_period(COUNTS, times) == expected


def test_detect_period_respects_the_cap():
    assert detect_period(COUNTS, staircase(COUNTS, 16), max_period=8) <= 8
