"""The Plan: which channels each coupling group keeps and which blocks are removed.

A Plan is plain data. It names groups and blocks by stable names from the analysis, stores kept
indices sorted, serialises to JSON, and is checked against an :class:`~fxprune.analysis.Analysis`
before use. It carries the analysis signature so a plan made for another architecture is refused.

Unconstrained pruning (UCPE, DESIGN.md §7): a plan may also name, per *consumer* (a conv or
linear layer call with ``groups=1``), the input positions that consumer keeps — a subset of what
its input tensor keeps under the group plan. Coupled consumers may then keep different channels;
the tensor they share keeps the union (see :mod:`fxprune.unconstrained`). Such plans are written
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

from fxprune.errors import PlanError
from fxprune.io import write_text

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = ["Plan", "random_plan"]

_FORMAT = "fxprune.plan"
_VERSION = 1
_VERSIONS = (1, 2)
# Every top-level key a plan file may hold (what to_dict writes), and hints for likely mix-ups.
_KEYS = ("consumers", "format", "groups", "notes", "removed_blocks", "signature", "version")
_HINTS = {
    "kept": "The kept indices per group are written as 'groups' (Plan.kept in Python).",
    "blocks": "Removed blocks are written as 'removed_blocks'.",
}


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
    def from_dict(cls, data: Any) -> Plan:
        """The plan in ``data`` (a parsed plan file), checked field by field.

        The schema is strict: an unknown key or a value of the wrong type is a :class:`PlanError`
        naming the key (and the group and position of a bad index), because a misspelt section
        would otherwise load as a plan that silently prunes nothing.
        """
        if not isinstance(data, Mapping):
            raise PlanError(
                f"A plan must be a JSON object (the file Plan.save writes), got {_kind(data)}."
            )
        if data.get("format") != _FORMAT:
            raise PlanError("Not an fxprune plan (missing 'format': 'fxprune.plan').")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in _VERSIONS:
            raise PlanError(
                f"Plan version {version!r} is not supported by this fxprune "
                f"(reads versions {', '.join(map(str, _VERSIONS))}); upgrade fxprune or "
                "re-create the plan."
            )
        unknown = sorted(set(data) - set(_KEYS), key=str)
        if unknown:
            hint = "".join(f" {_HINTS[k]}" for k in unknown if k in _HINTS)
            raise PlanError(
                f"Plan has unknown key {', '.join(repr(k) for k in unknown)}; allowed keys are "
                f"{', '.join(repr(k) for k in _KEYS)}.{hint}"
            )
        if "consumers" in data and version < 2:
            raise PlanError(
                "A version 1 plan has no 'consumers' (per-consumer input channels came with "
                "version 2): set 'version': 2 or drop 'consumers'."
            )
        signature = data.get("signature", "")
        if not isinstance(signature, str):
            raise PlanError(f"Plan 'signature' must be a string, got {_kind(signature)}.")
        notes = data.get("notes", {})
        if not isinstance(notes, Mapping):
            raise PlanError(
                f"Plan 'notes' must be a JSON object (free-form facts about how the plan was "
                f"made), got {_kind(notes)}."
            )
        groups = _index_lists(data.get("groups", {}), "groups", "Group")
        consumers = _index_lists(data.get("consumers", {}), "consumers", "Consumer")
        return cls(
            {k: tuple(v) for k, v in groups.items()},
            _block_names(data.get("removed_blocks", [])),
            signature,
            dict(notes),
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
        """Read a plan file written by :meth:`save`; a bad file is a PlanError naming it."""
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(
                f"Plan file {os.fspath(path)} is not UTF-8 text ({exc.reason} at byte "
                f"{exc.start}); a plan is the JSON file Plan.save writes."
            ) from exc
        try:
            return cls.from_json(text)
        except PlanError as exc:
            raise PlanError(f"Plan file {os.fspath(path)}: {exc}") from exc.__cause__

    # ---- checking ----------------------------------------------------------------------
    def validate(self, analysis: Analysis) -> None:
        """Raise :class:`PlanError` unless this plan can be applied to ``analysis``."""
        if self.signature and self.signature != analysis.signature:
            raise PlanError(
                f"This plan was made for another architecture (plan signature {self.signature}, "
                f"model signature {analysis.signature}). Re-create it for this model with "
                "fxprune.analyze(model, ...)."
            )
        groups = {g.name: g for g in analysis.groups}
        blocks = {b.name: b for b in analysis.blocks}
        for name in self.removed_blocks:
            if name not in blocks:
                raise PlanError(
                    f"Removed block '{name}' is not a removable block of this model "
                    f"(known: {', '.join(list(blocks)[:8])}{'...' if len(blocks) > 8 else ''})."
                )
        internal = {g for b in self.removed_blocks for g in analysis.internal_groups(blocks[b])}
        for name, idx in self.kept.items():
            if name not in groups:
                raise PlanError(f"Unknown group '{name}' (not a coupling group of this model).")
            g = groups[name]
            if g.frozen and len(idx) != g.size:
                raise PlanError(f"Group '{name}' is frozen and cannot be pruned: {g.frozen[0]}")
            if idx and (idx[0] < 0 or idx[-1] >= g.size):
                raise PlanError(
                    f"Group '{name}' has {g.size} channels; kept index "
                    f"{idx[0] if idx[0] < 0 else idx[-1]} is out of range."
                )
            if len(set(idx)) != len(idx):
                raise PlanError(f"Group '{name}' lists a kept index twice.")
            if not idx and name not in internal:
                raise PlanError(
                    f"Group '{name}' keeps no channel but is not inside a removed block. Keep at "
                    "least one channel, or remove the block that contains it."
                )
            for parts in g.equal_count:
                mask = np.zeros(g.size, dtype=bool)
                mask[list(idx)] = True
                counts = {int(mask[p].sum()) for p in parts}
                if len(counts) > 1:
                    raise PlanError(
                        f"Group '{name}' feeds a grouped op that needs the same number of kept "
                        f"channels in each of its {len(parts)} groups; the plan keeps "
                        f"{sorted(counts)}."
                    )
        dead = {n for b in self.removed_blocks for n in blocks[b].region}
        keep_unit = analysis.spaces.keep_units(self.kept)
        counts = analysis.layer_keep(keep_unit)
        if self.consumers:
            from fxprune.unconstrained import check_consumers  # avoids an import cycle

            counts = check_consumers(analysis, self, keep_unit, counts)
        for node, (k_in, k_out) in counts.items():
            if node not in dead and (k_in == 0 or k_out == 0):
                raise PlanError(
                    f"Layer '{node}' would keep {k_in} input and {k_out} output channels; every "
                    "layer outside a removed block must keep at least one of each."
                )


def _kind(value: Any) -> str:
    """A value's JSON type and a short excerpt, for error messages."""
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "a number", float: "a number"})
    text = json.dumps(value, default=repr)
    excerpt = text if len(text) <= 40 else f"{text[:40]}..."
    return f"{names.get(type(value), type(value).__name__)} {excerpt}"


