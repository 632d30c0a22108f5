"""Choosing an unconstrained export by timing whole models: :func:`measured_rewrite`.

Each consumer's read is first chosen by timing a unit (:class:`~fxprune.measure.reads.MeasuredReads`),
and a unit timed alone cannot show everything the model around it does (layout conversions
between layers, cache effects of copies). So the whole model is also built in up to five more
pure variants — each a :func:`fxprune.rewrite.prune.rewrite` or
:func:`fxprune.rewrite.segment.segment` with other options — timed side by side, and one is kept
by the rule of :func:`_decide`. The rewrite itself never measures; the decision is a typed
:class:`ExportChoice`.

The variants:

- ``exact``: every consumer reads exactly what it keeps (slice or gather);
- ``measured``: the reads the unit timings chose (only when some are zero-padded);
- ``segmented``: exact reads with every read tensor carried as segments, cut only where a
  segment pays for its extra convs under the backend's measured price
  (:meth:`~fxprune.measure.reads.MeasuredReads.segment_cost`);
- ``lean``: exact reads, except that the gathers whose gather-free read (full or span) the unit
  timings price cheapest give way to it, within ``copy_budget`` of the exact model's measured
  latency (:func:`_lean_kinds`). Reordering already reaches the lower bound of gathers for exact
  reads (three intervals make at most five membership patterns), so fewer gathers can only come
  from reads with zero columns;
- ``aligned``: shared tensors rounded up to the backend's channel block and exact reads padded to
  it with zero columns (``rewrite(read_block=)``), so every conv can run in the runtime's
  blocked layout;
- ``aligned_lean``: ``lean``'s reads padded the same way (where ``aligned`` wins clearly,
  ``lean`` alone could never tie it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import fx

from fxprune.measure.reads import MeasuredReads
from fxprune.rewrite.prune import RewriteInfo, channel_copies, rewrite
from fxprune.rewrite.segment import SegmentCost, segment

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.core.plan import Plan

__all__ = ["ExportChoice", "Runoff", "measured_rewrite"]

Candidates = dict[str, tuple[fx.GraphModule, RewriteInfo]]


@dataclass(frozen=True)
class Runoff:
    """A second, more precise look at a close call: ``rival`` timed again against ``kept``."""

    kept: str
    rival: str
    rival_vs_kept: float


@dataclass(frozen=True)
class ExportChoice:
    """Which export variant the whole-model check kept, and why.

    Attributes:
        vs_exact: each other candidate's latency as a multiple of the exact reads'.
        copies: (gathers, slices) along channels that each candidate runs.
        kept: the variant kept.
        reason: the rule that decided (``clear win``, ``tie``, ``runoff``).
        runoff: the second look at a close call, if there was one.
        measured_reads: how the unit timings read (counts by kind).
        segment_cost: the per-segment price the segmented candidate was merged under.
        lean: the ``lean`` candidate's record (extra time predicted, budget, reads replaced).
    """

    vs_exact: dict[str, float]
    copies: dict[str, tuple[int, int]]
    kept: str
    reason: str
    runoff: Runoff | None
    measured_reads: dict[str, int]
    segment_cost: SegmentCost
    lean: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (report.json, bench results)."""
        out: dict[str, Any] = {
            "vs_exact": dict(self.vs_exact),
            "copies": {
                n: dict(zip(("gathers", "slices"), c, strict=True)) for n, c in self.copies.items()
            },
            "kept": self.kept,
            "reason": self.reason,
            "runoff": dataclasses.asdict(self.runoff) if self.runoff is not None else None,
            "measured_reads": dict(self.measured_reads),
            "segment_cost": dataclasses.asdict(self.segment_cost),
        }
        if self.lean is not None:
            out["lean"] = self.lean
        return out


