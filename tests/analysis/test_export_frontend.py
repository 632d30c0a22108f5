"""The torch.export front end: ATen graphs analysed like traced ones, exact, and re-exportable."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging

import pytest
import torch
import torchvision
from fake_backend import FakeBackend
from functional_models import FunctionalConcat, FunctionalResNet
from helpers import check_plan, make_sensitive, rel_err
from metaformer_models import PoolFormerNet
from torch import nn

import fxprune
from fxprune import CompileConfig
from fxprune.analysis.export_frontend import ATEN_TO_TORCH
from fxprune.analysis.plans import random_plan
from fxprune.core.meta import NOT_LIFTED
from fxprune.latency.tables import LatencyConfig
from fxprune.pipeline.report import prunable_fraction

X = torch.randn(1, 3, 64, 64)


def _timm_efficientnet() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("efficientnet_b0", pretrained=False)


class LayerScaleBlock(nn.Module):
    """ConvNeXt's residual form: ``x + gamma * block(x)``, gamma a parameter read mid-graph."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.Conv2d(c, 2 * c, 1),
            nn.GELU(), nn.Conv2d(2 * c, c, 1),
        )  # fmt: skip
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.block(x)


class LayerScaleNet(nn.Module):
    """Two stages of layer-scale blocks: export lists every parameter first, fx where it is
    read, and groups (so plan signatures) are ordered by where their roots appear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.stage1 = LayerScaleBlock(16)
        self.down = nn.Conv2d(16, 24, 2, stride=2)
        self.stage2 = LayerScaleBlock(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = {
    "resnet18": torchvision.models.resnet18,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
    "timm_efficientnet_b0": _timm_efficientnet,
    "functional_resnet": FunctionalResNet,
    "functional_concat": FunctionalConcat,
    "layer_scale": LayerScaleNet,
    "poolformer": PoolFormerNet,  # StarReLU's pow, scale-only GroupNorm: ATen pow, group_norm
}


@functools.cache
def _analysed(name: str) -> tuple[nn.Module, fxprune.Analysis]:
    """The sensitive model and its fx analysis (shared by the tests: both take seconds)."""
    torch.manual_seed(0)
    model = make_sensitive(MODELS[name]().eval(), X).eval()
    return model, fxprune.analyze(model, X, frontend="fx")


def _same_structure(a: fxprune.Analysis, b: fxprune.Analysis) -> None:
    """Same groups (names, sizes, prunable), blocks and prunable weight fraction."""
    assert [(g.name, g.size, g.prunable) for g in a.groups] == [
        (g.name, g.size, g.prunable) for g in b.groups
    ]
    assert [bl.name for bl in a.blocks] == [bl.name for bl in b.blocks]
    assert a.signature == b.signature  # a plan made on one applies to the other
    assert prunable_fraction(a) == prunable_fraction(b)


def _reexports(pruned: nn.Module) -> None:
    """The pruned model exports again with torch.export and computes the same."""
    ep = torch.export.export(pruned, (X,))
    with torch.no_grad():
        assert rel_err(ep.module()(X), pruned(X)) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_export_front_end_matches_fx_and_the_oracle(name):
    model, fx_analysis = _analysed(name)
    a = fxprune.analyze(model, X, frontend="export")
    assert a.frontend == "export"
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in a.gm.graph.nodes)
    with torch.no_grad():
        assert rel_err(a.gm(X), model(X)) <= 1e-6
    assert fx_analysis.frontend == "fx"
    _same_structure(a, fx_analysis)
    assert prunable_fraction(a)["prunable"] >= 0.9
    _reexports(check_plan(a, random_plan(a, 0), X))


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "core_aten_dynamic"])
def test_exported_program_given_by_the_user(decompose, tmp_path):
    """An ExportedProgram analyses without example inputs, like the fx trace of the model; also
    one lowered to core ATen (convolution, inference batch norm, addmm, view) with a dynamic
    batch (sizes read with sym_size), whose pruned model then runs at any batch size."""
    model, fx_analysis = _analysed("resnet18")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = X
    if decompose:
        x = torch.randn(2, 3, 64, 64)
        batch = {0: torch.export.Dim("batch")}
        ep = torch.export.export(model, (x,), dynamic_shapes=(batch,)).run_decompositions()
    else:
        ep = torch.export.export(model, (x,))
    a = fxprune.analyze(ep)
    assert a.frontend == "export" and torch.equal(a.example_inputs[0], x)
    _same_structure(a, fx_analysis)
    pruned = check_plan(a, random_plan(a, 3), x)
    _reexports(pruned)
    pytest.importorskip("onnxruntime")
    assert fxprune.export_onnx(pruned, tmp_path / "pruned.onnx", x).exists()  # ORT-checked
    with torch.no_grad():  # the program and the model are untouched
        assert torch.equal(ep.module()(x), model(x))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class ShapeGated(nn.Module):
    """Python control flow on a shape and ``torch._check``: fx cannot trace them, export
    specialises them to the example."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[1] == 3)
        y = torch.relu(self.bn(self.conv(x)))
        if y.shape[-1] >= 32:
            y = nn.functional.max_pool2d(y, 2)
        y = nn.functional.adaptive_avg_pool2d(y + self.body(y), 1)
        return self.head(y.view(y.size(0), -1))  # export keeps the batch size symbolic


