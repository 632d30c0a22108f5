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
    err = capsys.readouterr().err.replace("\n", " ")
    assert "smallest latency" in err
    assert "drop --no-blocks" in err  # the CLI's own flag, not the Python keyword
    assert "allow_block_removal" not in err and "smaller counts" not in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_compile_infeasible_budget_with_blocks_on_suggests_nothing_that_is_on(
    fake, tmp_path, capsys
):
    assert main(_args(tmp_path / "run", "0.01x", tmp_path / "cache")) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "smallest latency" in err and "Raise the budget" in err
    assert "block" not in err.split("smallest latency", 1)[1] and "smaller counts" not in err


@pytest.mark.parametrize("budget", ["1.5", "0", "-1", "fast", "25"])
def test_bad_budget_is_a_usage_error(budget, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(_args(tmp_path / "run", budget, tmp_path / "cache"))
    assert info.value.code == 2  # argparse's convention; 1 means "budget missed" (--strict)
    err = capsys.readouterr().err
    assert "usage: fxprune compile" in err and "argument --budget" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-rounds", "0"],
        ["--time-limit", "-1"],
        ["--size", "0"],
        ["--batch", "0"],
        ["--backend", "nope"],
        ["--model", "no_such_model"],
    ],
)
def test_bad_compile_arguments_are_usage_errors(extra, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*_args(tmp_path / "run", "0.5", tmp_path / "cache"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert extra[0] in err and "Traceback" not in err


@pytest.mark.parametrize("extra", [["--keep", "1.5"], ["--keep", "0"], ["--multiple", "0"]])
def test_bad_prune_arguments_are_usage_errors(extra, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--model", "resnet18", "--size", "32", "--out", str(tmp_path), *extra])
    assert info.value.code == 2
    assert extra[0] in capsys.readouterr().err


def test_bad_plan_file_exits_2_with_the_message(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text("not JSON")
    args = ["prune", "--model", "resnet18", "--size", "32", "--out", str(tmp_path / "run")]
    assert main([*args, "--plan", str(plan), "--no-onnx"]) == 2  # a PlanError, not a traceback
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_budget_the_dense_model_meets_writes_it_unchanged(fake, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_args(out, "1000ms", tmp_path / "cache"), "--strict", "--no-onnx"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "the dense model already meets the budget" in err
    s = json.loads((out / "report.json").read_text())["summary"]
    assert s["dense_meets_budget"] and s["budget_met"] and s["rounds"] == 0
    assert s["params_after"] == s["params_before"] and s["speedup"] == 1.0


def test_checkpoint_that_does_not_load_exits_2(tmp_path, capsys):
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"not a state dict")
    args = ["analyze", "--model", "resnet18", "--size", "32", "--checkpoint", str(checkpoint)]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "argument --checkpoint" in err and "Traceback" not in err
