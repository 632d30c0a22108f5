"""Canonicalise: functional calls on parameters become stock modules; the rest freezes, named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functional_models import FunctionalConcat, FunctionalResNet
from helpers import check_plan, check_planned_shapes, check_random_plans, make_sensitive
from metaformer_models import PoolFormerNet
from torch import nn

import fxprune
from fxprune.analysis.canonicalize import LIFTABLE, canonicalize
from fxprune.analysis.plans import random_plan
from fxprune.analysis.trace import trace
from fxprune.core.meta import MODULE_PATH, NOT_LIFTED
from fxprune.pipeline.report import prunable_fraction


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# ---- the three forms of each op -----------------------------------------------------------------
class OwnConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (timm's Conv2dSame style)."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)


class OwnBN(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: F.batch_norm on its own tensors, then an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(x)


class OwnLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class OwnLN(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class OwnGN(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ConvBNLinear(nn.Module):
    """conv → BN → conv → BN → pool → linear → LayerNorm → linear, in one of three forms."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        conv, bn, lin = {
            "module": (nn.Conv2d, nn.BatchNorm2d, nn.Linear),
            "subclass": (OwnConv, OwnBN, OwnLinear),
            "functional": (nn.Conv2d, nn.BatchNorm2d, nn.Linear),
        }[form]
        self.c1, self.b1 = conv(3, 8, 3, padding=1), bn(8)
        self.c2, self.b2 = conv(8, 12, 3, padding=1, groups=1), bn(12)
        self.fc1, self.ln, self.fc2 = lin(12, 10), nn.LayerNorm(10), lin(10, 4)

    def forward(self, x):
        if self.form != "functional":
            x = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return self.fc2(self.ln(self.fc1(x.mean((2, 3)))))
        for c, b in ((self.c1, self.b1), (self.c2, self.b2)):
            x = F.conv2d(x, c.weight, c.bias, padding=1)
            x = torch.batch_norm(  # ATen argument order, all positional
                x, b.weight, b.bias, b.running_mean, b.running_var, False, 0.1, 1e-5, True
            )
            x = torch.relu(x)
        x = F.linear(x.mean((2, 3)), self.fc1.weight, bias=self.fc1.bias)
        x = F.layer_norm(x, (10,), self.ln.weight, self.ln.bias)
        return F.linear(x, weight=self.fc2.weight, bias=self.fc2.bias)


@pytest.mark.parametrize("form", ["module", "subclass", "functional"])
def test_every_form_is_lifted_and_equal(form):
    model = _randomise_bn(ConvBNLinear(form).eval())
    x = torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    gm = trace(model, x)
    before = {id(t) for t in (*gm.parameters(), *gm.buffers())}
    gm = canonicalize(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LIFTABLE]
    assert calls == []
    kinds = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds.count(nn.Conv2d) == 2 and kinds.count(nn.BatchNorm2d) == 2
    assert kinds.count(nn.Linear) == 2 and kinds.count(nn.LayerNorm) == 1
    with torch.no_grad():
        assert torch.equal(gm(x), traced(x))
    # the very same tensors, not copies (a new BatchNorm brings its own num_batches_tracked)
    after = {id(t) for t in (*gm.parameters(), *gm.buffers()) if t.ndim > 0}
    assert after <= before
    assert all(n.op != "call_function" or n.target is not torch._assert for n in gm.graph.nodes)


@pytest.mark.parametrize("form", ["module", "subclass", "functional"])
def test_every_form_prunes_like_the_oracle(form):
    model = _randomise_bn(ConvBNLinear(form).eval())
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(model, x)
    assert sum(g.prunable for g in a.groups) == 3  # c1/b1, c2/b2, fc1/ln (inexact)
    for seed in range(4):
        check_plan(a, random_plan(a, seed), x)


def test_subclass_keeps_its_path_and_state_dict_keys():
    model = _randomise_bn(ConvBNLinear("subclass").eval())
    gm = canonicalize(trace(model, torch.randn(1, 3, 8, 8)))
    assert type(gm.get_submodule("b1")) is nn.BatchNorm2d
    assert isinstance(gm.get_submodule("b1.act"), nn.ReLU)  # stateless child moved along
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "b1")
    assert node.meta[MODULE_PATH] == "b1" and "tensor_meta" in node.meta
    assert set(gm.state_dict()) == set(model.state_dict())


