"""Denoise measured latency curves without erasing the runtime's alignment steps.

Latency is not monotone in channel count: kernels vectorise over channels, so an aligned count
(a multiple of the kernel's vector or block width) can run much faster than its unaligned
neighbours, even with one channel fewer. A plain monotone or smoothing fit would treat those
steps as noise. The structure we rely on instead:

* **Alignment classes.** For an alignment period ``P`` (a power of two), count ``c`` belongs to
  class ``min(v2(c), log2 P)``, where ``v2(c)`` is the number of times 2 divides ``c``. With
  ``P = 16``: odd counts, 2 mod 4, 4 mod 8, 8 mod 16, and multiples of 16. Counts of one class
  run the same kind of kernel tail, so *within a class* more channels never cost less.
* **The fit.** Minimise ``Σ huber(r) + κ·Σ pos(r) + λ·Σ (second differences of f)²`` with
  ``r = (f - t) / m`` (``m`` the median raw time, so the problem is scale-free), subject to
  ``f`` non-decreasing along every class. Huber makes an interference spike cheap to ignore;
  the ``pos`` term makes fitting *above* a raw figure dearer than below it, because
  interference only ever adds time (a figure that came out fast is better evidence than one
  that came out slow); the monotone constraints remove noise that breaks the class order. The
  smoothness term is small and acts only inside one class between two consecutive aligned
  counts, and along the aligned counts themselves, so it never smooths across a step.
* **The period** is measured, not assumed (:func:`alignment_classes`): the smallest ``P`` whose
  multiples are systematically faster than their nearest unaligned neighbours.

The 2-D version (:func:`denoise_2d`) applies the same constraints along both axes of a
``C[c_in, c_out]`` matrix and can fill in unmeasured (NaN) cells.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

__all__ = [
    "PERIODS",
    "Alignment",
    "DenoisedCurve",
    "DenoisedGrid",
    "alignment_classes",
    "candidate_counts",
    "class_of",
    "denoise",
    "denoise_2d",
    "interpolate",
]

#: Alignment periods considered, smallest first.
PERIODS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)

# Tuned on synthetic step curves (as in tests/latency/test_denoise.py: small jitter with
# one-sided spikes, and symmetric noise) so that the fit's error stays below the raw error.
_HUBER_M = 0.02  # residuals beyond 2% of the median time are outliers (linear loss)
_ASYM = 0.5  # extra linear cost of fitting above a raw figure, relative to Huber's slope
_SMOOTH = 0.1  # weight of the squared second differences, relative to the data term


def _check_period(period: int) -> int:
    if period < 1 or period & (period - 1):
        raise ValueError(f"alignment period must be a power of two >= 1, got {period}")
    return period.bit_length() - 1


def class_of(c: int, period: int) -> int:
    """Alignment class of count ``c``: ``min(v2(c), log2(period))`` (0 = odd)."""
    top = _check_period(period)
    if c == 0:
        return top
    v2 = (c & -c).bit_length() - 1
    return min(v2, top)


def _block_of(c: int, period: int) -> int:
    # Counts in (P·(k-1), P·k] share block k: a step happens right after each aligned count.
    return -(-c // period)


# --------------------------------------------------------------------------- period detection


@dataclass(frozen=True)
class Alignment:
    """The alignment period found in a curve, with the evidence for each period tried.

    ``evidence[p] = (support, fraction_faster, median_gain)``: how many multiples of ``p`` had
    unaligned neighbours, which fraction of them was faster than the faster neighbour by more
    than ``min_gain``, and the median log-ratio (neighbour / aligned).
    """

    period: int
    evidence: dict[int, tuple[int, float, float]] = field(default_factory=dict)


def _gains(counts: np.ndarray, log_t: np.ndarray, p: int, members: np.ndarray) -> np.ndarray:
    """log(faster nearest unaligned neighbour / aligned) for each aligned count in ``members``."""
    unaligned = counts % p != 0
    u_counts, u_log = counts[unaligned], log_t[unaligned]
    out = []
    for c, lt in zip(counts[members], log_t[members], strict=True):
        i = np.searchsorted(u_counts, c)
        nbrs = [u_log[j] for j in (i - 1, i) if 0 <= j < len(u_counts) and abs(u_counts[j] - c) < p]
        if nbrs:
            out.append(min(nbrs) - lt)
    return np.asarray(out, dtype=np.float64)


def alignment_classes(
    counts: Sequence[int] | np.ndarray,
    times: Sequence[float] | np.ndarray,
    *,
    periods: Sequence[int] = PERIODS,
    min_gain: float = 0.05,
    min_support: int = 3,
) -> Alignment:
    """Find, from raw measurements, the alignment period of a latency curve.

    ``p`` is *systematic* when, over the multiples of ``p`` that have an unaligned measured
    neighbour within distance ``p``, at least 2/3 are faster than the faster of their nearest
    unaligned neighbours by more than ``min_gain`` (relative), the median gain exceeds
    ``min_gain``, and at least ``min_support`` multiples could be compared. Comparing with the
    *faster* neighbour makes an interference spike on a neighbour useless as evidence. So that
    strong evidence from multiples of ``2p`` cannot carry ``p`` on its own, the multiples of
    ``p`` that are *not* multiples of ``2p`` must be faster in at least half of the cases too.

    Returns:
        The smallest systematic period (1 if none is), with the evidence per period.
    """
    c = np.asarray(counts, dtype=np.int64)
    t = np.asarray(times, dtype=np.float64)
    if c.shape != t.shape or c.ndim != 1:
        raise ValueError(f"counts and times must be 1-D of equal length, got {c.shape}, {t.shape}")
    ok = np.isfinite(t) & (t > 0)
    order = np.argsort(c[ok], kind="stable")
    c, log_t = c[ok][order], np.log(t[ok][order])
    if len(np.unique(c)) != len(c):
        raise ValueError("counts must be unique")
    gain = math.log1p(min_gain)
    evidence: dict[int, tuple[int, float, float]] = {}
    found = 1
    for p in sorted(periods, reverse=True):  # evidence for all, smallest systematic wins
        if p == 1:
            continue
        _check_period(p)
        g = _gains(c, log_t, p, c % p == 0)
        if len(g) == 0:
            evidence[p] = (0, 0.0, 0.0)
            continue
        frac, med = float(np.mean(g > gain)), float(np.median(g))
        evidence[p] = (len(g), frac, med)
        exact = _gains(c, log_t, p, (c % p == 0) & (c % (2 * p) != 0))
        exact_ok = len(exact) < 2 or float(np.mean(exact > gain)) >= 0.5
        if len(g) >= min_support and frac >= 2 / 3 and med > gain and exact_ok:
            found = p
    return Alignment(period=found, evidence=dict(sorted(evidence.items())))


# --------------------------------------------------------------------------------- the fit


def _fit(
    raw: np.ndarray,
    mono: list[tuple[int, int]],
    smooth: list[tuple[int, int, int]],
    smooth_w: list[tuple[float, float, float]] | None = None,
) -> np.ndarray:
    """Huber fit of ``raw`` (NaN = unmeasured) with f[j] >= f[i] for (i, j) in ``mono``."""
    n = raw.size
    seen = np.flatnonzero(np.isfinite(raw))
    if len(seen) == 0:
        raise ValueError("no finite measurement to fit")
    scale = float(np.median(raw[seen]))
    if not scale > 0:
        raise ValueError("latencies must be positive")
    y = raw[seen] / scale
    f = cp.Variable(n)
    r = f[seen] - y
    objective = cp.sum(cp.huber(r, _HUBER_M) + 2 * _HUBER_M * _ASYM * cp.pos(r)) / _HUBER_M
    if smooth:
        rows = np.repeat(np.arange(len(smooth)), 3)
        cols = np.asarray(smooth).ravel()
        if smooth_w is None:
            vals = np.tile([1.0, -2.0, 1.0], len(smooth))
        else:
            vals = np.asarray(smooth_w, dtype=np.float64).ravel()
        d2 = sp.csr_matrix((vals, (rows, cols)), shape=(len(smooth), n))
        objective = objective + _SMOOTH / _HUBER_M * cp.sum_squares(d2 @ f)
    constraints = []
    if mono:
        rows = np.repeat(np.arange(len(mono)), 2)
        cols = np.asarray(mono).ravel()
        vals = np.tile([-1.0, 1.0], len(mono))
        d1 = sp.csr_matrix((vals, (rows, cols)), shape=(len(mono), n))
        constraints.append(d1 @ f >= 0)
    problem = cp.Problem(cp.Minimize(objective), constraints)
    try:
        problem.solve(solver=cp.CLARABEL)
    except cp.SolverError:
        problem.solve()
    if f.value is None or problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"latency denoising failed: solver status {problem.status}")
    # The solver meets constraints to ~1e-8; raising violators to their predecessor makes
    # monotonicity exact (a few sweeps: in 2-D a fix along a row can touch a column).
    fitted = np.asarray(f.value, dtype=np.float64) * scale
    if mono:
        lo, hi = np.asarray(mono).T
        for _ in range(n):
            bad = fitted[hi] < fitted[lo]
            if not bad.any():
                break
            for i, j in zip(lo[bad], hi[bad], strict=True):
                fitted[j] = max(fitted[j], fitted[i])
    return fitted


def _chains(counts: np.ndarray, period: int) -> tuple[list[list[int]], list[list[int]]]:
    """Index chains (sorted by count) per class, and per (class, block) for smoothing.

    The aligned class (multiples of ``period``) is one smoothing chain across blocks: it is
    the envelope of good counts and has no steps of its own.
    """
    top = _check_period(period)
    by_class: dict[int, list[int]] = {}
    by_block: dict[tuple[int, int], list[int]] = {}
    for i in np.argsort(counts, kind="stable"):
        c = int(counts[i])
        k = class_of(c, period)
        by_class.setdefault(k, []).append(int(i))
        block = 0 if k == top else _block_of(c, period)
        by_block.setdefault((k, block), []).append(int(i))
    return list(by_class.values()), list(by_block.values())


def _pairs(chain: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(chain))


def _second_difference(x0: float, x1: float, x2: float) -> tuple[float, float, float]:
    """Weights of a second difference at unevenly spaced counts, scaled to (1, -2, 1).

    ``h·[(f2 - f1)/(x2 - x1) - (f1 - f0)/(x1 - x0)]`` with ``h`` half the span: zero for any
    linear function whatever the spacing (plain (1, -2, 1) would penalise a straight line
    measured at uneven counts, biasing a coarse grid), and exactly (1, -2, 1) when even.
    """
    a, c, h = 1.0 / (x1 - x0), 1.0 / (x2 - x1), (x2 - x0) / 2.0
    return a * h, -(a + c) * h, c * h


def _smooth_weights(
    triples: list[tuple[int, int, int]], x: np.ndarray
) -> list[tuple[float, float, float]]:
    return [_second_difference(*(float(x[i]) for i in t)) for t in triples]


def _triples(chain: list[int]) -> list[tuple[int, int, int]]:
    return list(zip(chain[:-2], chain[1:-1], chain[2:], strict=True))


@dataclass(frozen=True, eq=False)
class DenoisedCurve:
    """A latency curve t(c): raw figures kept alongside the fit, and the period used."""

    counts: np.ndarray
    raw: np.ndarray
    fitted: np.ndarray
    period: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN raw values become ``None``)."""
        return {
            "counts": [int(c) for c in self.counts],
            "raw": [None if not math.isfinite(v) else float(v) for v in self.raw],
            "fitted": [float(v) for v in self.fitted],
            "period": self.period,
        }


