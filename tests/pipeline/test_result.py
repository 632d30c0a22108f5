"""``Round`` and ``RoundExport``: typed rounds whose JSON records keep the saved keys."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import torch._inductor
from fake_backend import FakeBackend
from helpers import ROUND_KEYS, make_sensitive
from torch import nn

import fxprune
from fxprune import CompileConfig
from fxprune.latency.tables import LatencyConfig
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
    assert tuple(record) == ROUND_KEYS
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


# ---- CompileResult.exported_program: the PT2 deployment path ---------------------------------


class _Net(nn.Module):
    """A small CNN with a residual add: prunable inside, every output channel kept."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(48, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def pruned_result(tmp_path_factory):
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    model = make_sensitive(_Net(), x).eval()
    config = CompileConfig(
        cache=tmp_path_factory.mktemp("cache"),
        progress=False,
        latency=LatencyConfig(progress=False, unit_timing="wall"),
    )
    result = fxprune.compile(model, 0.5, example_inputs=x, backend=FakeBackend(), config=config)
    assert result.params[1] < result.params[0]  # something was pruned
    return result, x


def test_exported_program_round_trips_through_save_and_load(pruned_result, tmp_path):
    result, x = pruned_result
    program = result.exported_program()
    assert isinstance(program, torch.export.ExportedProgram)
    path = tmp_path / "pruned.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-5, atol=1e-6)
        x3 = torch.randn(3, *x.shape[1:])  # the batch axis is dynamic (traced at batch 2)
        torch.testing.assert_close(loaded(x3), result.model(x3), rtol=1e-5, atol=1e-6)
    widths = [
        v.shape[0] for k, v in program.state_dict.items() if k.endswith("weight") and v.ndim == 4
    ]
    assert widths == [m.out_channels for m in result.model.modules() if isinstance(m, nn.Conv2d)]


def test_exported_program_static_batch(pruned_result):
    result, x = pruned_result
    program = result.exported_program(dynamic_batch=False)
    with pytest.raises(Exception, match=r"(?i)shape|size|guard|expected"):
        program.module()(torch.randn(2, *x.shape[1:]))


def _toolchain() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(_toolchain() is None, reason="AOTInductor needs a C++ compiler (g++/c++)")
def test_exported_program_lowers_with_aot_inductor(pruned_result, tmp_path):
    result, x = pruned_result
    program = result.exported_program()
    path = tmp_path / "pruned_aoti.pt2"
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except (subprocess.CalledProcessError, OSError) as exc:  # the toolchain, not fxprune
        pytest.skip(f"C++ toolchain failed to build the AOTInductor package: {exc}")
    except Exception as exc:
        if type(exc).__name__ in ("CppCompileError", "InductorError") and "compile" in str(exc):
            pytest.skip(f"C++ toolchain failed to build the AOTInductor package: {exc}")
        raise
    runner = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        torch.testing.assert_close(runner(x), result.model(x), rtol=1e-4, atol=1e-5)
