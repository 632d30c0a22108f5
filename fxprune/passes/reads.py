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
multiply-adds. :class:`ReadCost` prices both from figures measured on the backend
(:func:`fxprune.backends.probe.measure_read_cost`) and :func:`choose_read` takes the cheapest.
``policy="exact"`` always reads exactly what the plan keeps (slice or gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["POLICIES", "ConsumerRead", "ReadCost", "choose_read"]

POLICIES = ("exact", "auto", "full")


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
    if policy not in POLICIES:
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
    cost = cost or ReadCost()
    options = [exact, full]
    if not contiguous and (a, b) != (0, n_local):
        span_local = np.arange(a, b)
        options.append(ConsumerRead("span", span_local, ~np.isin(span_local, kept_local)))

    def seconds(r: ConsumerRead) -> float:
        copied = 0 if r.kind == "full" else r.length * spatial
        return cost.time(r.kind, copied, r.length * macs_per_input)

    return min(options, key=seconds)