def _as_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 1 or (not np.issubdtype(c.dtype, np.integer) and not np.all(c == np.round(c))):
        raise ValueError("counts must be a 1-D sequence of integers")
    c = c.astype(np.int64)
    if np.any(c < 0) or len(np.unique(c)) != len(c):
        raise ValueError("counts must be unique and non-negative")
    return c


def denoise(
    counts: Sequence[int] | np.ndarray, times: Sequence[float] | np.ndarray, period: int
) -> DenoisedCurve:
    """Fit t(c), monotone within each alignment class of ``period``, robust to outliers.

    ``times`` may hold NaN for unmeasured counts; they are filled in from the fit.
    """
    _check_period(period)
    c = _as_counts(counts)
    raw = np.asarray(times, dtype=np.float64)
    if raw.shape != c.shape:
        raise ValueError(f"counts and times differ in length: {c.shape} vs {raw.shape}")
    classes, blocks = _chains(c, period)
    mono = [pair for chain in classes for pair in _pairs(chain)]
    smooth = [tri for chain in blocks for tri in _triples(chain)]
    fitted = _fit(raw, mono, smooth, _smooth_weights(smooth, c))
    return DenoisedCurve(counts=c, raw=raw, fitted=fitted, period=period)


@dataclass(frozen=True, eq=False)
class DenoisedGrid:
    """A latency matrix ``raw[i, j]`` at (``cin[i]``, ``cout[j]``) and its fit."""

    cin: np.ndarray
    cout: np.ndarray
    raw: np.ndarray
    fitted: np.ndarray
    period_in: int
    period_out: int