def test_auto_falls_back_to_export_when_fx_cannot_trace(caplog):
    model = make_sensitive(ShapeGated().eval(), X).eval()
    with pytest.raises(fxprune.TraceError):
        fxprune.analyze(model, X, frontend="fx")
    with caplog.at_level(logging.INFO, logger="fxprune"):
        a = fxprune.analyze(model, X)
    assert a.frontend == "export"
    assert "captured with the export front end" in caplog.text
    assert a.group("conv").prunable and len(a.blocks) == 1
    with torch.no_grad():
        assert rel_err(a.gm(X), model(X)) <= 1e-6
    for seed in range(3):
        check_plan(a, random_plan(a, seed, block_prob=0.5), X)
    # captured with a dynamic batch: the pruned model runs at any batch size
    check_plan(a, random_plan(a, 0), torch.randn(3, 3, 64, 64))


def test_auto_uses_fx_when_it_traces():
    assert fxprune.analyze(FunctionalResNet().eval(), X).frontend == "fx"


class Erf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erf(x)


class WithErf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = Erf()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)))


def test_unmapped_aten_op_freezes_and_is_named_with_its_module():
    assert torch.ops.aten.erf not in ATEN_TO_TORCH
    model = WithErf().eval()
    a = fxprune.analyze(model, X, frontend="export")
    assert not a.group("conv").prunable
    (reason,) = [r for r in a.group("conv").frozen if "erf" in r]
    assert "unsupported op" in reason and "aten" in reason and "(in 'act')" in reason
    pruned = fxprune.prune(a, fxprune.Plan.empty(a))
    with torch.no_grad():
        assert torch.equal(pruned(X), model(X))


class Reductions(nn.Module):
    """Channel-wise sums and maxima, a stack, dtype changes: ATen spellings of ops that fx
    analyses (``sum.dim_IntList``, ``amax``, ``stack``, ``to.dtype``, ``type_as``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        scale = y.sum((2, 3), keepdim=True).sigmoid() * y.amax((2, 3), keepdim=True)
        z = torch.stack([y, y * 2.0], 0).sum(0).to(torch.float64).type_as(x)
        return self.head(z * scale)


def test_reductions_stacks_and_dtype_changes_prune_as_under_fx():
    torch.manual_seed(0)
    model = Reductions().eval()
    fx_analysis = fxprune.analyze(model, X, frontend="fx")
    a = fxprune.analyze(model, X, frontend="export")
    assert a.frontend == "export"
    assert a.group("conv").prunable, a.group("conv").frozen
    _same_structure(a, fx_analysis)
    for seed in range(3):
        check_plan(a, random_plan(a, seed), X)


class ViewWrite(nn.Module):
    """An in-place write through a view: it must reach the viewed tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y[:, :2].mul_(3.0)
        return self.head(torch.relu_(y))


class SliceAdd(nn.Module):
    """GhostNet's form: ``out = cat(...)[:, :c]; out += shortcut`` (a write to a view whose
    base nobody reads afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.short = nn.Conv2d(3, 12, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        out = torch.cat([y, self.b(y)], 1)[:, :12]
        out += self.short(x)
        return self.head(out)


class CloneWrite(ViewWrite):
    """A write through a view of a copy: the original must not see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = y.clone()
        z[:, :2].mul_(3.0)
        return self.head(y) + self.head(z)


def test_in_place_ops_keep_their_effect():
    for cls in (ViewWrite, CloneWrite):
        model = cls().eval()
        a = fxprune.analyze(model, X, frontend="export")
        with torch.no_grad():
            assert torch.equal(fxprune.prune(a, fxprune.Plan.empty(a))(X), model(X))
    model = ViewWrite().eval()
    a = fxprune.analyze(model, X, frontend="export")
    # the write through a view, whose base is read after it, stays an ATen op: frozen
    assert not a.group("conv").prunable
    model = SliceAdd().eval()
    a = fxprune.analyze(model, X, frontend="export")
    assert a.group("a").prunable  # the in-place add became torch.add (a, b, short coupled)
    for seed in range(3):
        check_plan(a, random_plan(a, seed), X)