class NormForms(nn.Module):
    """group norm, instance norm, affine-free batch norm, transposed conv, embedding."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = OwnGN(2, 8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.emb = nn.Embedding(5, 6)

    def forward(self, x, idx):
        x = self.gn(self.c(x))
        x = F.conv_transpose2d(x, self.up.weight, self.up.bias, stride=2)
        x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, None, None, False)
        x = F.instance_norm(x)
        return x.mean((2, 3)) + F.embedding(idx, self.emb.weight)


def test_norm_transpose_and_embedding_forms_are_lifted_and_equal():
    model = _randomise_bn(NormForms().eval())
    x, idx = torch.randn(2, 3, 6, 6), torch.tensor([1, 3])
    traced = trace(model, (x, idx))
    gm = canonicalize(trace(model, (x, idx)))
    kinds = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert {nn.GroupNorm, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Embedding} <= kinds
    assert nn.InstanceNorm2d in kinds
    assert not any(n.op == "call_function" and n.target in LIFTABLE for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(gm(x, idx), traced(x, idx))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_scale_only_group_norm_is_lifted_and_prunes(frontend):
    """timm's GroupNorm1NoBias (PoolFormer v2): ``F.group_norm(x, 1, weight, None)`` becomes an
    ``nn.GroupNorm`` without a bias; its channels are prunable, inexact (the group statistics
    change), and the exact groups around it equal the oracle."""
    torch.manual_seed(0)
    model, x = make_sensitive(PoolFormerNet().eval()), torch.randn(2, 3, 32, 32)
    a = fxprune.analyze(model, x, frontend=frontend)
    norms = {p: m for p, m in a.gm.named_modules() if isinstance(m, nn.GroupNorm)}
    assert sorted(norms) == sorted(
        p for p, m in model.named_modules() if isinstance(m, nn.GroupNorm)
    )
    assert all(type(m) is nn.GroupNorm and m.bias is None for m in norms.values())
    assert not any(n.op == "call_function" and n.target in LIFTABLE for n in a.gm.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(a.gm(x), model(x), atol=1e-6)
    stream = a.group("stem")
    assert stream.prunable and len(stream.inexact) == 5 and not stream.frozen
    assert prunable_fraction(a)["prunable"] == 1.0
    check_random_plans(a, x)  # the exact groups (the MLP hidden channels)
    plan = fxprune.uniform_plan(a, 0.5, include_inexact=True, multiple=1)
    kept = torch.as_tensor(plan.kept["stem"])
    pruned = fxprune.prune(a, plan)
    check_planned_shapes(a, plan, pruned)
    norm, dense = pruned.get_submodule("blocks.0.norm1"), model.blocks[0].norm1
    assert norm.num_channels == 4 and norm.bias is None and tuple(norm.weight.shape) == (4,)
    y = torch.randn(2, 8, 5, 5)[:, kept]
    with torch.no_grad():
        want = F.group_norm(y, 1, dense.weight[kept], None, dense.eps)
        assert torch.allclose(norm(y), want, atol=1e-6)
        assert pruned(x).shape == (2, 5)


class RMSNet(nn.Module):
    """linear → RMSNorm → GELU → linear → RMSNorm (without a weight) → linear, with the norms
    as ``nn.RMSNorm`` modules, ``F.rms_norm`` on their parameters, a subclass calling it, or
    timm's ``RmsNormFp32``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 4)
        if form == "timm":  # timm's float32 RMSNorm: its fx-wrapped rms_norm on weight.float()
            norm = pytest.importorskip("timm.layers.norm").RmsNormFp32
            self.n1, self.n2 = norm(12, eps=1e-5), norm(10, eps=1e-5, affine=False)
            return
        norm = OwnRMS if form == "subclass" else nn.RMSNorm
        self.n1 = norm(12, eps=1e-5)
        self.n2 = norm(10, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.form == "functional":
            x = F.gelu(F.rms_norm(x, (12,), self.n1.weight, 1e-5))
            return self.fc3(F.rms_norm(self.fc2(x), [10]))
        return self.fc3(self.n2(self.fc2(F.gelu(self.n1(x)))))


class OwnRMS(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("form", ["module", "functional", "subclass", "timm"])
def test_rms_norm_is_written_out_and_prunes_inexactly(form, frontend):
    """RMSNorm in every form (and ``aten.rms_norm`` under export) becomes
    ``x * rsqrt(mean(x², -1) + eps) * w``: the same function, channels prunable and *inexact*
    (the statistic changes), the weight pruned with them; a pruned model keeps only the kept
    channels' weight entries."""
    torch.manual_seed(0)
    model = RMSNet(form).eval()
    with torch.no_grad():
        model.n1.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 6)
    a = fxprune.analyze(model, x, frontend=frontend)
    targets = [n.target for n in a.gm.graph.nodes]
    assert F.rms_norm not in targets and torch.rms_norm not in targets
    assert "rms_norm" not in {getattr(t, "__name__", None) for t in targets}
    assert not any(isinstance(m, nn.RMSNorm) for p, m in a.gm.named_modules() if p in targets)
    with torch.no_grad():
        assert torch.allclose(a.gm(x), model(x), atol=1e-6)
    for name, size in (("fc1", 12), ("fc2", 10)):
        g = a.group(name)
        assert g.size == size and g.prunable and g.inexact and not g.frozen, g.frozen
    plan = fxprune.uniform_plan(a, 0.5, include_inexact=True, multiple=1)
    kept = torch.as_tensor(plan.kept["fc1"])
    pruned = fxprune.prune(a, plan)
    check_planned_shapes(a, plan, pruned)
    # the pruned model is RMSNorm over the kept channels, with their weights
    k1, k2 = kept, torch.as_tensor(plan.kept["fc2"])
    assert 0 < len(k1) < 12 and 0 < len(k2) < 10
    with torch.no_grad():
        h = F.gelu(F.rms_norm(model.fc1(x)[..., k1], (len(k1),), model.n1.weight[k1], 1e-5))
        h = F.linear(h, model.fc2.weight[k2][:, k1], model.fc2.bias[k2])
        h = F.rms_norm(h, (len(k2),), eps=model.n2.eps if form == "timm" else None)
        want = F.linear(h, model.fc3.weight[:, k2], model.fc3.bias)
        assert torch.allclose(pruned(x), want, atol=1e-5)


# ---- what must not be lifted --------------------------------------------------------------------
class CentredConv(nn.Conv2d):
    """A weight computed in the forward in a form no pass recognises (centred, not standardised
    by ``batch_norm`` as timm's StdConv2d, which is collapsed and lifted: test_std_conv)."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Computed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.centred = CentredConv(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(self.centred(torch.relu(self.c1(x))))


class Shared(nn.Module):
    """One weight applied by two functional calls."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = F.conv2d(torch.relu(F.conv2d(x, self.w)), self.w)
        return self.c3(x)


@pytest.mark.parametrize(
    ("cls", "why", "path"),
    [(Computed, "is computed", "centred"), (Shared, "used by more than one node", "")],
)
def test_unliftable_call_freezes_and_is_named(cls, why, path):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(model, x)
    convs = [n for n in a.gm.graph.nodes if n.op == "call_function" and n.target is F.conv2d]
    assert convs and all(why in n.meta[NOT_LIFTED] for n in convs)
    frozen = [r for g in a.groups for r in g.frozen if "conv2d at node" in r]
    assert frozen and all(why in r for r in frozen)
    if path:
        assert any(f"(in '{path}')" in r for r in frozen)
    with torch.no_grad():
        assert torch.equal(a.gm(x), trace(model, x)(x))
    check_plan(a, random_plan(a, 0), x)  # what is left prunable still prunes exactly


def test_parameter_also_read_elsewhere_is_not_lifted():
    class AlsoRead(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 1, 1))

        def forward(self, x):
            return F.conv2d(x, self.w) * self.w.sum()

    gm = canonicalize(trace(AlsoRead(), torch.randn(1, 3, 4, 4)))
    (conv,) = [n for n in gm.graph.nodes if n.target is F.conv2d]
    assert "more than one node" in conv.meta[NOT_LIFTED]


