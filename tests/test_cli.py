"""``python -m fxprune compile``: the main job, on the deterministic FakeBackend."""

from __future__ import annotations

import json

import pytest
from fake_backend import FakeBackend

from fxprune import backends
from fxprune.cli import main


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(backends._BACKENDS, "fake", FakeBackend)


def _args(out, budget, cache):
    return [
        "compile",
        "--model",
        "resnet18",
        "--size",
        "64",
        "--budget",
        budget,
        "--backend",
        "fake",
        "--cache",
        str(cache),
        "--out",
        str(out),
    ]


def test_compile_writes_a_result_that_meets_the_budget(fake, tmp_path):
    out = tmp_path / "run"
    assert main(_args(out, "0.5", tmp_path / "cache")) == 0
    names = {p.name for p in out.iterdir()}
    assert {"plan.json", "pruned_state_dict.pt", "pruned.onnx", "report.md", "report.json"} <= names
    s = json.loads((out / "report.json").read_text())["summary"]
    assert s["budget_met"] and s["measured_ms"] <= 1.02 * s["budget_ms"]
    assert s["budget_ms"] == pytest.approx(0.5 * s["dense_ms"])
    assert s["params_after"] < s["params_before"]


def test_compile_infeasible_budget_exits_2(fake, tmp_path, capsys):
    assert main([*_args(tmp_path / "run", "0.01x", tmp_path / "cache"), "--no-blocks"]) == 2
    assert "smallest latency" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "run").exists()  # nothing half-written
