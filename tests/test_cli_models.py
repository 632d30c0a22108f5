"""``--model`` specs: every accepted form parses and loads, and every bad one says what failed.

Also ``--checkpoint`` (strict, naming the mismatching keys), ``--data`` and ``--loss``.
"""

from __future__ import annotations

import sys

import pytest
import torch
from model_files import tiny_sequential, write_exported, write_factory_file, write_package
from torch import nn

from fxprune.cli_models import (
    DEFAULT_INPUT_SHAPE,
    ModelSpec,
    SpecError,
    load_checkpoint,
    load_data,
    load_loss,
    load_model,
    parse_model_spec,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("torchvision:resnet50", ModelSpec("torchvision", "resnet50")),
        ("torchvision:ResNet18", ModelSpec("torchvision", "resnet18")),
        ("resnet50", ModelSpec("torchvision", "resnet50")),
        ("timm:efficientnet_b0", ModelSpec("timm", "efficientnet_b0")),
        ("timm:resnet50.a1_in1k", ModelSpec("timm", "resnet50.a1_in1k")),
        ("path/to/file.py:factory", ModelSpec("file", "path/to/file.py", "factory")),
        ("file.py:make", ModelSpec("file", "file.py", "make")),
        ("package.module:factory", ModelSpec("module", "package.module", "factory")),
        ("mod:build", ModelSpec("module", "mod", "build")),
        ("out/model.pt2", ModelSpec("exported", "out/model.pt2")),
    ],
)
def test_every_form_parses(text, expected):
    spec = parse_model_spec(text)
    assert (spec.kind, spec.target, spec.factory) == (
        expected.kind,
        expected.target,
        expected.factory,
    )
    assert spec.text == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("file.py", "name the factory"),
        ("file.py:", "not a function name"),
        ("a/b:factory", "neither a .py file nor a dotted module name"),
        ("pkg.mod:not-a-name", "not a function name"),
        ("torchvision:", "not a torchvision model name"),
        ("timm:bad name", "not a timm model name"),
        ("weights.pth", "not a model name"),
    ],
)
def test_bad_syntax_lists_the_forms(text, problem):
    with pytest.raises(SpecError) as info:
        parse_model_spec(text)
    message = str(info.value)
    assert problem in message
    for form in ("torchvision:resnet50", "timm:efficientnet_b0", "file.py:factory", ".pt2"):
        assert form in message


def test_names_are_safe_directory_names():
    assert parse_model_spec("timm:resnet50.a1_in1k").name == "resnet50.a1_in1k"
    assert parse_model_spec("path/to/net.py:build").name == "net-build"
    assert parse_model_spec("pkg.mod:build").name == "pkg.mod-build"
    assert parse_model_spec("runs/x.pt2").name == "x"


def test_torchvision_bare_and_prefixed_build_the_same_architecture():
    torch.manual_seed(0)
    a = load_model("resnet18")
    torch.manual_seed(0)
    b = load_model("torchvision:resnet18")
    assert a.input_shape == b.input_shape == DEFAULT_INPUT_SHAPE
    assert not a.model.training
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)


def test_unknown_torchvision_name_suggests_close_matches():
    with pytest.raises(SpecError) as info:
        load_model("resnt50")
    message = str(info.value)
    assert "unknown torchvision model 'resnt50'; close matches: resnet50" in message


def test_timm_model_takes_its_input_size_from_its_config():
    pytest.importorskip("timm")
    loaded = load_model("timm:test_efficientnet")
    assert loaded.input_shape == (1, 3, 160, 160)  # timm's pretrained_cfg, not 224
    assert isinstance(loaded.model, nn.Module) and not loaded.model.training


def test_unknown_timm_name_suggests_close_matches():
    pytest.importorskip("timm")
    with pytest.raises(SpecError) as info:
        load_model("timm:efficentnet_b0")
    message = str(info.value)
    assert "unknown timm model 'efficentnet_b0'; close matches: efficientnet_b0" in message


def test_timm_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(SpecError) as info:
        load_model("timm:efficientnet_b0")
    assert "pip install 'fxprune[timm]'" in str(info.value)


def test_file_factory_loads_a_functional_model(tmp_path, forget_modules):
    path = write_factory_file(tmp_path)
    loaded = load_model(f"{path}:factory")
    assert loaded.input_shape == DEFAULT_INPUT_SHAPE
    assert loaded.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert load_model(f"{path}:with_shape").input_shape == (2, 3, 40, 40)


@pytest.mark.parametrize(
    ("factory", "problem"),
    [
        ("factroy", "no factory 'factroy'"),
        ("WIDTH", "WIDTH is a int, not a function"),
        ("not_a_model", "must return an nn.Module"),
    ],
)
def test_file_factory_errors(tmp_path, forget_modules, factory, problem):
    path = write_factory_file(tmp_path)
    with pytest.raises(SpecError) as info:
        load_model(f"{path}:{factory}")
    assert problem in str(info.value)
    if factory == "factroy":
        assert "close matches: factory" in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SpecError) as info:
        load_model(f"{tmp_path / 'nope.py'}:factory")
    assert "no such file" in str(info.value) and "nope.py" in str(info.value)


