"""Tracing: clear errors for untraceable models, the leaf escape hatch, no mutation."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from helpers import check_plan
from torch import nn

import fxprune
from fxprune.analysis.plans import random_plan
from fxprune.analysis.trace import trace


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: fx cannot trace this
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


def test_untraceable_names_the_module_and_fix():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(Net(), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "'gate'" in msg and "DataDependent" in msg and "leaf_modules" in msg


def test_leaf_module_escape_hatch_freezes_its_channels():
    model = Net().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(model, x, leaf_modules=[DataDependent])
    assert not a.group("conv").prunable
    assert any("DataDependent" in r for r in a.group("conv").frozen)
    pruned = fxprune.prune(a, fxprune.Plan.empty(a))
    assert torch.equal(pruned(x), model(x))


def test_wrong_number_of_inputs():
    with pytest.raises(
        TypeError, match=r"2 example inputs .* at most 1 positional argument\(s\) \(x\)"
    ):
        fxprune.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 32, 32),) * 2)


def test_user_model_never_mutated():
    model = torchvision.models.mobilenet_v2().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    a = fxprune.analyze(model, x)
    fxprune.prune(a, random_plan(a, 0))
    fxprune.masked_forward(a, random_plan(a, 1), x)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("leaf_modules", [None, [DataDependent], ["gate"]])
def test_traced_module_pickles(leaf_modules):
    """A traced GraphModule (and so every rewrite of it) survives torch.save / torch.load:
    unpickling re-traces its code with the graph's tracer class, which must not need
    arguments (fxprune's own tracer is not recorded at all)."""
    model = Net().eval()
    if leaf_modules is None:  # traced all through
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(1))
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model, x, leaf_modules=leaf_modules)
    assert gm.graph._tracer_cls is None and gm._tracer_cls is None
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    assert [n.op for n in loaded.graph.nodes] == [n.op for n in gm.graph.nodes]


class Stem(nn.Module):
    """A conv stem inside a Sequential, then a functional head: two places for a bad input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.head = Head()

    def forward(self, x):
        return self.head(self.body(x))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 8 * 14 * 14))

    def forward(self, x):
        return nn.functional.linear(torch.flatten(x, 1), self.w)


def test_wrong_input_channels_says_the_real_cause_first(capsys):
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(Stem(), torch.randn(1, 4, 16, 16))
    msg = str(info.value)
    first = msg.splitlines()[0]
    assert first.startswith("RuntimeError: ")
    assert "expected input[1, 4, 16, 16] to have 3 channels" in first
    assert "module 'body.0' (Conv2d)" in msg and "node body_0" in msg
    assert "[1, 4, 16, 16]" in msg.split("example input", 1)[1]  # the shapes that were given
    for noise in ("ShapeProp", "tlparse", "meta=", "While executing", "Original traceback"):
        assert noise not in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    assert capsys.readouterr().err == ""  # no traceback printed on the way


def test_failing_function_names_the_module_it_is_in():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(Stem(), torch.randn(1, 3, 20, 20))  # the head's weight needs 16×16
    msg = str(info.value)
    assert msg.startswith("RuntimeError: ") and "mat1 and mat2 shapes cannot be multiplied" in msg
    assert "node linear" in msg and "module 'head' (Head)" in msg


def test_non_tensor_example_input_is_named():
    with pytest.raises(TypeError, match=r"example_inputs\[0\] is a list"):
        fxprune.analyze(Stem(), [[1, 3, 16, 16]])


class ShapeIf(nn.Module):
    def forward(self, x):
        if x.shape[1] == 3:
            return x * 2
        return x


class SizeIf(nn.Module):
    def forward(self, x):
        if x.size(-1) > 1:
            return x * 2
        return x


class DimIf(nn.Module):
    def forward(self, x):
        if x.dim() == 4:
            return x * 2
        return x


class ValueIf(nn.Module):
    def forward(self, x):
        if x.mean() > x.shape[0]:  # a value compared with a size is still a value
            return x * 2
        return x


def _gated(gate: nn.Module) -> nn.Module:
    net = Net()
    net.gate = gate
    return net


@pytest.mark.parametrize(
    ("gate", "source"),
    [
        (ShapeIf(), "if x.shape[1] == 3:"),
        (SizeIf(), "if x.size(-1) > 1:"),
        (DimIf(), "if x.dim() == 4:"),
    ],
)
def test_branch_on_a_shape_is_reported_as_such(gate, source):
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(_gated(gate), torch.randn(1, 3, 4, 4), frontend="fx")
    msg = str(info.value)
    assert msg.startswith(f"module 'gate' ({type(gate).__name__}) branches on a tensor's shape")
    assert source in msg and "test_trace.py:" in msg  # the user's own line
    assert "tensor values" not in msg and "torch.where" not in msg
    assert f"leaf_modules=[{type(gate).__name__}]" in msg and "leaf_modules=['gate']" in msg
    # the hint works
    a = fxprune.analyze(_gated(gate), torch.randn(1, 3, 4, 4), leaf_modules=["gate"])
    assert not a.group("conv").prunable
    # and torch.export specialises the branch to the example's shape: "auto" falls back to it
    a = fxprune.analyze(_gated(gate), torch.randn(1, 3, 4, 4))
    assert a.frontend == "export" and a.group("conv").prunable


@pytest.mark.parametrize("gate", [DataDependent(), ValueIf()])
def test_branch_on_values_is_reported_as_such(gate):
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(_gated(gate), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert msg.startswith(f"module 'gate' ({type(gate).__name__}) branches on tensor values")
    assert "shape" not in msg.split(".")[0]
    assert "torch.where" in msg and f"leaf_modules=[{type(gate).__name__}]" in msg
    # torch.export cannot follow it either, and the message says so after fx's diagnosis
    assert "torch.export could not capture Net either" in msg and "torch.cond" in msg


class TopShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] > 1:
            y = y.mean((2, 3), keepdim=True)
        return self.head(y)


@torch.fx.wrap
def _pool_if_wide(y: torch.Tensor) -> torch.Tensor:
    return y.mean((2, 3), keepdim=True) if y.shape[-1] > 1 else y


class TopShapeWrapped(TopShape):
    def forward(self, x):
        return self.head(_pool_if_wide(self.conv(x)))


def test_branch_in_the_top_level_forward_gets_a_hint_that_works():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(TopShape(), x, frontend="fx")
    msg = str(info.value)
    assert msg.startswith("the top-level forward of TopShape branches on a tensor's shape")
    assert "if y.shape[-1] > 1:" in msg
    assert "<top level>" not in msg and "leaf_modules=['" not in msg
    assert "torch.fx.wrap" in msg and "submodule" in msg
    # the hint works: the branch in a wrapped function is one opaque call, its channels frozen
    model = TopShapeWrapped().eval()
    a = fxprune.analyze(model, x)
    assert not a.group("conv").prunable
    torch.testing.assert_close(fxprune.prune(a, fxprune.Plan.empty(a))(x), model(x))


class Optional_(nn.Module):
    """A forward with optional arguments, as timm's ViT (``attn_mask=None, is_causal=False``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, mask=None, flip: bool = False, scale: float = 1.0):
        y = self.conv(x) * scale
        if mask is not None:
            y = y * mask
        if flip:
            y = -y
        return {"out": self.head(y), "aux": [y.mean()]}