def measured_rewrite(
    analysis: Analysis, plan: Plan, judge: MeasuredReads, *, reorder: bool = True
) -> tuple[fx.GraphModule, RewriteInfo, ExportChoice | None]:
    """The unconstrained export of ``plan`` whose reads and variant ``judge`` measured best.

    Consumers' reads are chosen by timing units (``rewrite(reads="measure")``), then the whole
    model is timed against the other variants (see the module docstring). Returns the kept
    model, its :class:`RewriteInfo` and the :class:`ExportChoice` (None when exact reads were
    the only candidate).
    """
    gm, info = rewrite(analysis, plan, reorder=reorder, reads="measure", read_cost=judge)
    candidates, lean = _candidates(analysis, plan, reorder, judge, gm, info)
    if len(candidates) == 1:
        return (*candidates["exact"], None)
    names = list(candidates)
    models = [candidates[n][0] for n in names]
    ratios = dict(zip(names, judge.compare(models, analysis.example_inputs), strict=True))
    copies = {n: channel_copies(candidates[n][0]) for n in names}
    kept, reason = _decide(ratios, copies, judge)
    runoff = None
    rival = _close_rival(ratios, copies, kept, judge)
    if rival is not None:  # fewer copies, just outside the tie: measure the two again, alone
        ratio = judge.runoff(candidates[kept][0], candidates[rival][0], analysis.example_inputs)
        runoff = Runoff(kept, rival, ratio)
        if ratio <= 1.0 + judge.tie:
            kept, reason = rival, "runoff: fewer copies, within the tie on a second look"
    choice = ExportChoice(
        vs_exact={n: ratios[n] for n in names[1:]},
        copies=copies,
        kept=kept,
        reason=reason,
        runoff=runoff,
        measured_reads=info.counts(),
        segment_cost=judge.segment_cost(),
        lean=lean,
    )
    return (*candidates[kept], choice)


def _candidates(
    analysis: Analysis,
    plan: Plan,
    reorder: bool,
    judge: MeasuredReads,
    gm: fx.GraphModule,
    info: RewriteInfo,
) -> tuple[Candidates, dict[str, Any] | None]:
    """Every variant of the module docstring that differs from exact reads, and lean's record."""
    exact_gm, exact_info = rewrite(analysis, plan, reorder=reorder, reads="exact")
    candidates: Candidates = {"exact": (exact_gm, exact_info)}
    if any(r.kind in ("span", "full") for r in info.reads.values()):
        candidates["measured"] = (gm, info)
    block, cost = judge.segment_block(), judge.segment_cost()
    seg_gm, seg_info = segment(exact_gm, analysis.example_inputs, block, cost)
    if seg_info.regions:
        segmented = dataclasses.replace(
            exact_info, segments=seg_info, segment_block=block, segment_cost=cost
        )
        candidates["segmented"] = (seg_gm, segmented)
    lean = _lean_candidate(analysis, plan, reorder, judge, exact_gm, exact_info, info.kinds())
    if lean is not None:
        candidates["lean"] = lean[:2]
    if block > 1:
        aligned = rewrite(analysis, plan, reorder=reorder, reads="exact", read_block=block)
        if any(r.zero.any() for r in aligned[1].reads.values()):
            candidates["aligned"] = aligned
        if lean is not None:
            padded = rewrite(
                analysis, plan, reorder=reorder, reads=lean[1].kinds(), read_block=block
            )
            if _shapes(padded[0]) != _shapes(lean[0]):  # else the same graph as lean
                candidates["aligned_lean"] = padded
    return candidates, (lean[2] if lean is not None else None)


def _decide(
    ratios: dict[str, float], copies: dict[str, tuple[int, int]], judge: MeasuredReads
) -> tuple[str, str]:
    """The kept candidate and the rule that kept it.

    - If one beats the exact reads by ``min_gain / 2``, the one with the fewest channel copies
      (gathers, then slices) among those clear winners measured within ``tie`` of the fastest;
    - otherwise the one with the fewest copies among those measured within ``tie`` of the exact
      reads. Smaller differences are within the noise of side-by-side timing. A copy is memory
      traffic the runtime may price differently elsewhere (another batch size, a GPU); at equal
      measured speed, fewer is the sounder model. Exact reads win a tie (they store the fewest
      parameters).
    """
    fastest = _within_tie(ratios, judge)
    kept = min(fastest, key=lambda n: (copies[n], n != "exact", ratios[n]))
    clear = min(ratios.values()) <= 1.0 - judge.min_gain / 2
    reason = "clear win: fewest copies among the fastest" if clear else "tie with exact reads"
    return kept, reason