def test_size_asserts_stay():
    class SizeGuard(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            torch._assert(x.shape[2] == 6, "height must be 6")
            return self.c(x)

    gm = canonicalize(trace(SizeGuard(), torch.randn(1, 3, 6, 6)))
    assert any(n.target is torch._assert for n in gm.graph.nodes)


# ---- hand-written functional models and timm ---------------------------------------------------
@pytest.mark.parametrize("cls", [FunctionalResNet, FunctionalConcat])
def test_functional_models_are_prunable_and_exact(cls):
    model, x = cls().eval(), torch.randn(2, 3, 16, 16)
    a = fxprune.analyze(model, x)
    assert prunable_fraction(a)["prunable"] > 0.9
    with torch.no_grad():
        assert torch.equal(a.gm(x), model(x))
    for seed in range(3):
        check_plan(a, random_plan(a, seed), x)
    if cls is FunctionalResNet:
        assert len(a.blocks) == 2
        plan = fxprune.Plan({}, tuple(b.name for b in a.blocks), a.signature)
        check_plan(a, plan, x)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_timm_bn_act_models_are_prunable_and_exact(name):
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 96, 96)
    model = make_sensitive(timm.create_model(name, pretrained=False), x).eval()
    a = fxprune.analyze(model, x)
    assert prunable_fraction(a)["prunable"] >= 0.9
    assert not any(
        n.op == "call_function" and n.target in LIFTABLE for n in a.gm.graph.nodes
    )  # every BatchNormAct2d lifted
    with torch.no_grad():
        assert torch.equal(a.gm(x), model(x))
    for seed in range(2):
        check_plan(a, random_plan(a, seed), x)