@pytest.mark.parametrize(
    ("inputs", "placeholders", "call"),
    [
        (lambda x, m: x, ["x"], lambda mod, x, m: mod(x)),
        (lambda x, m: (x,), ["x"], lambda mod, x, m: mod(x)),
        (lambda x, m: (x, m), ["x", "mask"], lambda mod, x, m: mod(x, m)),
        (lambda x, m: {"mask": m, "x": x}, ["x", "mask"], lambda mod, x, m: mod(x, m)),
        (lambda x, m: {"x": x, "flip": True, "scale": 2.0}, ["x"],
         lambda mod, x, m: mod(x, flip=True, scale=2.0)),
    ],
)  # fmt: skip
def test_optional_arguments_are_inputs_only_when_given(inputs, placeholders, call):
    torch.manual_seed(0)
    model, x, m = Optional_().eval(), torch.randn(1, 3, 6, 6), torch.rand(1, 1, 6, 6)
    a = fxprune.analyze(model, inputs(x, m))
    assert [n.target for n in a.gm.graph.nodes if n.op == "placeholder"] == placeholders
    assert not [n for n in a.gm.graph.nodes if "assert" in str(n.target)]  # fx's guards gone
    assert a.group("conv").prunable
    want = call(model, x, m)
    got = a.gm(*a.example_inputs)
    assert torch.equal(got["out"], want["out"]) and torch.equal(got["aux"][0], want["aux"][0])
    pruned = check_plan(a, random_plan(a, 0), a.example_inputs, tol=1e-5)
    out = pruned(*a.example_inputs)
    assert set(out) == {"out", "aux"} and isinstance(out["aux"], list)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"y": torch.randn(1, 3, 6, 6)}, r"key 'y', which names no argument .*\(x, mask, flip"),
        ({"mask": torch.randn(1, 8, 6, 6)}, r"argument 'x' has no default and no example"),
        ((torch.randn(1, 3, 6, 6),) * 5, r"5 example inputs .* at most 4 positional"),
    ],
)
def test_inputs_that_do_not_bind_say_why(inputs, message):
    with pytest.raises(TypeError, match=message):
        fxprune.analyze(Optional_(), inputs)


def test_timm_vit_traces_with_its_defaults():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    a = fxprune.analyze(model, x)
    assert [n.target for n in a.gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert len(a.blocks) == 4 and sum(g.prunable for g in a.groups) >= 2  # attention, MLP ×2
    with torch.no_grad():
        assert torch.equal(a.gm(x), model(x))
    check_plan(a, random_plan(a, 0), x, tol=1e-4)


def test_segmentation_dict_output_prunes_and_exports(tmp_path):
    import onnx

    from fxprune.backends.export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    a = fxprune.analyze(model, {"input": x})
    pruned = check_plan(a, random_plan(a, 1), x, tol=1e-4)
    path = export_onnx(pruned, tmp_path / "seg.onnx", {"input": x})
    assert [o.name for o in onnx.load(path).graph.output] == ["out"]
