"""Whole-head pruning (``analyze(attention="heads")``): a multi-head split offers its heads as
a group's indices, random plans equal the masking oracle under both front ends, the pruned graph
runs with fewer heads of the same width, and it exports to ONNX."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from attention_models import CASES, analysed
from helpers import check_plan, check_random_plans, check_unconstrained, make_sensitive, rel_err

import fxprune
from fxprune.core.errors import ConfigError


def _analysis(name: str, frontend: str = "fx"):
    return analysed(name, frontend, attention="heads")


def _timm(name: str, fused: bool = True, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # two blocks at 64x64 (16 patches): every op of the 224x224 model, a fraction of its time
    model = timm.create_model(name, pretrained=False, depth=2, img_size=64, **kwargs).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused  # False: q @ k.T, softmax, @ v written out
    return make_sensitive(model), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_random_plans_equal_masking_and_run_at_planned_shapes(name, frontend):
    _, x, a = _analysis(name, frontend)

    check_random_plans(a, x, max_examples=12)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_fused_qkv_split_offers_its_heads(frontend):
    _, _, a = _analysis("fused_vit", frontend)
    assert a.attention == "heads"
    qkv = a.group("qkv")  # 2 heads of 8: each index is one head of q, k and v
    assert qkv.size == 2 and qkv.prunable and not qkv.inexact
    assert a.group("embed").size == 16 and a.group("fc1").size == 32  # the rest as before
    (rec,) = [r for r in a.spaces.layers if r.target == "qkv"]
    idx = [a.spaces.class_index[c][1] for c in a.spaces.unit_class[rec.out_units].tolist()]
    # output row s*16 + h*8 + d (s: q, k or v) belongs to head h
    assert idx == [h for _ in range(3) for h in (0, 1) for _ in range(8)]


def test_auto_is_the_default_and_prunes_positions_where_they_prune():
    cls, shape = CASES["fused_vit"]
    a = fxprune.analyze(cls().eval(), torch.randn(shape))
    assert a.attention == "auto" and a.group("qkv").size == 8  # positions, as head_dim


def test_an_unknown_attention_option_is_refused():
    cls, shape = CASES["fused_vit"]
    with pytest.raises(ConfigError, match="attention"):
        fxprune.analyze(cls().eval(), torch.randn(shape), attention="tokens")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pruned_heads_keep_their_width_and_the_dense_scale(frontend):
    _, x, a = _analysis("fused_vit", frontend)
    pruned = check_plan(a, fxprune.Plan(kept={"qkv": np.array([1])}), x)
    assert pruned.get_submodule("qkv").weight.shape == (3 * 8, 16)
    assert pruned.get_submodule("proj").weight.shape == (16, 8)
    (sdpa,) = [n for n in pruned.graph.nodes if n.target is F.scaled_dot_product_attention]
    query = sdpa.kwargs.get("query", sdpa.args[0] if sdpa.args else None)
    assert tuple(query.meta["tensor_meta"].shape) == (2, 1, 10, 8)  # one head, d = 8
    scale = sdpa.kwargs.get("scale")
    assert scale is None or scale == pytest.approx(1 / math.sqrt(8))
    # the split's head count is now a literal 1 (it was self.heads = 2)
    split = next(n for n in pruned.graph.nodes if len(getattr(_meta(n), "shape", ())) == 5)
    assert tuple(_meta(split).shape)[2:] == (3, 1, 8)
    sizes = split.args[1] if isinstance(split.args[1], (list, tuple)) else split.args[1:]
    assert sizes[3] == 1  # B, N + 1, 3, <heads>, <head dim>


def _meta(node):
    return node.meta.get("tensor_meta")


def test_explicit_attention_prunes_heads_with_their_bias_table():
    _, x, a = _analysis("explicit")
    # q, k, v of a head are one index, and the (H, N, N) relative-position bias follows them
    (heads,) = [g for g in a.groups if {"q", "k", "v"} <= set(g.roots)]
    assert heads.size == 3 and heads.prunable and not heads.inexact and "bias" in heads.roots
    pruned = check_plan(a, fxprune.Plan(kept={heads.name: np.array([0, 2])}), x)
    assert pruned.bias.shape == (2, 5, 5)
    for name in ("q", "k", "v"):
        assert pruned.get_submodule(name).weight.shape == (8, 12)
    assert pruned.get_submodule("proj").weight.shape == (12, 8)


def test_models_without_a_head_split_are_analysed_as_before():
    for name in ("functional", "shifted_windows", "channel_attention", "unbind_channels"):
        cls, shape = CASES[name]
        torch.manual_seed(0)
        x = torch.randn(shape)
        heads = fxprune.analyze(cls().eval(), x, attention="heads")
        head_dim = fxprune.analyze(cls().eval(), x, attention="head_dim")
        assert heads.signature == head_dim.signature, name
        assert [g.frozen for g in heads.groups] == [g.frozen for g in head_dim.groups], name


@pytest.mark.parametrize(
    ("name", "fused", "frontend", "qk_norm"),
    [
        ("deit_tiny_patch16_224", True, "fx", False),
        ("deit_tiny_patch16_224", True, "export", False),
        ("vit_tiny_patch16_224", True, "fx", False),
        ("vit_tiny_patch16_224", True, "export", False),
        # timm's written-out attention: under fx its mask helper maybe_add_mask (fx-wrapped, a
        # leaf call) is an op table entry (an add with an optional operand); export traces in
        ("deit_tiny_patch16_224", False, "fx", False),
        ("deit_tiny_patch16_224", False, "export", False),
        # LayerNorm over each head's d (exact for whole heads: each row normalised alone)
        ("vit_tiny_patch16_224", True, "fx", True),
        ("vit_tiny_patch16_224", True, "export", True),
    ],
)
def test_timm_vits_offer_heads_and_equal_masking(name, fused, frontend, qk_norm):
    model, x = _timm(name, fused, qk_norm=qk_norm)
    a = fxprune.analyze(model, x, frontend=frontend, attention="heads")
    for i in range(2):
        g = a.group(f"blocks.{i}.attn.qkv")
        assert g.size == 3 and g.prunable and not g.inexact  # tiny: 3 heads of 64
    assert not [g for g in a.groups if g.frozen and g.name != "head"]
    check_random_plans(a, x, max_examples=6)


def test_timm_pruned_heads_export_to_onnx_and_run_at_two_batch_sizes(tmp_path):
    model, x = _timm("deit_tiny_patch16_224")
    a = fxprune.analyze(model, x, attention="heads")
    plan = fxprune.Plan(
        kept={"blocks.0.attn.qkv": np.array([0, 2]), "blocks.1.attn.qkv": np.array([1])}
    )
    pruned = check_plan(a, plan, x)
    assert pruned.get_submodule("blocks.0.attn.qkv").weight.shape == (3 * 2 * 64, 192)
    assert pruned.get_submodule("blocks.1.attn.qkv").weight.shape == (3 * 64, 192)
    assert pruned.get_submodule("blocks.0.attn.proj").weight.shape == (192, 2 * 64)
    assert pruned.get_submodule("blocks.1.attn.proj").weight.shape == (192, 64)
    path = fxprune.export_onnx(pruned, tmp_path / "pruned.onnx", x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 64, 64)
        (got,) = session.run(None, {name: xb.numpy()})
        with torch.no_grad():
            want = fxprune.masked_forward(a, plan, xb)
        assert got.shape == (batch, 1000)
        assert rel_err(torch.from_numpy(got), want) <= 1e-3


class _MHA(torch.nn.Module):
    """torchvision's form: ``nn.MultiheadAttention`` (expanded into in_proj, unbind, SDPA)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 16)
        self.mha = torch.nn.MultiheadAttention(16, heads, batch_first=True)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fc(x)
        return self.head(t + self.mha(t, t, t, need_weights=False)[0])