def test_file_that_fails_to_import_says_why(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_module_here\n")
    with pytest.raises(SpecError) as info:
        load_model(f"{path}:factory")
    assert "importing" in str(info.value) and "no_such_module_here" in str(info.value)


def test_module_factory_imports_from_the_current_directory(tmp_path, monkeypatch, forget_modules):
    module = write_package(tmp_path, "tinypkg_cwd")
    monkeypatch.chdir(tmp_path)  # not on sys.path: found as `python -m` would find it
    loaded = load_model(f"{module}:factory")
    assert loaded.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_missing_module_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_model("no_such_pkg.models:factory")
    assert "no module named 'no_such_pkg'" in str(info.value)


def test_exported_program_loads_with_its_own_example_shape(tmp_path):
    path = write_exported(tmp_path, (2, 3, 32, 32))
    loaded = load_model(str(path))
    assert isinstance(loaded.model, torch.export.ExportedProgram)
    assert loaded.input_shape == (2, 3, 32, 32)


def test_exported_program_errors(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_model(str(tmp_path / "missing.pt2"))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a program")
    with pytest.raises(SpecError, match=r"not an ExportedProgram saved by torch\.export\.save"):
        load_model(str(bad))


# ---- --checkpoint ------------------------------------------------------------------------


def test_checkpoint_loads_strictly(tmp_path):
    source, target = tiny_sequential(), tiny_sequential()
    with torch.no_grad():
        source[0].weight.add_(1.0)
    path = tmp_path / "state.pt"
    torch.save({"state_dict": source.state_dict()}, path)  # the usual training-script wrapper
    load_checkpoint(target, path)
    assert torch.equal(target[0].weight, source[0].weight)


def test_checkpoint_mismatch_names_the_file_and_the_first_keys(tmp_path):
    state = tiny_sequential().state_dict()
    del state["0.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["8.weight"] = torch.zeros(3, 16)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(SpecError) as info:
        load_checkpoint(tiny_sequential(), path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys: 0.weight" in message and "unexpected keys: extra.weight" in message
    assert "mis-shaped: 8.weight (3, 16) vs the model's (10, 16)" in message


def test_checkpoint_from_ddp_hints_at_the_prefix(tmp_path):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in tiny_sequential().state_dict().items()}, path)
    with pytest.raises(SpecError, match=r"strip the 'module\.' prefix"):
        load_checkpoint(tiny_sequential(), path)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"junk")
    with pytest.raises(SpecError, match="is not a state dict"):
        load_checkpoint(tiny_sequential(), path)
    torch.save([1, 2], path)
    with pytest.raises(SpecError, match="a dict of tensors"):
        load_checkpoint(tiny_sequential(), path)


# ---- --data and --loss -------------------------------------------------------------------


def test_data_directory_is_read_in_name_order_on_every_pass(tmp_path):
    for i in (1, 0):
        torch.save((torch.full((2, 3, 8, 8), float(i)), torch.tensor([i, i])), tmp_path / f"{i}.pt")
    data = load_data(str(tmp_path))
    assert len(data) == 2
    for _ in range(2):  # compile reads it twice: importance, then BatchNorm statistics
        assert [int(target[0]) for _, target in data] == [0, 1]


def test_data_directory_errors(tmp_path):
    with pytest.raises(SpecError, match=r"no \.pt files"):
        load_data(str(tmp_path))
    torch.save(torch.zeros(2), tmp_path / "a.pt")
    with pytest.raises(SpecError, match=r"a\.pt must hold a pair \(inputs, target\)"):
        load_data(str(tmp_path))


def test_data_function_is_called_once_per_pass(tmp_path, forget_modules):
    path = write_factory_file(tmp_path)
    data = load_data(f"{path}:batches")
    first, second = list(data), list(data)
    assert len(first) == len(second) == 2
    assert torch.equal(first[0][0], second[0][0])


def test_data_errors(tmp_path, forget_modules):
    with pytest.raises(SpecError, match="neither a directory"):
        load_data(str(tmp_path / "nothing"))
    path = write_factory_file(tmp_path)
    with pytest.raises(SpecError, match="no function 'batchs'"):
        load_data(f"{path}:batchs")


def test_losses(tmp_path, forget_modules):
    out, target = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    assert load_loss("cross_entropy")(out, target) > 0
    assert load_loss("mse")(out, out) == 0
    path = write_factory_file(tmp_path)
    assert load_loss(f"{path}:l1")(out, target) > 0
    with pytest.raises(SpecError, match="none of cross_entropy, mse"):
        load_loss("hinge")
