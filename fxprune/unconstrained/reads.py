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
multiply-adds. :class:`ReadChooser` is how the rewrite asks for a choice it cannot make alone:
:class:`fxprune.measure.reads.MeasuredReads` implements it by timing each consumer's candidates
(the read followed by its pruned layer) side by side on the backend — what ``fxprune.compile``
uses.
:class:`ReadCost` is the cheap analytic alternative: one price per copied element and per MAC
(:func:`fxprune.measure.probes.measure_read_cost`). It can misprice zero-padded reads, because
a MAC's cost varies between layers (kernel, width, layout) more than one price can follow.
``policy="exact"`` always reads exactly what the plan keeps (slice or gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from torch import nn

__all__ = [
    "POLICIES",
    "POLICY_OF_KIND",
    "ConsumerRead",
    "ReadChooser",
    "ReadCost",
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
    are a multiple of the block (the runtime's channel block, e.g. 8 or 16 depending on the
    CPU's vector width; ask ``backend.layout_block()``); otherwise in plain NCHW, which is
    slower per multiply-add. Per-layer masks give nearly every consumer an unaligned count
    (at 30% sparsity, 0.7 × 64 = 45), so most convs of such a model would run unblocked. A
    read with a few zero columns costs those columns' multiply-adds and keeps the conv
    blocked. A slice (or span) grows to the right, else to the left, into a span; a gather
    takes the nearest positions it does not read; a read that would cover the whole tensor
    becomes a full read.
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


@runtime_checkable
class ReadChooser(Protocol):
    """Picks one consumer's read among its candidates (``policy="measure"`` in the rewrite).

    The rewrite builds the candidates — each read with the consumer's pruned layer behind it —
    and hands them over; how the choice is made (timing them on a backend) is the chooser's
    business, so the rewrite itself never measures.
    """

    def choose(
        self,
        name: str,
        shape: tuple[int, ...],
        dim: int,
        candidates: dict[str, tuple[ConsumerRead, nn.Module]],
    ) -> ConsumerRead: ...