def denoise_2d(
    cin: Sequence[int] | np.ndarray,
    cout: Sequence[int] | np.ndarray,
    times: np.ndarray,
    period_in: int,
    period_out: int | None = None,
) -> DenoisedGrid:
    """2-D :func:`denoise`: monotone along every row and column within alignment classes.

    ``times[i, j]`` is the latency at ``(cin[i], cout[j])``; NaN cells are filled in.
    """
    period_out = period_in if period_out is None else period_out
    _check_period(period_in)
    _check_period(period_out)
    ci, co = _as_counts(cin), _as_counts(cout)
    raw = np.asarray(times, dtype=np.float64)
    if raw.shape != (len(ci), len(co)):
        raise ValueError(f"times has shape {raw.shape}, expected {(len(ci), len(co))}")
    idx = np.arange(raw.size).reshape(raw.shape)
    in_classes, in_blocks = _chains(ci, period_in)
    out_classes, out_blocks = _chains(co, period_out)
    mono: list[tuple[int, int]] = []
    smooth: list[tuple[int, int, int]] = []
    weights: list[tuple[float, float, float]] = []
    for j in range(len(co)):  # along c_in, for every column
        mono += [(idx[a, j], idx[b, j]) for ch in in_classes for a, b in _pairs(ch)]
        tris = [t for ch in in_blocks for t in _triples(ch)]
        smooth += [tuple(idx[list(t), j]) for t in tris]
        weights += _smooth_weights(tris, ci)
    for i in range(len(ci)):  # along c_out, for every row
        mono += [(idx[i, a], idx[i, b]) for ch in out_classes for a, b in _pairs(ch)]
        tris = [t for ch in out_blocks for t in _triples(ch)]
        smooth += [tuple(idx[i, list(t)]) for t in tris]
        weights += _smooth_weights(tris, co)
    fitted = _fit(raw.ravel(), mono, smooth, weights).reshape(raw.shape)  # type: ignore[arg-type]
    return DenoisedGrid(ci, co, raw, fitted, period_in, period_out)


