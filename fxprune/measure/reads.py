"""Consumer reads chosen by timing them: :class:`MeasuredReads`.

The rewrite (:func:`fxprune.rewrite.prune.rewrite` with ``reads="measure"``) builds each
consumer's candidate reads and asks a :class:`~fxprune.unconstrained.reads.ReadChooser`;
:class:`MeasuredReads` answers by timing every candidate, behind the consumer's pruned layer, side
by side on the backend. It also carries the settings and measurements of the whole-model check
(:mod:`fxprune.measure.export_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.backends import (
    MeasureConfig,
    layout_block_of,
    measure_side_by_side,
    relative_latency,
)
from fxprune.measure.probes import ReadUnit, measure_segment_cost
from fxprune.rewrite.segment import SegmentCost
from fxprune.unconstrained.reads import ConsumerRead

__all__ = ["MeasuredReads"]


@dataclass
class MeasuredReads:
    """Choose each consumer's read by timing its candidates side by side on ``backend``.

    The exact read (slice or gather) is kept unless another is faster by more than
    ``min_gain``; a gather also gives way to a full read (no copy) that is not slower.
    Decisions are remembered per (consumer, input shape, candidates), so a compile that
    re-solves in rounds re-times only consumers whose kept sets changed. ``decisions`` keeps
    the figures (ms per candidate kind) of each consumer's latest call, for the report and for
    the whole-model check's copy budget.

    The whole-model check of :func:`fxprune.rewrite.prune.rewrite` uses three more settings:

    - ``tie``: models measured within this fraction of the exact reads (or, when one wins
      clearly, of the fastest) count as equally fast, and the one with fewer copies is kept.
      Two copies of one graph timed side by side do not measure exactly 1.0x each other on
      a shared host, so a difference within that noise (of the median over
      ``check_repeats``) is not evidence.
    - ``copy_budget``: the latency, as a fraction of the exact model's, that the check may
      spend (by the unit timings) on replacing gathers with gather-free reads.
    - ``check_repeats``: whole-model measurements per check, each in a fresh random order; the
      median ratio is used (the spread above shrinks with their number). A close call (a
      candidate with fewer copies measured just outside the tie of the kept one) is measured
      again, the two alone, twice as often (:meth:`runoff`).
    """

    backend: Any
    config: Any = None
    seed: int = 0
    min_gain: float = 0.05
    tie: float = 0.025
    copy_budget: float = 0.01
    check_repeats: int = 3
    decisions: dict[str, dict[str, float]] = field(default_factory=dict)
    _memo: dict[tuple, tuple[str, dict[str, float]]] = field(default_factory=dict, repr=False)
    _segment_cost: SegmentCost | None = field(default=None, repr=False)

    def choose(
        self,
        name: str,
        shape: tuple[int, ...],
        dim: int,
        candidates: dict[str, tuple[ConsumerRead, nn.Module]],
    ) -> ConsumerRead:
        if len(candidates) == 1:
            return next(iter(candidates.values()))[0]
        key = (
            name,
            shape,
            tuple(
                (k, r.local.tobytes(), r.zero.tobytes()) for k, (r, _) in sorted(candidates.items())
            ),
        )
        if key not in self._memo:
            config = self.config or MeasureConfig(warmup=3, repeats=20, min_seconds=0.3)
            kinds = sorted(candidates)
            produced = shape[dim] if len(shape) == 4 and dim == 1 else 0  # a conv's NCHW output
            units = [
                ReadUnit(candidates[k][0], candidates[k][1], dim, produced).eval() for k in kinds
            ]
            x = torch.randn(shape, generator=torch.Generator().manual_seed(self.seed))
            with torch.no_grad():
                figures = measure_side_by_side(self.backend, units, (x,), config, 1)
            ms = {k: f.median_ms for k, f in zip(kinds, figures, strict=True)}
            best = min(kinds, key=lambda k: ms[k])
            exact = next(k for k in kinds if k in ("slice", "gather"))
            # a zero-padded read must win clearly: unit timings are noisy, and
            # the exact read also saves parameters and multiply-adds in the whole model.
            # A gather is the exception: a full read that is not slower copies nothing, and
            # a copy is the cost that varies most between runtimes and batch sizes
            choice = exact if ms[exact] <= ms[best] * (1 + self.min_gain) else best
            if choice == "gather" and ms.get("full", np.inf) <= ms["gather"]:
                choice = "full"
            self._memo[key] = (choice, ms)
        choice, self.decisions[name] = self._memo[key]
        return candidates[choice][0]

    def measure(self, modules: list[nn.Module], example_inputs: tuple[torch.Tensor, ...]) -> list:
        """Whole modules timed side by side (:class:`~fxprune.backends.Measurement` each)."""
        config = self.config or MeasureConfig(warmup=3, repeats=20, min_seconds=1.0)
        with torch.no_grad():
            return measure_side_by_side(self.backend, modules, example_inputs, config, 1)

    def compare(
        self,
        modules: list[nn.Module],
        example_inputs: tuple[torch.Tensor, ...],
        repeats: int | None = None,
    ) -> list[float]:
        """Each module's latency as a multiple of the first one's: the median over ``repeats``
        (default ``check_repeats``) side-by-side measurements, each in a fresh random order (a
        module's place in the alternation should not decide a close call)."""
        rng = np.random.default_rng(self.seed)
        runs = []
        for _ in range(max(1, self.check_repeats if repeats is None else repeats)):
            order = rng.permutation(len(modules))
            figures = self.measure([modules[i] for i in order], example_inputs)
            by_index = dict(zip(order.tolist(), figures, strict=True))
            runs.append([relative_latency(by_index[i], by_index[0]) for i in range(len(modules))])
        return [float(r) for r in np.median(runs, axis=0)]

    def runoff(
        self, kept: nn.Module, rival: nn.Module, example_inputs: tuple[torch.Tensor, ...]
    ) -> float:
        """``rival``'s latency as a multiple of ``kept``'s, from twice ``check_repeats``
        side-by-side measurements of the two alone: a second, more precise look at a close
        call of the whole-model check (the first one timed every candidate together)."""
        return self.compare([kept, rival], example_inputs, repeats=2 * max(1, self.check_repeats))[
            1
        ]

    def segment_cost(self) -> SegmentCost:
        """The backend's price of one more segment (:func:`measure_segment_cost`), probed once."""
        if self._segment_cost is None:
            self._segment_cost = measure_segment_cost(self.backend)
        return self._segment_cost

    def segment_block(self) -> int:
        """The channel block segments are aligned to: the backend's layout block, else 1."""
        return layout_block_of(self.backend)
