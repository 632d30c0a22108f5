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

    @property
    def attention(self) -> str:
        """What the plan's attention groups index (``analyze(attention=)``), as compile noted
        it; a plan without the note predates the option, when every split offered positions
        (``"head_dim"``), whatever the default is now."""
        return str(self.notes.get("attention", "head_dim"))

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
        """Raise :class:`PlanError` unless this plan can be applied to ``analysis``.

        The checks need the analysis's structure, so they live with it
        (:func:`fxprune.analysis.validate.validate_plan`).
        """
        analysis.validate_plan(self)


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