# ----------------------------------------------------------------- candidates and lookups


def candidate_counts(
    max_count: int, period: int, coarse_step: int | None = None, *, include_zero: bool = False
) -> list[int]:
    """The channel counts offered to the solver for a space of ``max_count`` channels.

    Multiples of ``step`` (``coarse_step`` rounded up to a multiple of ``period``, so every
    candidate is aligned), plus ``max_count`` itself (keeping everything is always an option,
    aligned or not), plus 0 only if ``include_zero`` (removing a whole space is the block
    decision's business, not a channel count's).
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    _check_period(period)
    step = period if coarse_step is None else max(coarse_step, 1)
    step = -(-step // period) * period
    counts = [*range(step, max_count, step), max_count]
    return [0, *counts] if include_zero else counts


def interpolate(curve: DenoisedCurve, c: int) -> float:
    """The fitted latency at ``c``, interpolating linearly between counts of ``c``'s class only.

    Interpolating across classes would average a fast aligned count with slow unaligned ones.

    Raises:
        ValueError: ``c`` lies outside the measured range of its alignment class.
    """
    k = class_of(c, curve.period)
    members = sorted(
        (int(x), float(f))
        for x, f in zip(curve.counts, curve.fitted, strict=True)
        if class_of(int(x), curve.period) == k
    )
    xs = [x for x, _ in members]
    i = bisect.bisect_left(xs, c)
    if i < len(xs) and xs[i] == c:
        return members[i][1]
    if i == 0 or i == len(xs):
        span = f"[{xs[0]}, {xs[-1]}]" if xs else "nothing"
        raise ValueError(
            f"count {c} is outside its alignment class's measured range {span} "
            f"(class {k} for period {curve.period}); measure it or pick a candidate count"
        )
    (x0, f0), (x1, f1) = members[i - 1], members[i]
    return f0 + (f1 - f0) * (c - x0) / (x1 - x0)
