"""Pruned models export to ONNX (checked against ONNX Runtime), run under torch.export, and
can be rebuilt from a plan file plus a state dict; the CLI writes a complete result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from helpers import make_sensitive
from torch import nn

import fxprune
from fxprune.analysis.plans import random_plan
from fxprune.backends import OnnxRuntimeBackend
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


@pytest.fixture(scope="module")
def resnet_batch4():
    torch.manual_seed(0)
    model = make_sensitive(torchvision.models.resnet18().eval(), torch.randn(4, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    a = fxprune.analyze(model, x)
    return x, a, fxprune.prune(a, random_plan(a, 3))


@pytest.mark.parametrize("which", ["traced", "pruned"])
def test_onnx_batch_axis_is_dynamic(resnet_batch4, which, tmp_path):
    """Exported at batch 4 (flatten → linear inside), the file runs at batch 1 and 3."""
    x, a, pruned = resnet_batch4
    module = a.gm if which == "traced" else pruned
    path = fxprune.export_onnx(module, tmp_path / "m.onnx", x)
    backend = OnnxRuntimeBackend(provider="cpu")
    data = path.read_bytes()
    sess = backend.session(data)
    assert sess.get_inputs()[0].shape == ["batch", 3, 32, 32]
    assert sess.get_outputs()[0].shape == ["batch", 1000]
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 32, 32)
        (got,) = backend.run(data, (xb,))
        with torch.no_grad():
            want = module(xb).numpy()
        assert got.shape == want.shape == (batch, 1000)
        assert np.allclose(got, want, rtol=1e-3, atol=1e-4)


def test_onnx_static_batch_on_request(resnet_batch4, tmp_path):
    x, _a, pruned = resnet_batch4
    path = fxprune.export_onnx(pruned, tmp_path / "m.onnx", x, dynamic_batch=False)
    sess = OnnxRuntimeBackend(provider="cpu").session(path.read_bytes())
    assert sess.get_inputs()[0].shape == [4, 3, 32, 32]
    assert sess.get_outputs()[0].shape == [4, 1000]


class FixedBatch(nn.Module):
    """Reshapes to a constant batch size: cannot run at any other."""

    def forward(self, x):
        return x.reshape(4, -1) * 2


def test_onnx_fixed_batch_inside_the_graph_is_caught(tmp_path):
    x = torch.randn(4, 3)
    with pytest.raises(fxprune.FxpruneError, match="dynamic_batch=False"):
        fxprune.export_onnx(FixedBatch(), tmp_path / "m.onnx", x)
    assert not list(tmp_path.iterdir())
    fxprune.export_onnx(FixedBatch(), tmp_path / "m.onnx", x, dynamic_batch=False)
    assert (tmp_path / "m.onnx").exists()


class Outputs(nn.Module):
    """Nested dict / tuple / list outputs, one of them a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return {"map": y, "pair": (y.mean((2, 3)), [y.sum()])}


def test_onnx_nested_outputs_are_named_and_all_checked(tmp_path, monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    path = fxprune.export_onnx(Outputs().eval(), tmp_path / "m.onnx", x)
    sess = OnnxRuntimeBackend(provider="cpu").session(path.read_bytes())
    outputs = [(o.name, o.shape) for o in sess.get_outputs()]
    assert outputs == [("map", ["batch", 4, 6, 6]), ("pair.0", ["batch", 4]), ("pair.1.0", [])]
    # the check compares every output: a wrong scalar (the last one) is caught
    run = OnnxRuntimeBackend.run

    def off_by_one(self, data, inputs):
        got = run(self, data, inputs)
        return [*got[:-1], got[-1] + 1]

    monkeypatch.setattr(OnnxRuntimeBackend, "run", off_by_one)
    with pytest.raises(fxprune.FxpruneError, match=r"'pair\.1\.0' differs"):
        fxprune.export_onnx(Outputs().eval(), tmp_path / "n.onnx", x)
    assert not (tmp_path / "n.onnx").exists()


class Attention(nn.Module):
    """A transformer block's attention and head, for the dynamo exporter."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.fc((x + y).mean(1))


def _ort_matches_torch_at(path, module, batches, shape) -> None:
    backend = OnnxRuntimeBackend(provider="cpu")
    data = path.read_bytes()
    for batch in batches:
        xb = torch.randn(batch, *shape)
        (got,) = backend.run(data, (xb,))
        with torch.no_grad():
            want = module(xb).numpy()
        assert got.shape == want.shape
        assert np.allclose(got, want, rtol=1e-3, atol=1e-4)


def test_exported_program_goes_to_the_dynamo_exporter(tmp_path, caplog):
    """The TorchScript exporter cannot take ``ExportedProgram.module()``; the dynamo exporter
    writes it, and ORT matches torch at two batch sizes."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    program = torch.export.export(
        Attention().eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    module = program.module()
    with caplog.at_level("INFO", logger="fxprune"):
        path = fxprune.export_onnx(module, tmp_path / "m.onnx", x)
    assert "trying the dynamo exporter" in caplog.text
    assert OnnxRuntimeBackend(provider="cpu").session(path.read_bytes()).get_inputs()[0].shape[0]
    _ort_matches_torch_at(path, module, (1, 3), (5, 32))


def test_the_dynamo_exporter_stands_in_where_torchscript_fails(tmp_path, monkeypatch):
    from fxprune.backends import onnxruntime

    def fails(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnxruntime, "_export_torchscript", fails)
    torch.manual_seed(0)
    model = make_sensitive(torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32))
    path = fxprune.export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    sess = OnnxRuntimeBackend(provider="cpu").session(path.read_bytes())
    assert sess.get_inputs()[0].shape[1:] == [3, 32, 32]
    _ort_matches_torch_at(path, model, (1, 3), (3, 32, 32))
