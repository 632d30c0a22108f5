"""The Plan: which channels each coupling group keeps and which blocks are removed.

A Plan is plain data. It names groups and blocks by stable names from the analysis, stores kept
indices sorted, serialises to JSON, and is checked against an :class:`~fxprune.analysis.Analysis`
before use. It carries the analysis signature so a plan made for another architecture is refused.

Unconstrained pruning (UCPE, DESIGN.md §7): a plan may also name, per *consumer* (a conv or
linear layer call with ``groups=1``), the input positions that consumer keeps — a subset of what
its input tensor keeps under the group plan. Coupled consumers may then keep different channels;
the tensor they share keeps the union (see :mod:`fxprune.unconstrained.masks`). Such plans are written
as version 2; plans without consumers are still written and read as version 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fxprune.core.errors import PlanError
from fxprune.core.io import write_text

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = ["Plan"]

_FORMAT = "fxprune.core.plan"
_VERSION = 1
_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Plan:
    """Kept channel indices per coupling group (absent = keep all) and removed block names.

    ``consumers`` (unconstrained plans) maps a consumer layer's node name to the positions of its
    input channel dim it keeps (absent = it reads everything its input tensor keeps).
    """

    kept: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    removed_blocks: tuple[str, ...] = ()
    signature: str = ""
    notes: Mapping[str, Any] = field(default_factory=dict)
    consumers: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("kept", "consumers"):
            value = getattr(self, name)
            object.__setattr__(
                self, name, {k: tuple(sorted(int(i) for i in v)) for k, v in sorted(value.items())}
            )
        object.__setattr__(self, "removed_blocks", tuple(sorted(self.removed_blocks)))

    @property
    def unconstrained(self) -> bool:
        """True when some consumer keeps its own input channels (a version-2 plan)."""
        return bool(self.consumers)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def empty(cls, analysis: Analysis) -> Plan:
        """The plan that prunes nothing."""
        return cls({}, (), analysis.signature)

    @classmethod
    def from_keep_masks(
        cls, analysis: Analysis, masks: Mapping[str, Iterable[bool]], removed: Iterable[str] = ()
    ) -> Plan:
        kept = {}
        for name, mask in masks.items():
            m = np.asarray(list(mask), dtype=bool)
            if not m.all():
                kept[name] = tuple(np.flatnonzero(m).tolist())
        return cls(kept, tuple(removed), analysis.signature)

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": _FORMAT,
            "version": 2 if self.consumers else _VERSION,
            "signature": self.signature,
            "groups": {k: list(v) for k, v in self.kept.items()},
            "removed_blocks": list(self.removed_blocks),
            "notes": dict(self.notes),
        }
        if self.consumers:
            out["consumers"] = {k: list(v) for k, v in self.consumers.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("format") != _FORMAT:
            raise PlanError("Not an fxprune plan (missing 'format': 'fxprune.core.plan').")
        if data.get("version") not in _VERSIONS:
            raise PlanError(
                f"Plan version {data.get('version')} is not supported by this fxprune "
                f"(reads versions {', '.join(map(str, _VERSIONS))}); upgrade fxprune or "
                "re-create the plan."
            )
        groups = _index_lists(data.get("groups", {}), "groups", "Group")
        consumers = _index_lists(data.get("consumers", {}), "consumers", "Consumer")
        return cls(
            {k: tuple(v) for k, v in groups.items()},
            tuple(data.get("removed_blocks", ())),
            str(data.get("signature", "")),
            dict(data.get("notes", {})),
            {k: tuple(v) for k, v in consumers.items()},
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"Plan file is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash never leaves a half-written plan behind."""
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        return cls.from_json(Path(path).read_text())

    # ---- checking ----------------------------------------------------------------------
    def validate(self, analysis: Analysis) -> None:
        """Raise :class:`PlanError` unless this plan can be applied to ``analysis``.

        The checks need the analysis's structure, so they live with it
        (:func:`fxprune.analysis.validate.validate_plan`).
        """
        analysis.validate_plan(self)


def _index_lists(value: Any, key: str, what: str) -> dict[str, list[int]]:
    """Check a JSON section mapping names to lists of distinct integer indices."""
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
        raise PlanError(f"Plan '{key}' must map names to lists of kept indices.")
    for name, idx in value.items():
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise PlanError(f"{what} '{name}': kept indices must be integers, got {idx[:5]}...")
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})[:5]
            raise PlanError(f"{what} '{name}': duplicate kept indices {dup}.")
    return value