class CatBias(nn.Module):
    """BEiT's qkv: ``F.linear`` on a Linear's weight with a bias built in the forward from a q
    and a v parameter around a zero k buffer."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 12, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.register_buffer("k_bias", torch.zeros(4), persistent=False)
        self.out = nn.Linear(4, 8)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        return self.out(torch.relu(q) * k + v)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_computed_linear_bias_is_split_off_and_its_parts_pruned(frontend):
    torch.manual_seed(0)
    model, x = CatBias().eval(), torch.randn(2, 5, 8)
    a = fxprune.analyze(model, x, frontend=frontend)
    assert not [n for n in a.gm.graph.nodes if n.target is F.linear]  # the weight is lifted
    assert isinstance(a.gm.get_submodule("qkv"), nn.Linear) and a.gm.qkv.bias is None
    g = a.group("qkv")  # q, k, v rows tied (q * k + v) and tied to their bias rows
    assert g.size == 4 and g.prunable and not g.inexact and not g.frozen
    assert {"q_bias", "k_bias", "v_bias"} <= set(g.roots)
    plan = fxprune.Plan(kept={"qkv": torch.tensor([0, 3]).numpy()})
    pruned = check_plan(a, plan, x)
    assert pruned.q_bias.shape == pruned.v_bias.shape == pruned.k_bias.shape == (2,)
    assert torch.equal(pruned.q_bias, model.q_bias[[0, 3]])
    check_random_plans(a, x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_timm_beit_qkv_bias_is_prunable_and_exact(frontend):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"depth": 2, "img_size": 32, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2}
    model = make_sensitive(timm.create_model("beit_base_patch16_224", pretrained=False, **kw))
    with torch.no_grad():  # zero-initialised by timm: a row mix-up would not show
        for block in model.blocks:
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    a = fxprune.analyze(model.eval(), x, frontend=frontend)
    assert prunable_fraction(a)["prunable"] == 1.0
    for i in range(2):
        g = a.group(f"blocks.{i}.attn.qkv")  # head dim 16, q/k/v bias rows with it
        assert g.size == 16 and g.prunable and not g.inexact
        assert {f"blocks.{i}.attn.{p}_bias" for p in "qkv"} <= set(g.roots)
    assert not [g for g in a.groups if g.frozen and g.name != "head"]
    check_random_plans(a, x, max_examples=6)
    # whole heads: BEiT's relative position bias is a table gathered by index (no channels per
    # head), so the split keeps its head dim, as in Swin
    heads = fxprune.analyze(model, x, frontend=frontend, attention="heads")
    assert [(g.name, g.size) for g in heads.groups] == [(g.name, g.size) for g in a.groups]