def test_compile_config_frontend_is_used(tmp_path):
    model = make_sensitive(ShapeGated().eval(), X).eval()
    config = CompileConfig(
        cache=tmp_path / "cache",
        progress=False,
        latency=LatencyConfig(progress=False, unit_timing="wall"),
    )
    kwargs = {"backend": FakeBackend()}
    with pytest.raises(fxprune.TraceError):
        fxprune.compile(model, 0.6, example_inputs=X, config=CompileConfig(frontend="fx"), **kwargs)
    captured = fxprune.compile(model, 0.6, example_inputs=X, config=config, **kwargs)
    assert captured.plan.notes["frontend"] == "export"
    onnx = importlib.util.find_spec("onnxruntime") is not None
    captured.save(tmp_path / "run", onnx=onnx)  # ONNX at a dynamic batch, pickled model, report
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["frontend"] == "export"
    ep = torch.export.export(model, (X,))  # static batch: its reshape names batch 1
    result = fxprune.compile(ep, 0.6, config=config, **kwargs)  # its own example inputs
    assert result.plan.notes["frontend"] == "export"
    with torch.no_grad():
        want = fxprune.masked_forward(result.analysis, result.plan, X)
        assert rel_err(result.model(X), want) <= 1e-4
    _reexports(result.model)
    result.save(tmp_path / "run_ep", onnx=onnx, dynamic_batch=False)


class OptionalMask(nn.Module):
    """An optional argument with a default: both front ends leave it out of the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.head(y if mask is None else y * mask)


def test_optional_arguments_stay_with_fx_and_wrong_inputs_do_not_fall_back():
    a = fxprune.analyze(OptionalMask().eval(), X)  # fx binds the default: no fallback needed
    assert a.frontend == "fx" and a.group("conv").prunable
    e = fxprune.analyze(OptionalMask().eval(), X, frontend="export")
    assert e.signature == a.signature and len(e.example_inputs) == 1
    with pytest.raises(fxprune.ShapeError) as info:  # wrong inputs fail under any front end
        fxprune.analyze(WithErf().eval(), torch.randn(1, 4, 64, 64))
    assert "to have 3 channels" in str(info.value) and "torch.export" not in str(info.value)


class Upsample(nn.Module):
    """HRNet's fusion: nearest and bilinear upsampling (core ``upsample_*2d.vec`` ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.interpolate(self.a(x), scale_factor=2, mode="nearest")
        z = nn.functional.interpolate(self.b(x), size=(64, 64), mode="bilinear")
        return self.head(y + z + self.skip(x))


class Twice(nn.Module):
    """One module called twice: export records two calls sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) + self.conv(x.flip(-1)))


def test_upsampling_matches_fx_and_a_module_called_twice_freezes():
    model = Upsample().eval()
    a = fxprune.analyze(model, X, frontend="export")
    _same_structure(a, fxprune.analyze(model, X, frontend="fx"))
    assert a.group("a").prunable
    check_plan(a, random_plan(a, 0), X)
    # the one known difference from fx: fx keeps `self.conv` one module called twice, export
    # two F.conv2d calls on one weight, which one lifted module cannot hold for both: frozen
    model = Twice().eval()
    assert fxprune.analyze(model, X, frontend="fx").group("conv").prunable
    a = fxprune.analyze(model, X, frontend="export")
    assert [g.name for g in a.groups] == ["head"] and not a.group("head").prunable
    why = [n.meta.get(NOT_LIFTED, "") for n in a.gm.graph.nodes]
    assert sum("used by more than one node" in w for w in why) == 2  # the report says why
    with torch.no_grad():
        assert torch.equal(fxprune.prune(a, fxprune.Plan.empty(a))(X), model(X))


class Encoder(nn.Module):
    """``nn.MultiheadAttention`` self-attention; torch.export writes it out in ATen
    (``unflatten(-1, (3, E))`` of the packed projection, heads merged into the batch dim)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        y, _ = self.attn(t, t, t, need_weights=False)
        return self.fc(nn.functional.relu(t + y))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_prunes_as_under_fx(batch_first):
    from helpers import check_random_plans

    torch.manual_seed(0)
    # 2 heads of 8; sequence-first (5 tokens of a batch of 2) keeps batch * heads under 8
    x = torch.randn(2, 5, 4) if batch_first else torch.randn(5, 2, 4)
    model = make_sensitive(Encoder(batch_first).eval())
    a = fxprune.analyze(model, x, frontend="export")
    assert not [r for g in a.groups for r in g.frozen if r != "model output"]
    (qkv,) = [g for g in a.groups if g.name.startswith("attn.")]  # the lifted in_proj
    assert qkv.size == 8 and qkv.prunable and not qkv.inexact  # head dim, tied over q, k, v
    fx_analysis = fxprune.analyze(model, x, frontend="fx")
    assert [(g.size, g.prunable) for g in a.groups] == [
        (g.size, g.prunable) for g in fx_analysis.groups
    ]
    assert prunable_fraction(a) == prunable_fraction(fx_analysis)
    check_random_plans(a, x, max_examples=10)
