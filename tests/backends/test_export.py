"""Pruned models export to ONNX (checked against ONNX Runtime), run under torch.export, and
can be rebuilt from a plan file plus a state dict; the CLI writes a complete result."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from helpers import make_sensitive

import fxprune
from fxprune.analysis.plans import random_plan
from fxprune.cli import main


@pytest.fixture(scope="module")
def pruned_setup():
    model = make_sensitive(torchvision.models.mobilenet_v2().eval())
    x = torch.randn(1, 3, 64, 64)
    a = fxprune.analyze(model, x)
    plan = random_plan(a, 7)
    return model, x, a, plan, fxprune.prune(a, plan)


def test_onnx_export_matches_torch(pruned_setup, tmp_path):
    *_, x, _a, _plan, pruned = pruned_setup
    path = fxprune.export_onnx(pruned, tmp_path / "m.onnx", x)
    assert path.exists() and not list(tmp_path.glob(".*tmp"))


def test_torch_export_runs(pruned_setup):
    *_, x, _a, _plan, pruned = pruned_setup
    exported = torch.export.export(pruned, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), pruned(x), atol=1e-5)


def test_rebuild_from_plan_and_state_dict(pruned_setup, tmp_path):
    _model, x, _a, plan, pruned = pruned_setup
    plan.save(tmp_path / "plan.json")
    torch.save(pruned.state_dict(), tmp_path / "sd.pt")
    fresh = torchvision.models.mobilenet_v2().eval()  # same architecture, other weights
    again = fxprune.rebuild(fresh, x, tmp_path / "plan.json", tmp_path / "sd.pt")
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_cli_prune_writes_everything(tmp_path):
    out = tmp_path / "run"
    assert (
        main(["prune", "--model", "resnet18", "--size", "64", "--keep", "0.5", "--out", str(out)])
        == 0
    )
    for f in (
        "plan.json",
        "pruned_state_dict.pt",
        "pruned_model.pt",
        "pruned.onnx",
        "report.md",
        "report.json",
    ):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["params_after"] < 0.5 * s["params_before"] and s["macs_after"] < 0.5 * s["macs_before"]
    assert s["max_abs_diff_vs_masking_oracle"] < 1e-3
    assert "| layer1.0.conv1 |" in (out / "report.md").read_text()