def _close_rival(
    ratios: dict[str, float],
    copies: dict[str, tuple[int, int]],
    kept: str,
    judge: MeasuredReads,
) -> str | None:
    """A candidate with fewer copies than ``kept`` measured within twice the tie of it: the
    first look times up to six models together, and its spread is about as large as the tie,
    so such a close call is measured again (:meth:`MeasuredReads.runoff`)."""
    close = [
        n
        for n in ratios
        if copies[n] < copies[kept] and ratios[n] <= ratios[kept] * (1.0 + 2 * judge.tie)
    ]
    return min(close, key=lambda n: (copies[n], ratios[n])) if close else None


def _shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


def _within_tie(ratios: dict[str, float], judge: MeasuredReads) -> list[str]:
    """The candidates :func:`_decide` counts as fastest: if one beats exact reads by
    ``min_gain / 2``, the clear winners within ``tie`` of the fastest; else those within
    ``tie`` of exact reads (exact included)."""
    clear = 1.0 - judge.min_gain / 2
    best = min(ratios.values())
    if best <= clear:
        return [n for n, r in ratios.items() if r <= min(clear, best * (1.0 + judge.tie))]
    return [n for n, r in ratios.items() if r <= 1.0 + judge.tie]


def _lean_candidate(
    analysis: Analysis,
    plan: Plan,
    reorder: bool,
    judge: MeasuredReads,
    exact_gm: fx.GraphModule,
    exact_info: RewriteInfo,
    measured: dict[str, str],
) -> tuple[fx.GraphModule, RewriteInfo, dict[str, Any]] | None:
    """The ``lean`` candidate and its record, or None if there is none
    (no gather has a timed alternative, or it would equal the measured reads)."""
    if _lean_kinds(exact_info, judge.decisions, math.inf)[0] is None:
        return None
    budget = judge.copy_budget * judge.measure([exact_gm], analysis.example_inputs)[0].median_ms
    kinds, spent = _lean_kinds(exact_info, judge.decisions, budget)
    if kinds is None or kinds == measured:
        return None
    gm, info = rewrite(analysis, plan, reorder=reorder, reads=kinds)
    exact_kinds = exact_info.kinds()
    record = {
        "predicted_extra_ms": spent,
        "budget_ms": budget,
        "replaced": {n: k for n, k in kinds.items() if exact_kinds[n] != k},
    }
    return gm, info, record


def _lean_kinds(
    exact: RewriteInfo, timings: dict[str, dict[str, float]], budget_ms: float
) -> tuple[dict[str, str] | None, float]:
    """Exact reads with the cheapest gathers replaced by gather-free reads, within a budget.

    ``timings`` are the unit figures of :class:`MeasuredReads` (ms per read kind, consumer and
    its pruned layer). Each gather with a timed full read (no copy) or span read (a slice with
    zero columns) gives way to the faster of the two, in increasing order of the extra time
    that read costs its unit, while the summed extra stays within ``budget_ms`` (reads that the
    units timed faster are free). Returns the reads (``None`` when no gather gives way) and
    the extra time spent.
    """
    steps = []
    for name, r in exact.reads.items():
        ms = timings.get(name, {})
        alternatives = [k for k in ("full", "span") if k in ms]
        if r.kind != "gather" or "gather" not in ms or not alternatives:
            continue
        alt = min(alternatives, key=ms.__getitem__)
        steps.append((max(ms[alt] - ms["gather"], 0.0), name, alt))
    kinds, spent = exact.kinds(), 0.0
    for extra, name, alt in sorted(steps):
        if spent + extra > budget_ms:
            break
        kinds[name], spent = alt, spent + extra
    return (kinds if kinds != exact.kinds() else None), spent
