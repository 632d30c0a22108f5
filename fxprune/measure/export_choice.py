"""Choosing an unconstrained export by timing whole models: :func:`measured_rewrite`.

Each consumer's read is first chosen by timing a unit (:class:`~fxprune.measure.reads.MeasuredReads`),
which cannot show everything the model around it does. So the whole model is also built in up to
five more pure variants — exact reads, segmented tensors, ``lean``, ``aligned`` and
``aligned_lean`` (each a :func:`fxprune.rewrite.prune.rewrite` or
:func:`fxprune.rewrite.segment.segment` with other options) — which are timed side by side, and
one is kept by the rule of :func:`_check_whole`. The rewrite itself never measures.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from torch import fx

from fxprune.measure.reads import MeasuredReads
from fxprune.rewrite.prune import RewriteInfo, channel_copies, rewrite
from fxprune.rewrite.segment import segment

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.core.plan import Plan

__all__ = ["measured_rewrite"]


def measured_rewrite(
    analysis: Analysis, plan: Plan, judge: MeasuredReads, *, reorder: bool = True
) -> tuple[fx.GraphModule, RewriteInfo]:
    """The unconstrained export of ``plan`` whose reads and variant ``judge`` measured best.

    Consumers' reads are chosen by timing units (``rewrite(reads="measure")``), then the whole
    model is checked against the pure variants (:func:`_check_whole`); ``RewriteInfo.whole_check``
    records the candidates, their ratios and copies, and which was kept and why.
    """
    gm, info = rewrite(analysis, plan, reorder=reorder, reads="measure", read_cost=judge)
    return _check_whole(analysis, plan, reorder, judge, gm, info)


def _check_whole(
    analysis: Analysis,
    plan: Plan,
    reorder: bool,
    judge: MeasuredReads,
    gm: fx.GraphModule,
    info: RewriteInfo,
) -> tuple[fx.GraphModule, RewriteInfo]:
    """Time the whole model with exact reads, measured reads and segmented tensors; keep one.

    Each read was chosen by timing a unit, which cannot show everything the model around it
    does (on DenseNet-121 the units picked 19 zero-padded full reads and the model ran 10%
    slower than with exact reads). Segmenting removes every channel cut but adds convs, so its
    boundaries are merged under the backend's measured price of a segment
    (:meth:`MeasuredReads.segment_cost`); cutting at every boundary lost by 10-50% at batch 1
    on ONNX Runtime CPU. The candidates are timed side by side:

    - if one beats the exact reads by ``min_gain / 2``, the one with the fewest channel copies
      (gathers, then slices) among those clear winners measured within ``tie`` of the fastest;
    - otherwise the one with the fewest copies among those measured within ``tie`` of the
      exact reads. Smaller differences are noise here. A copy is memory traffic the runtime
      may price differently elsewhere (another batch size, a GPU); at equal measured speed,
      fewer is the sounder model. Exact reads win a tie (they store the fewest parameters).

    A fourth candidate, ``lean``, spends a latency budget on copies: exact reads, except that
    the gathers whose gather-free read (full or span) the unit timings price cheapest give way
    to it, while the summed extra time stays within ``copy_budget`` of the exact model's
    measured latency (:func:`_lean_kinds`). Without it, a model whose every gather-free read
    costs a little keeps all of its gathers, and reordering alone cannot remove more: it
    already reaches the lower bound for exact reads (three intervals make at most five
    membership patterns), so fewer gathers can only come from reads with zero columns.

    A fifth, ``aligned``, rounds shared tensors up to the backend's channel block and pads
    exact reads to it with zero columns (``rewrite(read_block=)``), so that every conv can
    run in the runtime's blocked layout. On ORT CPU that decided more than copies did: at 30%
    per-layer sparsity the exact export of ResNet-50 ran 48 of its 53 convs in plain NCHW.
    A sixth, ``aligned_lean``, pads ``lean``'s reads the same way: the blocked layout and
    fewer gathers at once (where ``aligned`` wins clearly, ``lean`` alone cannot tie it).

    A close call is measured twice (:meth:`MeasuredReads.runoff`): when a candidate with fewer
    copies than the kept one measured within twice the tie of it, the two are timed again,
    alone and twice as often, and the one with fewer copies is kept if that second look puts
    it within the tie. The first look times up to six models together, and its spread
    (about 2.5% per ratio here) is as large as the tie; on ResNet-50 at 0.3 it put
    ``aligned_lean`` 3.5% behind ``aligned``, whose kernel profile showed 2 ms (4%) more copying
    and layout conversion against about 3.7% fewer multiply-adds.
    """
    exact_gm, exact_info = rewrite(analysis, plan, reorder=reorder, reads="exact")
    candidates: dict[str, tuple[fx.GraphModule, RewriteInfo]] = {"exact": (exact_gm, exact_info)}
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
    if len(candidates) == 1:
        return exact_gm, exact_info
    names = list(candidates)
    ratios = dict(
        zip(
            names,
            judge.compare([candidates[n][0] for n in names], analysis.example_inputs),
            strict=True,
        )
    )
    copies = {n: channel_copies(candidates[n][0]) for n in names}
    kept = min(_within_tie(ratios, judge), key=lambda n: (copies[n], n != "exact", ratios[n]))
    runoff = None
    close = [
        n
        for n in names
        if copies[n] < copies[kept] and ratios[n] <= ratios[kept] * (1.0 + 2 * judge.tie)
    ]
    if close:  # fewer copies, just outside the tie: measure the two again, alone
        rival = min(close, key=lambda n: (copies[n], ratios[n]))
        ratio = judge.runoff(candidates[kept][0], candidates[rival][0], analysis.example_inputs)
        runoff = {"kept": kept, "rival": rival, "rival_vs_kept": ratio}
        if ratio <= 1.0 + judge.tie:
            kept = rival
    chosen, chosen_info = candidates[kept]
    chosen_info.whole_check = {
        "vs_exact": {n: ratios[n] for n in names[1:]},
        "copies": {n: dict(zip(("gathers", "slices"), copies[n], strict=True)) for n in names},
        "kept": kept,
        "runoff": runoff,
        "measured_reads": info.counts(),
        "segment_cost": dataclasses.asdict(cost),
    }
    if lean is not None:
        chosen_info.whole_check["lean"] = lean[2]
    return chosen, chosen_info


def _shapes(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


def _within_tie(ratios: dict[str, float], judge: MeasuredReads) -> list[str]:
    """The candidates :func:`_check_whole` counts as fastest: if one beats exact reads by
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
    """The ``lean`` candidate of :func:`_check_whole` and its record, or None if there is none
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
