"""Find the channel-count period a runtime rewards, from a 1-D sweep of measured latencies.

Two shapes of step occur (both on ONNX Runtime CPU, often in the same unit):

* **Aligned counts are faster than their neighbours** (an unaligned *input* count sends a conv
  down a slower, non-blocked path): :func:`~fxprune.latency.denoise.alignment_classes`.
* **A staircase**: the kernel computes output channels in blocks, so every count in
  ``(P·(k−1), P·k]`` costs about what ``P·k`` does, and the time jumps right after each multiple
  of ``P`` (one channel past a multiple costs almost a whole block more). Aligned counts are
  then not faster than their left neighbour, only cheaper per channel, so the first test sees
  nothing: :func:`staircase_period`.

In both shapes the counts worth offering are the multiples of ``P``. :func:`refine_period` then
asks whether multiples of ``2P`` are better still, and :func:`detect_period` combines the three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fxprune.latency.denoise import PERIODS, alignment_classes

__all__ = ["detect_period", "refine_period", "staircase_period"]


def staircase_period(
    counts: Sequence[int] | np.ndarray,
    times: Sequence[float] | np.ndarray,
    *,
    periods: Sequence[int] = PERIODS,
    min_gain: float = 0.04,
    min_support: int = 2,
) -> int:
    """The smallest ``p`` after whose multiples the latency systematically jumps (1 if none).

    With ``d(c) = log t(c+1) − log t(c)`` over consecutive measured counts, ``p`` is systematic
    when at least ``min_support`` multiples ``c`` of ``p`` have ``d(c)`` measured, their median
    exceeds the median of the other increments by ``log(1 + min_gain)``, and 2/3 of them exceed
    it by half that; the odd multiples of ``p`` (not of ``2p``) must also jump, by half the
    margin in median, so that big jumps at multiples of ``2p`` cannot pass for a period ``p``.
    Medians make single interference spikes harmless.
    """
    t = {int(c): float(x) for c, x in zip(counts, times, strict=True) if float(x) > 0}
    d = {c: math.log(t[c + 1] / t[c]) for c in t if c + 1 in t}
    gain = math.log1p(min_gain)
    for p in sorted(periods):
        if p == 1:
            continue
        at = [v for c, v in d.items() if c % p == 0]
        rest = [v for c, v in d.items() if c % p != 0]
        if len(at) < min_support or not rest:
            continue
        base = float(np.median(rest))
        # Jumps at multiples of 2p alone must not carry p: its odd multiples must jump too.
        odd = [v for c, v in d.items() if c % p == 0 and c % (2 * p) != 0]
        odd_ok = len(odd) < 2 or float(np.median(odd)) - base > gain / 2
        frac = np.mean([v - base > gain / 2 for v in at])
        if np.median(at) - base > gain and frac >= 2 / 3 and odd_ok:
            return p
    return 1


def refine_period(
    counts: Sequence[int],
    times: Sequence[float],
    period: int,
    *,
    max_period: int = 32,
    min_gain: float = 0.05,
    min_support: int = 2,
) -> int:
    """The coarsest ``q = 2^k·period`` whose multiples beat the multiples of ``q/2`` beside them.

    For each multiple ``c`` of ``q`` the gain is ``log(t̂ / t(c))`` with ``t̂`` the linear
    interpolation of ``t(c - q/2)`` and ``t(c + q/2)``, or ``t(c - q/2)`` alone when the right
    one was not measured (a *smaller* count being slower is evidence on its own; a larger one
    is not). ``q`` passes with ``min_support`` comparisons of which 2/3, and the median, gain
    more than ``min_gain``. Each ``q`` is tested on its own (steps at 16 without extra steps at
    8 are common), and the coarsest passing one wins. This separates "multiples of 16 are good"
    from "multiples of 4 are good", which comparing with unaligned neighbours alone cannot.
    """
    t = dict(zip((int(c) for c in counts), (float(x) for x in times), strict=True))
    best = p = max(period, 1)
    threshold = math.log1p(min_gain)
    while 2 * p <= max_period:
        q, h = 2 * p, p
        gains = []
        for c, tc in t.items():
            if c % q or c - h not in t or not tc > 0:
                continue
            ref = 0.5 * (t[c - h] + t[c + h]) if c + h in t else t[c - h]
            gains.append(math.log(ref / tc))
        if (
            len(gains) >= min_support
            and np.mean([g > threshold for g in gains]) >= 2 / 3
            and np.median(gains) > threshold
        ):
            best = q
        p = q
    return best


def detect_period(
    counts: Sequence[int] | np.ndarray,
    times: Sequence[float] | np.ndarray,
    *,
    max_period: int = 32,
) -> int:
    """The alignment period of a sweep: the coarser of the two step shapes, then refined."""
    periods = [p for p in PERIODS if p <= max_period]
    aligned = alignment_classes(counts, times, periods=periods, min_support=2).period
    stair = staircase_period(counts, times, periods=periods)
    return refine_period(counts, times, max(aligned, stair), max_period=max_period)
