"""The small public surface: analyse, apply a plan, rebuild a saved pruned model."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxprune.analysis import Analysis, analyze
from fxprune.core.errors import PlanError
from fxprune.core.plan import Plan
from fxprune.rewrite.prune import RewriteInfo, apply_plan
from fxprune.rewrite.segment import SegmentCost
from fxprune.unconstrained.reads import POLICY_OF_KIND

__all__ = ["ExportSpec", "prune", "rebuild"]


@dataclass(frozen=True)
class ExportSpec:
    """What :func:`rebuild` needs beyond the plan to re-create an unconstrained export.

    An unconstrained plan can be exported many ways (which consumer reads by slice, gather or
    zero-padded span; segments; padded reads). ``compile`` measures them and records the one
    it kept in ``Plan.notes``, under the keys ``reads``, ``segment_block``, ``segment_cost``
    and ``read_block`` (the names plans have always been saved with), so the saved plan
    rebuilds exactly that structure.

    Attributes:
        reads: consumer -> read kind (``slice`` / ``gather`` / ``span`` / ``full``), as
            :meth:`~fxprune.rewrite.prune.RewriteInfo.kinds`; None: the rewrite's default.
        segment_block: read tensors carried as segments aligned to this block (None: not).
        segment_cost: the per-segment price the segments were merged under.
        read_block: reads padded to a multiple of this many channels (None: not).
    """

    reads: Mapping[str, str] | None = None
    segment_block: int | None = None
    segment_cost: SegmentCost | None = None
    read_block: int | None = None

    #: the ``Plan.notes`` keys this spec is stored under
    NOTE_KEYS = ("reads", "segment_block", "segment_cost", "read_block")

    @classmethod
    def from_info(cls, info: RewriteInfo) -> ExportSpec:
        """The spec of the export a rewrite (or a measured choice) produced."""
        return cls(info.kinds(), info.segment_block, info.segment_cost, info.read_block)

    @classmethod
    def from_notes(cls, notes: Mapping[str, Any]) -> ExportSpec:
        """The spec recorded in a plan's notes (absent keys: the rewrite's defaults).

        Raises:
            PlanError: a recorded key does not hold what it should.
        """
        reads = notes.get("reads")
        if reads is not None and not (
            isinstance(reads, Mapping) and all(v in POLICY_OF_KIND for v in reads.values())
        ):
            raise PlanError(
                f"plan notes 'reads' must map consumers to one of {sorted(POLICY_OF_KIND)}, "
                f"got {reads!r}; re-save the plan with compile or remove the key"
            )
        cost = notes.get("segment_cost")
        if cost is not None:
            try:
                cost = SegmentCost(**cost)
            except TypeError as exc:
                raise PlanError(
                    f"plan notes 'segment_cost' must hold launch_s and mac_s, got {cost!r}"
                ) from exc
        blocks = {k: notes.get(k) for k in ("segment_block", "read_block")}
        for key, value in blocks.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PlanError(f"plan notes {key!r} must be an integer ≥ 1, got {value!r}")
        return cls(reads=reads, segment_cost=cost, **blocks)

    def to_notes(self) -> dict[str, Any]:
        """The JSON-ready notes entries: only the keys that are set."""
        notes: dict[str, Any] = {}
        if self.reads is not None:
            notes["reads"] = dict(self.reads)
        if self.segment_block is not None:
            notes["segment_block"] = self.segment_block
        if self.segment_cost is not None:
            notes["segment_cost"] = dataclasses.asdict(self.segment_cost)
        if self.read_block is not None:
            notes["read_block"] = self.read_block
        return notes

    def recorded_in(self, plan: Plan) -> Plan:
        """``plan`` with this spec in its notes (replacing any spec recorded before)."""
        kept = {k: v for k, v in plan.notes.items() if k not in self.NOTE_KEYS}
        return dataclasses.replace(plan, notes={**kept, **self.to_notes()})

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~fxprune.rewrite.prune.rewrite` for this export."""
        values = {k: getattr(self, k) for k in self.NOTE_KEYS}  # the notes keys are its names
        return {k: v for k, v in values.items() if v is not None}


def prune(analysis: Analysis, plan: Plan, **options: Any) -> fx.GraphModule:
    """The pruned GraphModule for ``plan``; the analysed model and the user's model are untouched.

    Options (unconstrained plans): ``reorder=True`` (permute channels so consumers read slices),
    ``reads="exact" | "auto" | "full"`` and ``read_cost`` — see
    :func:`fxprune.rewrite.prune.rewrite`.
    """
    return apply_plan(analysis, plan, **options)


def rebuild(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    plan: Plan | str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | str | os.PathLike | None = None,
) -> fx.GraphModule:
    """Re-create a saved pruned model from its original architecture, its plan and its weights.

    This is the portable way to load a result (no pickled code): build the original model the
    same way, pass the plan file and the pruned state dict written by ``save``.
    """
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    options = ExportSpec.from_notes(plan.notes).options()  # the export compile measured
    pruned = apply_plan(analyze(model, example_inputs, attention=plan.attention), plan, **options)
    if state_dict is not None:
        if not isinstance(state_dict, dict):
            state_dict = torch.load(Path(state_dict), map_location="cpu", weights_only=True)
        pruned.load_state_dict(state_dict)
    return pruned