def _index_lists(value: Any, key: str, what: str) -> dict[str, list[int]]:
    """Check a JSON section mapping names to lists of distinct non-negative integer indices."""
    if not isinstance(value, Mapping):
        raise PlanError(
            f"Plan '{key}' must be a JSON object mapping names to lists of kept indices, got "
            f"{_kind(value)}."
        )
    for name, idx in value.items():
        if not isinstance(idx, list):
            raise PlanError(
                f"{what} '{name}' in '{key}' must be a list of kept indices, got {_kind(idx)}."
            )
        for pos, i in enumerate(idx):
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise PlanError(
                    f"{what} '{name}' in '{key}': kept indices must be non-negative integers; "
                    f"position {pos} holds {json.dumps(i, default=repr)}."
                )
        if len(set(idx)) != len(idx):
            dup = sorted({i for i in idx if idx.count(i) > 1})[:5]
            raise PlanError(f"{what} '{name}' in '{key}': duplicate kept indices {dup}.")
    return dict(value)


def _block_names(value: Any) -> tuple[str, ...]:
    """Check the 'removed_blocks' section: a list of distinct block names."""
    if not isinstance(value, list):
        raise PlanError(f"Plan 'removed_blocks' must be a list of block names, got {_kind(value)}.")
    for pos, name in enumerate(value):
        if not isinstance(name, str):
            raise PlanError(
                f"Plan 'removed_blocks'[{pos}] must be a block name (a string), got {_kind(name)}."
            )
    if len(set(value)) != len(value):
        twice = next(name for pos, name in enumerate(value) if name in value[:pos])
        raise PlanError(f"Plan 'removed_blocks' names '{twice}' twice.")
    return tuple(value)


def random_plan(
    analysis: Analysis,
    seed: int,
    *,
    exact_only: bool = True,
    block_prob: float = 0.3,
    min_keep: float = 0.1,
) -> Plan:
    """A random valid plan, for tests and benchmarks: random kept sets and removed blocks.

    Args:
        exact_only: prune only groups whose pruning equals masking (no LayerNorm etc.).
        block_prob: probability that each removable block is removed.
        min_keep: smallest fraction of a group kept.
    """
    rng = np.random.default_rng(seed)
    removed = tuple(b.name for b in analysis.blocks if rng.random() < block_prob)
    internal = {g for b in removed for g in analysis.internal_groups(analysis.block(b))}
    masks: dict[str, np.ndarray] = {}
    for g in analysis.groups:
        if g.frozen or (exact_only and g.inexact):
            continue
        mask = np.zeros(g.size, dtype=bool)
        if g.name in internal and rng.random() < 0.5:
            masks[g.name] = mask  # empty: allowed inside a removed block
            continue
        if g.equal_count:
            parts = g.equal_count[0]
            k = int(rng.integers(max(1, int(min_keep * len(parts[0]))), len(parts[0]) + 1))
            for p in parts:
                mask[rng.choice(np.unique(p), size=min(k, len(np.unique(p))), replace=False)] = True
            if len({int(mask[p].sum()) for p in parts}) > 1:
                mask[:] = True  # repeated indices made counts differ: keep the group whole
        else:
            k = int(rng.integers(max(1, int(np.ceil(min_keep * g.size))), g.size + 1))
            mask[rng.choice(g.size, size=k, replace=False)] = True
        masks[g.name] = mask
    plan = Plan.from_keep_masks(analysis, masks, removed)
    # A tensor whose channels all fell into pruned classes would leave a layer with no input or
    # output: give such groups their channels back (only ever adds indices).
    dead = {n for b in removed for n in analysis.block(b).region}
    for _ in range(len(analysis.groups) + 1):
        keep_unit = analysis.spaces.keep_units(plan.kept)
        empty = [
            rec
            for rec in analysis.spaces.layers
            if rec.node not in dead
            and (not keep_unit[rec.in_units].any() or not keep_unit[rec.out_units].any())
        ]
        if not empty:
            return plan
        for rec in empty:
            for units in (rec.in_units, rec.out_units):
                for gid in analysis.spaces.groups_of(units):
                    masks.pop(analysis.groups[gid].name, None)
        plan = Plan.from_keep_masks(analysis, masks, removed)
    return plan
