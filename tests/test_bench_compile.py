"""``bench/compile.py``'s file names (the bench itself times models and is never run here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench import compile as bench_compile
from bench._common import RESULTS


def test_timm_and_torchvision_widths_plots_do_not_collide():
    tv = bench_compile.widths_plot_path(bench_compile.case_label("efficientnet_b0", "torchvision"))
    timm = bench_compile.widths_plot_path(bench_compile.case_label("efficientnet_b0", "timm"))
    assert tv == RESULTS / "compile_efficientnet_b0.png"
    assert timm == RESULTS / "compile_timm_efficientnet_b0.png"
    # named as the plan files are: compile_plans/timm_<model>_<budget>_<solver>.json
    assert bench_compile.case_label("efficientnet_b0", "timm") == "timm_efficientnet_b0"


@pytest.mark.parametrize(("zoo", "plot"), [("timm", "compile_timm_m.png"), (None, "compile_m.png")])
def test_main_writes_the_plot_under_the_case_label(zoo, plot, monkeypatch, tmp_path):
    """``main`` with the timing stubbed out: the plot goes where ``case_label`` says."""
    import fxprune.pipeline.plots

    plots, cases = [], []
    ours = SimpleNamespace(importance_kept=1.0, analysis=None, plan=None)

    def run_case(label, *args):
        cases.append(label)
        return ours, {"measured_over_budget": 1.0}

    monkeypatch.setattr(bench_compile, "run_case", run_case)
    monkeypatch.setattr(bench_compile, "cpu_backend", lambda: "backend")
    monkeypatch.setattr(bench_compile, "commit", lambda: "abc")
    monkeypatch.setattr(bench_compile, "render", lambda out: "")
    monkeypatch.setattr(bench_compile, "write_results", lambda *a: None)
    monkeypatch.setattr(bench_compile, "timm_init", lambda name: None)
    monkeypatch.setattr(bench_compile, "random_init", lambda name: None)
    monkeypatch.setattr(
        fxprune.pipeline.plots, "plot_widths", lambda a, p, path: plots.append(path)
    )
    argv = ["--models", "m", "--budgets", "0.5", "--baselines", "--no-tp"]
    argv += ["--out", str(tmp_path / "out.json")]
    assert bench_compile.main([*argv, *(["--zoo", zoo] if zoo else [])]) == 0
    assert plots == [RESULTS / plot]
    assert cases == [plot.removeprefix("compile_").removesuffix(".png")]
