"""``Round`` and ``RoundExport``: typed rounds whose JSON records keep the saved keys."""

from __future__ import annotations

import json

import pytest

from fxprune.pipeline.report import rounds_markdown
from fxprune.pipeline.result import Round, RoundExport


def _round(export: RoundExport | None = None, **changes) -> Round:
    fields = dict(
        round=0,
        target_ms=9.8,
        predicted_ms=9.7,
        measured_ms=10.5,
        measured_stable=True,
        dense_ms=20.0,
        budget_ms=10.0,
        met=False,
        importance_kept=0.8,
        removed_blocks=1,
        solver="minlp",
        status="optimal",
        gap=0.0,
        solve_s=0.25,
        export=export,
    )
    return Round(**(fields | changes))


def test_round_record_has_the_saved_keys_and_values():
    record = _round().to_dict()
    assert list(record) == [
        "round",
        "target_ms",
        "predicted_ms",
        "measured_ms",
        "measured_stable",
        "dense_ms",
        "budget_ms",
        "measured_over_budget",
        "met",
        "importance_kept",
        "removed_blocks",
        "solver",
        "status",
        "gap",
        "solve_s",
    ]
    assert record["measured_over_budget"] == pytest.approx(1.05)
    assert record["removed_blocks"] == 1 and record["met"] is False
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize("runoff", [None, {"kept": "lean", "ratio": 0.99}])
def test_export_record_has_the_saved_keys(runoff):
    export = RoundExport("lean", 3, 5, {"lean": 0.97}, runoff, segments=2)
    record = _round(export).to_dict()
    assert list(record)[-1] == "export"
    want = ["kept", "gathers", "slices", "vs_exact"] + (["runoff"] if runoff else []) + ["segments"]
    assert list(record["export"]) == want
    assert record["export"]["gathers"] == 3 and record["export"]["slices"] == 5
    assert json.loads(json.dumps(record)) == record


def test_rounds_markdown_shows_exports_only_when_there_are_any():
    plain = rounds_markdown([_round().to_dict()])
    assert "| 0 | 9.800 | 9.700 | 10.500 | 20.000 | 10.000 | False |" in plain
    assert "export" not in plain
    mixed = [_round().to_dict(), _round(RoundExport("full", 0, 0), round=1).to_dict()]
    table = rounds_markdown(mixed)
    assert "export (gathers, slices)" in table
    assert "| False | — (0, 0) |" in table and "| False | full (0, 0) |" in table
