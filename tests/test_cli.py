"""``python -m fxprune compile``: the main job, on the deterministic FakeBackend."""

from __future__ import annotations

import json

import pytest
import torch
from fake_backend import FakeBackend
from model_files import write_exported, write_factory_file, write_package

import fxprune
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
        ["--input-shape", "1,3,x"],
        ["--input-shape", "1,0,32,32"],
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


# ---- --model forms, apply --plan, --checkpoint, --data ------------------------------------


def _compile(model, out, cache, *extra):
    """``compile`` of ``model`` on the fake backend at 0.6×, without the ONNX export unless
    ``extra`` leaves it out."""
    args = ["compile", "--model", model, "--budget", "0.6", "--backend", "fake"]
    return main([*args, "--cache", str(cache), "--out", str(out), *extra])


def _summary(out):
    return json.loads((out / "report.json").read_text())["summary"]


def test_compile_a_torchvision_model_by_prefixed_name(fake, tmp_path):
    out = tmp_path / "run"
    spec = "torchvision:squeezenet1_1"
    assert _compile(spec, out, tmp_path / "cache", "--size", "64", "--no-onnx") == 0
    s = _summary(out)
    assert s["budget_met"] and s["params_after"] < s["params_before"]


def test_compile_a_timm_model_at_its_config_input_size(fake, tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    assert _compile("timm:test_efficientnet", out, tmp_path / "cache", "--no-onnx") == 0
    assert "(1×3×160×160)" in " ".join(capsys.readouterr().err.split())  # pretrained_cfg's
    assert _summary(out)["params_after"] < _summary(out)["params_before"]


def test_compile_a_factory_in_a_file(fake, tmp_path, forget_modules):
    path = write_factory_file(tmp_path)
    out = tmp_path / "run"
    spec = f"{path}:factory"
    assert _compile(spec, out, tmp_path / "cache", "--input-shape", "1,3,32,32") == 0
    assert {"plan.json", "pruned_model.pt", "pruned.onnx", "report.md"} <= {
        p.name for p in out.iterdir()
    }
    s = _summary(out)
    assert s["budget_met"] and s["importance_method"] == "l2-magnitude"


def test_compile_a_factory_in_a_module(fake, tmp_path, monkeypatch, forget_modules):
    module = write_package(tmp_path, "tinypkg_cli")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert _compile(f"{module}:factory", out, tmp_path / "cache", "--size", "32", "--no-onnx") == 0
    assert _summary(out)["budget_met"]


def test_compile_an_exported_program(fake, tmp_path):
    path = write_exported(tmp_path, (1, 3, 32, 32))
    out = tmp_path / "run"
    assert _compile(str(path), out, tmp_path / "cache") == 0  # its own example shape
    s = _summary(out)
    assert s["budget_met"] and s["params_after"] < s["params_before"]
    assert (out / "pruned.onnx").is_file()


def test_default_output_directory_is_named_after_the_model(fake, tmp_path, monkeypatch):
    path = write_exported(tmp_path, (1, 3, 32, 32))
    monkeypatch.chdir(tmp_path)
    args = ["compile", "--model", str(path), "--budget", "0.6", "--backend", "fake", "--no-onnx"]
    assert main([*args, "--cache", str(tmp_path / "cache")]) == 0
    assert (tmp_path / "runs" / "tiny" / "plan.json").is_file()


def test_apply_plan_round_trip_gives_compiles_pruned_model(fake, tmp_path):
    pytest.importorskip("timm")
    spec = ["--model", "timm:test_efficientnet", "--size", "32"]  # random weights, seeded
    compiled, applied = tmp_path / "compiled", tmp_path / "applied"
    assert _compile(spec[1], compiled, tmp_path / "cache", *spec[2:], "--no-onnx") == 0
    plan = compiled / "plan.json"
    assert main(["apply", *spec, "--plan", str(plan), "--out", str(applied)]) == 0
    names = {p.name for p in compiled.iterdir()} | {"pruned.onnx"}
    assert names <= {p.name for p in applied.iterdir()}  # the files compile writes
    assert json.loads((applied / "plan.json").read_text()) == json.loads(plan.read_text())
    x = torch.randn(2, 3, 32, 32)
    a = torch.load(compiled / "pruned_model.pt", weights_only=False)
    b = torch.load(applied / "pruned_model.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    report = json.loads((applied / "report.json").read_text())
    assert report["summary"]["max_abs_diff_vs_masking_oracle"] < 1e-4


def test_apply_needs_a_plan(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["apply", "--model", "resnet18", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--plan" in capsys.readouterr().err


def test_apply_a_plan_for_another_model_exits_2(fake, tmp_path, capsys):
    path = write_exported(tmp_path, (1, 3, 32, 32))
    assert _compile(str(path), tmp_path / "run", tmp_path / "cache", "--no-onnx") == 0
    args = ["apply", "--model", "resnet18", "--size", "32", "--no-onnx"]
    plan = tmp_path / "run" / "plan.json"
    assert main([*args, "--plan", str(plan), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("resnt18", "close matches: resnet18"),
        ("missing.py:factory", "no such file"),
        ("weights.pth", "not a model name"),
    ],
)
def test_bad_model_spec_is_a_usage_error_listing_the_forms(
    spec, says, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # relative paths resolve here: missing.py does not exist
    with pytest.raises(SystemExit) as info:
        main(["analyze", "--model", spec, "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "usage: fxprune analyze" in err and "argument --model" in err and says in err
    assert "timm:efficientnet_b0" in err and "Traceback" not in err


def test_checkpoint_mismatch_names_the_file_and_keys(tmp_path, capsys, forget_modules):
    path = write_factory_file(tmp_path)
    checkpoint = tmp_path / "state.pt"
    torch.save({"w1": torch.zeros(16, 3, 3, 3), "conv.weight": torch.zeros(1)}, checkpoint)
    args = ["analyze", "--model", f"{path}:factory", "--size", "32"]
    assert main([*args, "--checkpoint", str(checkpoint)]) == 2
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines anywhere
    assert "argument--checkpoint:" in err and str(checkpoint).replace(" ", "") in err
    assert "missingkeys:g1,b1,w2(and" in err and "unexpectedkeys:conv.weight" in err
    assert "Traceback" not in err


def test_help_shows_an_example_per_model_form(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    out = capsys.readouterr().out
    for form in (
        "torchvision:resnet50",
        "--model resnet50",
        "timm:efficientnet_b0",
        "path/to/file.py:factory",
        "package.module:factory",
        "model.pt2",
    ):
        assert f"fxprune compile --model {form.removeprefix('--model ')}" in out


def test_data_directory_gives_taylor_importance(fake, tmp_path, forget_modules):
    path = write_factory_file(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        batch = (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
        torch.save(batch, data / f"batch{i}.pt")
    out = tmp_path / "run"
    extra = ["--size", "32", "--no-onnx", "--data", str(data)]
    assert _compile(f"{path}:factory", out, tmp_path / "cache", *extra) == 0
    s = _summary(out)
    assert s["importance_method"] == "taylor" and s["norms_recalibrated_on_batches"] == 2


def test_data_function_and_loss_function(fake, tmp_path, forget_modules):
    path = write_factory_file(tmp_path)
    out = tmp_path / "run"
    extra = ["--size", "32", "--no-onnx", "--data", f"{path}:batches", "--loss", f"{path}:l1"]
    assert _compile(f"{path}:factory", out, tmp_path / "cache", *extra) == 0
    assert _summary(out)["importance_method"] == "taylor"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--data", "no/such/dir"], "neither a directory"),
        (["--loss", "mse"], "--loss: needs --data"),
        (["--data", "x.py:batches"], "no such file"),
    ],
)
def test_bad_data_or_loss_exits_2(fake, tmp_path, capsys, extra, says, forget_modules):
    path = write_factory_file(tmp_path)
    assert _compile(f"{path}:factory", tmp_path / "run", tmp_path / "cache", *extra) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---- limits: --max-params, --max-macs, --max-activation-bytes, --also, --attention -------


def _config_of(monkeypatch, *extra):
    """The CompileConfig ``compile`` gets from these flags (``fxprune.compile`` stubbed out)."""
    import fxprune

    seen = {}

    class Stop(Exception):
        pass

    def stub(*args, config, **kwargs):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(fxprune, "compile", stub)
    argv = ["compile", "--model", "resnet18", "--size", "32", "--backend", "torch", *extra]
    with pytest.raises(Stop):
        main(argv)
    return seen["config"]


def test_limit_flags_reach_the_config(monkeypatch):
    config = _config_of(
        monkeypatch,
        *("--max-params", "1.5M", "--max-macs", "2_000_000"),
        *("--max-activation-bytes", "8MiB", "--attention", "heads"),
        *("--also", "inductor:0.6", "--also", "torch:25ms"),
    )
    assert config.max_params == 1_500_000 and config.max_macs == 2_000_000
    assert config.max_activation_bytes == 8 * 2**20 and config.attention == "heads"
    assert [(b, str(budget)) for b, budget in config.also] == [
        ("inductor", str(_parsed("0.6"))),
        ("torch", str(_parsed("25ms"))),
    ]
    plain = _config_of(monkeypatch)  # no flag: no limit, the library's defaults
    assert plain.limits() == {} and plain.also == () and plain.attention == "auto"
    assert plain.attention == fxprune.CompileConfig().attention
    # the CLI spells --max-rounds' default out to keep --help light: it is the library's
    assert plain.loop == fxprune.LoopConfig()


def _parsed(text):
    from fxprune.pipeline.result import Budget

    return Budget.parse(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("8MB", 8_000_000), ("8mb", 8_000_000), ("8MiB", 8 * 2**20), ("512k", 512_000), ("123", 123)],
)
def test_activation_bytes_take_human_sizes(monkeypatch, text, value):
    assert _config_of(monkeypatch, "--max-activation-bytes", text).max_activation_bytes == value


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-activation-bytes", "8XB"],
        ["--max-activation-bytes", "0"],
        ["--max-activation-bytes", "-5"],
        ["--max-params", "0.5"],
        ["--max-params", "5MB"],  # a count, not bytes
        ["--max-macs", "lots"],
        ["--also", "inductor"],
        ["--also", "nope:0.5"],
        ["--also", "torch:1.5"],
        ["--attention", "rows"],
    ],
)
def test_bad_limit_flags_are_usage_errors_naming_the_flag(fake, extra, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*_args(tmp_path / "run", "0.5", tmp_path / "cache"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {extra[0]}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_max_activation_bytes_holds_and_the_report_shows_it_measured(fake, tmp_path):
    import fxprune
    from fxprune.analysis.liveness import peak_activation_bytes

    torch.manual_seed(0)  # the CLI's --seed 0: the same random weights
    x = torch.randn(1, 3, 64, 64)
    dense = fxprune.analyze(__import__("torchvision").models.resnet18(), x).gm
    limit = int(0.6 * peak_activation_bytes(dense, (x,)))
    out = tmp_path / "run"
    extra = ["--no-onnx", "--max-activation-bytes", str(limit), "--max-params", "5M"]
    assert main([*_args(out, "0.8", tmp_path / "cache"), *extra]) == 0
    s = _summary(out)
    assert s["max_activation_bytes"] == limit and s["activation_bytes_limit_met"] is True
    pruned = torch.load(out / "pruned_model.pt", weights_only=False)
    assert s["activation_bytes_measured"] == peak_activation_bytes(pruned, (x,)) <= limit
    assert s["max_params"] == 5_000_000 and s["params_limit_met"] is True
    assert s["params_measured"] == s["params_after"] <= 5_000_000
    assert "activation_bytes_measured" in (out / "report.md").read_text()


class _Other(FakeBackend):
    """A second runtime whose costs differ from the first's (another channel alignment)."""

    def __init__(self) -> None:
        super().__init__(period=4, runtime="other")

    def layer_cost(self, m, out_shape):
        return super().layer_cost(m, out_shape) * (3.0 if out_shape[-1] >= 16 else 0.3)


def test_also_budget_holds_as_measured_on_the_second_backend(fake, monkeypatch, tmp_path):
    monkeypatch.setitem(backends._BACKENDS, "other", _Other)
    out = tmp_path / "run"
    extra = ["--no-onnx", "--also", "other:0.5"]
    assert main([*_args(out, "0.9", tmp_path / "cache"), *extra]) == 0
    s = _summary(out)
    assert s["latency@other_limit_met"] is True
    assert s["latency@other_measured"] <= s["max_latency@other"] * 1.02  # the loop's tolerance
    pruned = torch.load(out / "pruned_model.pt", weights_only=False)
    dense = _dense_resnet18()
    x = (torch.randn(1, 3, 64, 64),)
    ratio = _Other().cost(pruned, x) / _Other().cost(dense, x)
    assert ratio <= 0.5 * 1.02
    # the second budget bound: the first alone would be loosened to within LoopConfig.slack
    assert s["measured_ms"] < 0.95 * s["budget_ms"]


def _dense_resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def test_unreachable_limit_exits_2_naming_the_flag(fake, tmp_path, capsys):
    extra = ["--no-onnx", "--max-activation-bytes", "1000"]
    assert main([*_args(tmp_path / "run", "0.8", tmp_path / "cache"), *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "argument --max-activation-bytes" in err and "cannot be met" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_attention_choices_are_the_analysis_modes(capsys):
    # the CLI spells ATTENTION out to keep --help light; they must not drift apart
    from fxprune.analysis.channel_rules import ATTENTION

    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--attention {" + ",".join(ATTENTION) + "}" in help_text


def test_attention_heads_offers_whole_heads(fake, tmp_path, forget_modules):
    """--attention heads: the split's group indexes 4 heads (not 16 positions per head), and
    the projections keep whole heads (on the fake backend the solver keeps all 4 here)."""
    factory = tmp_path / "vit.py"
    factory.write_text(
        "from attention_models import FusedViT\n\n\n"
        "def factory():\n    return FusedViT(dim=64, heads=4, side=8).eval()\n"
    )
    out = tmp_path / "run"
    extra = ["--input-shape", "1,3,8,8", "--no-onnx", "--attention", "heads"]
    assert _compile(f"{factory}:factory", out, tmp_path / "cache", *extra) == 0
    plan = fxprune.Plan.load(out / "plan.json")
    assert plan.notes["attention"] == "heads"  # recorded for rebuild / apply
    groups = {g["name"]: g for g in json.loads((out / "report.json").read_text())["groups"]}
    assert groups["qkv"]["size"] == 4 and groups["qkv"]["status"] == "prunable"  # heads
    pruned = torch.load(out / "pruned_model.pt", weights_only=False)
    modules = dict(pruned.named_modules())
    kept = groups["qkv"]["kept"]
    assert modules["proj"].in_features == 16 * kept
    assert modules["qkv"].out_features == 3 * 16 * kept
