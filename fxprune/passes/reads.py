"""How a consumer with its own kept inputs reads them: slice, gather, or a zero-padded read.

After group pruning and reordering, a consumer's kept inputs sit at some positions of its input
tensor. Four ways to read them, all equal to the masked model:

- ``slice``: the positions are one contiguous range — a ``narrow`` (a view in eager PyTorch at
  batch 1; ONNX Runtime's Slice copies the range).
- ``gather``: any positions — one ``index_select`` (a copy of the kept channels).
- ``span``: slice the range from the first to the last kept position and give the consumer zero
  weight columns for the dropped positions inside it.
- ``full``: read the whole tensor (no copy) with zero columns for every dropped position.

Which is fastest depends on the runtime: a copy costs memory traffic, a zero column costs
multiply-adds. :class:`MeasuredReads` decides by timing each consumer's candidates (the read
followed by its pruned layer) side by side on the backend — what ``fxprune.compile`` uses.
:class:`ReadCost` is the cheap analytic alternative: one price per copied element and per MAC
(:func:`fxprune.backends.probe.measure_read_cost`); on ONNX Runtime CPU it mispriced zero-padded
reads on DenseNet-121 and EfficientNetV2-S (a MAC's cost varies too much between layers).
``policy="exact"`` always reads exactly what the plan keeps (slice or gather).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.passes.segment import SegmentCost

__all__ = [
    "POLICIES",
    "POLICY_OF_KIND",
    "ConsumerRead",
    "MeasuredReads",
    "ReadCost",
    "ReadUnit",
    "choose_read",
    "pad_read",
]

POLICIES = ("exact", "auto", "span", "full", "measure")
#: the policy that reproduces a recorded read kind (plans record them so rebuilds match)
POLICY_OF_KIND = {"slice": "exact", "gather": "exact", "span": "span", "full": "full"}


@dataclass(frozen=True)
class ReadCost:
    """Seconds per copied element (by op) and per multiply-accumulate, on one backend.

    Defaults are orders of magnitude for a desktop CPU; use measured figures for decisions that
    matter (they are what ``fxprune.compile`` uses).
    """

    slice_s_per_element: float = 2e-10
    gather_s_per_element: float = 4e-10
    mac_s: float = 2e-11

    def time(self, kind: str, copied: int, macs: int) -> float:
        per = {"slice": self.slice_s_per_element, "span": self.slice_s_per_element}
        per["gather"] = self.gather_s_per_element
        return per.get(kind, 0.0) * copied + self.mac_s * macs


@dataclass(frozen=True)
class ConsumerRead:
    """The read chosen for one consumer.

    Attributes:
        kind: "slice" | "gather" | "span" | "full".
        local: positions (in the rewritten input tensor) the consumer reads, in order.
        zero: for each read position, whether its weight column is zero (a dropped input).
    """

    kind: str
    local: np.ndarray
    zero: np.ndarray

    @property
    def start(self) -> int:
        return int(self.local[0])

    @property
    def length(self) -> int:
        return int(self.local.size)


def choose_read(
    kept_local: np.ndarray,
    n_local: int,
    *,
    spatial: int,
    macs_per_input: int,
    policy: str = "auto",
    cost: ReadCost | None = None,
) -> ConsumerRead:
    """The read of sorted positions ``kept_local`` out of ``n_local`` that ``policy`` picks.

    Args:
        spatial: elements per channel (what a copy of one channel moves).
        macs_per_input: multiply-accumulates one read input channel costs the consumer.
    """
    if policy not in POLICIES or policy == "measure":
        raise ValueError(f"read policy must be one of {POLICIES}, got {policy!r}")
    kept_local = np.asarray(kept_local, dtype=np.int64)
    k = kept_local.size
    a, b = int(kept_local[0]), int(kept_local[-1]) + 1
    contiguous = b - a == k
    exact = ConsumerRead("slice" if contiguous else "gather", kept_local, np.zeros(k, dtype=bool))
    if policy == "exact":
        return exact
    full_local = np.arange(n_local)
    full = ConsumerRead("full", full_local, ~np.isin(full_local, kept_local))
    if policy == "full":
        return full
    span = exact
    if not contiguous and (a, b) != (0, n_local):
        span_local = np.arange(a, b)
        span = ConsumerRead("span", span_local, ~np.isin(span_local, kept_local))
    if policy == "span":
        return span
    cost = cost or ReadCost()
    options = [exact, full, span]

    def seconds(r: ConsumerRead) -> float:
        copied = 0 if r.kind == "full" else r.length * spatial
        return cost.time(r.kind, copied, r.length * macs_per_input)

    return min(options, key=seconds)


def pad_read(read: ConsumerRead, n_local: int, block: int) -> ConsumerRead:
    """``read`` widened to a multiple of ``block`` positions, the added ones zero columns.

    ONNX Runtime CPU runs a conv in its blocked layout (NCHWc) only when its input channels
    are a multiple of the block (8 with AVX2); otherwise in plain NCHW, which was about 25%
    slower per multiply-add here. Per-layer masks at 30% sparsity give nearly every consumer
    an unaligned count (0.7 x 64 = 45), so ResNet-50 ran 48 of 53 convs in NCHW. A read with a
    few zero columns costs those columns' multiply-adds and keeps the conv blocked. A slice
    (or span) grows to the right, else to the left, into a span; a gather takes the nearest
    positions it does not read; a read that would cover the whole tensor becomes a full read.
    Full reads, and reads already aligned, are returned as they are.
    """
    k = read.length
    want = -(-k // block) * block
    if block <= 1 or read.kind == "full" or want == k:
        return read
    kept = read.local[~read.zero]
    if want >= n_local:
        local = np.arange(n_local)
        return ConsumerRead("full", local, ~np.isin(local, kept))
    if read.kind in ("slice", "span"):
        stop = min(n_local, read.start + want)
        local = np.arange(stop - want, stop)
        return ConsumerRead("span", local, ~np.isin(local, kept))
    free = np.setdiff1d(np.arange(n_local), read.local)
    # nearest free positions to the read (ties to the lower one): the gather stays local
    dist = np.abs(free[:, None] - read.local[None, :]).min(1)
    extra = free[np.lexsort((free, dist))[: want - k]]
    local = np.sort(np.concatenate([read.local, extra]))
    return ConsumerRead("gather", local, ~np.isin(local, kept))


class ReadUnit(nn.Module):
    """A consumer behind its read: what one candidate costs on the runtime.

    With ``producer_channels``, the read's input first goes through a per-channel 1×1
    (depthwise) conv, so that it arrives in the layout a conv output has inside the model.
    On ONNX Runtime CPU that matters more than the copy itself: convs run in a blocked layout
    (NCHWc), and a Slice or Gather on channels makes the optimizer convert the whole tensor
    back to NCHW before the copy and the kept part forward again after it. A unit fed
    straight from its (NCHW) session input pays neither conversion, and so prices an exact
    read too cheaply against a full read, which stays blocked from end to end.
    """

    def __init__(
        self, read: ConsumerRead, layer: nn.Module, dim: int, producer_channels: int = 0
    ) -> None:
        super().__init__()
        self.kind, self.dim, self.layer = read.kind, dim, layer
        self.start, self.length = read.start, read.length
        self.register_buffer("index", torch.from_numpy(read.local.astype(np.int64)))
        self.producer = (
            nn.Conv2d(producer_channels, producer_channels, 1, groups=producer_channels)
            if producer_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.producer(x)
        if self.kind in ("slice", "span"):
            x = torch.narrow(x, self.dim, self.start, self.length)
        elif self.kind == "gather":
            x = torch.index_select(x, self.dim, self.index)
        return self.layer(x)


@dataclass
class MeasuredReads:
    """Choose each consumer's read by timing its candidates side by side on ``backend``.

    The exact read (slice or gather) is kept unless another is faster by more than
    ``min_gain``; a gather also gives way to a full read (no copy) that is not slower.
    Decisions are remembered per (consumer, input shape, candidates), so a compile that
    re-solves in rounds re-times only consumers whose kept sets changed. ``decisions`` keeps
    the figures (ms per candidate kind) of each consumer's latest call, for the report and for
    the whole-model check's copy budget.

    The whole-model check of :func:`fxprune.passes.prune.rewrite` uses three more settings:

    - ``tie``: models measured within this fraction of the exact reads (or, when one wins
      clearly, of the fastest) count as equally fast, and the one with fewer copies is kept.
      On this 2-core host two copies of one ResNet-50 graph, timed side by side, came out
      0.93-1.06x each other (sd 4% over five measurements), so a smaller difference is not
      evidence.
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
            from fxprune.backends import MeasureConfig, measure_side_by_side

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
            # a zero-padded read must win clearly: unit timings carry a few % of noise, and
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
        from fxprune.backends import MeasureConfig, measure_side_by_side

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
        from fxprune.backends import relative_latency

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
            from fxprune.backends.probe import measure_segment_cost

            self._segment_cost = measure_segment_cost(self.backend)
        return self._segment_cost

    def segment_block(self) -> int:
        """The channel block segments are aligned to: the backend's layout block, else 1."""
        probe = getattr(self.backend, "layout_block", None)
        return int(probe()) if callable(probe) else 1
