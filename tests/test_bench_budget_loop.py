"""bench.budget_loop's bookkeeping: which round a loop of ``k`` rounds returns."""

from __future__ import annotations

from bench.budget_loop import render, returned


def _round(i: int, measured: float, met: bool, kept: float) -> dict:
    return {
        "round": i,
        "predicted_ms": 0.5,
        "measured_ms": measured,
        "dense_ms": 1.0,
        "measured_over_budget": measured / 0.5,
        "met": met,
        "importance_kept": kept,
    }


ROUNDS = [
    _round(0, 0.77, False, 0.94),
    _round(1, 0.27, True, 0.73),
    _round(2, 0.52, False, 0.86),
    _round(3, 0.45, True, 0.85),
    _round(4, 0.50, True, 0.86),
]


def test_returned_is_the_most_important_met_round_among_the_first_k():
    assert returned(ROUNDS, 2)["round"] == 1
    assert returned(ROUNDS, 4)["round"] == 3
    assert returned(ROUNDS, 5)["round"] == 4


def test_returned_is_the_closest_round_when_none_met():
    assert returned(ROUNDS, 1)["round"] == 0
    missed = [_round(0, 0.6, False, 0.9), _round(1, 0.55, False, 0.8)]
    assert returned(missed, 2)["round"] == 1


def test_render_has_a_column_per_round_count():
    out = {"commit": "abc", "confirm": True, "max_rounds": 5}
    out["cases"] = [{"arch": "resnet18_q", "seed": 0, "budget": 0.5, "rounds": ROUNDS}]
    text = render(out)
    assert "returned after 2 | returned after 3 | returned after 4 | returned after 5 |" in text
    assert "0.50→0.77, 0.50→0.27*" in text
    assert "| 0.540× budget | 0.540× budget | 0.900× budget | 1.000× budget |" in text