@pytest.mark.parametrize(
    ("heads", "attention", "size"),
    [(2, "heads", 2), (2, "head_dim", 8), (8, "heads", 8), (8, "head_dim", 8)],
)
def test_expanded_multihead_attention_offers_heads(heads, attention, size):
    # 8 heads of 2: the longest dim of the split is the head dim, so "head_dim" keeps heads too
    # (SDPA used to freeze channels on its head dim)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    a = fxprune.analyze(make_sensitive(_MHA(heads).eval()), x, attention=attention)
    g = a.group("mha.in_proj")
    assert g.size == size and g.prunable and not g.inexact
    check_random_plans(a, x, max_examples=6)


class _WidthReadOffHeads(torch.nn.Module):
    """``C`` read off the projection that carries the heads: ``C // h`` is the head width in
    the dense model only, so the rewrite must write the width (and ``h``) as literals."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(4, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        B, N, C = q.shape
        q, k, v = (z.reshape(B, N, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return t + self.proj(a)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_sizes_read_off_the_heads_become_the_planned_literals(frontend):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    a = fxprune.analyze(
        make_sensitive(_WidthReadOffHeads().eval()), x, frontend=frontend, attention="heads"
    )
    (heads,) = [g for g in a.groups if "qkv" in g.roots]
    assert heads.size == 3 and heads.prunable and not heads.inexact
    check_random_plans(a, x, max_examples=8)
    pruned = check_plan(a, fxprune.Plan(kept={heads.name: np.array([2])}), x)
    assert pruned.get_submodule("proj").weight.shape == (12, 4)


def test_compile_prunes_heads_and_rebuild_reads_the_option(tmp_path):
    from fake_backend import FakeBackend

    from fxprune.latency.tables import LatencyConfig

    model, x = _timm("deit_tiny_patch16_224")
    x = x[:1]
    config = fxprune.CompileConfig(
        attention="heads",
        cache=tmp_path / "cache",
        progress=False,
        allow_block_removal=False,
        latency=LatencyConfig(progress=False, unit_timing="wall"),
    )
    result = fxprune.compile(model, 0.4, example_inputs=x, backend=FakeBackend(), config=config)
    assert result.budget_met and result.plan.notes["attention"] == "heads"
    heads = [len(result.plan.kept.get(f"blocks.{i}.attn.qkv", range(3))) for i in range(2)]
    assert min(heads) < 3  # whole heads went (0.4 needs them on the fake backend)
    for i, h in enumerate(heads):
        assert result.model.get_submodule(f"blocks.{i}.attn.qkv").weight.shape[0] == 3 * h * 64
    with torch.no_grad():
        want = fxprune.masked_forward(result.analysis, result.plan, x)
        assert rel_err(result.model(x), want) <= 1e-4
    out = result.save(tmp_path / "run")
    rebuilt = fxprune.rebuild(model, x, out / "plan.json", out / "pruned_state_dict.pt")
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), result.model(x), atol=1e-5)
    with pytest.raises(ConfigError, match="attention"):
        fxprune.CompileConfig(attention="tokens")


class _GatheredBias(torch.nn.Module):
    """Swin's and LeViT's form: a relative-position bias gathered from a table by an index
    buffer (advanced indexing: frozen, one unit) and added to the scores of every head."""

    def __init__(self, dim: int = 12, heads: int = 3, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(4, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.table = torch.nn.Parameter(torch.randn(2 * tokens - 1, heads))
        index = torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :] + tokens - 1
        self.register_buffer("index", index.reshape(-1))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        B, N, C = t.shape
        qkv = self.qkv(t).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.table[self.index].reshape(N, N, self.heads).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        return t + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_a_split_whose_heads_freeze_keeps_its_head_dim():
    # the bias has no channels to drop per head, so the heads freeze; the split then offers
    # its head-dim positions, as under "head_dim", instead of nothing
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    model = make_sensitive(_GatheredBias().eval())
    heads = fxprune.analyze(model, x, attention="heads")
    head_dim = fxprune.analyze(model, x, attention="head_dim")
    assert heads.signature == head_dim.signature
    (g,) = [g for g in heads.groups if "qkv" in g.roots]
    assert g.size == 4 and g.prunable and not g.inexact
    check_random_plans(heads, x, max_examples=6)


@pytest.mark.parametrize("name", ["fused_vit", "explicit"])
def test_unconstrained_plans_over_heads_equal_masking(name):
    _, x, a = _analysis(name)
    for seed in range(2):
        check_unconstrained(a, x, seed)
