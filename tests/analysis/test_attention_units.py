"""SDPA calls as latency units (``Analysis.attention_layers``): which group each one's counts
follow under ``attention="head_dim"`` and ``attention="heads"``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_models import FusedViT
from torch import nn

import fxprune


def _vit(attention: str, dim: int = 64, heads: int = 4):
    torch.manual_seed(0)
    model = FusedViT(dim=dim, heads=heads, side=8).eval()
    return fxprune.analyze(model, torch.randn(1, 3, 8, 8), attention=attention)


def _groups(analysis, units):
    return [analysis.groups[g] for g in analysis.spaces.groups_of(units)]


@pytest.mark.parametrize(("attention", "size", "dim"), [("head_dim", 16, -1), ("heads", 4, -3)])
def test_one_unit_tied_to_the_group_that_sets_the_heads(attention, size, dim):
    analysis = _vit(attention)
    (rec,) = analysis.attention_layers
    assert rec.kind == "attention" and rec.node.startswith("scaled_dot_product_attention")
    assert rec.dim == dim and rec.mode == attention
    (g_in,) = _groups(analysis, rec.in_units)
    (g_out,) = _groups(analysis, rec.out_units)
    # timm's fused qkv: q, k and v are one group, per-head width D = 64 / 4, or the 4 heads
    assert g_in is g_out and g_in.size == size and g_in.prunable
    assert len(rec.in_units) == len(rec.out_units) == size
    assert rec.node not in {r.node for r in analysis.spaces.layers}  # not a weight layer


def test_kept_counts_follow_the_plan():
    analysis = _vit("heads")
    (rec,) = analysis.attention_layers
    (group,) = _groups(analysis, rec.in_units)
    plan = fxprune.Plan.empty(analysis)
    keep = analysis.spaces.keep_units({group.name: [0, 2]})
    assert analysis.attention_keep(keep) == {rec.node: (2, 2)}
    full = analysis.spaces.keep_units(dict(plan.kept))
    assert analysis.attention_keep(full) == {rec.node: (4, 4)}


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
        mask = torch.zeros(N, N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(a.transpose(1, 2).reshape(B, N, C))


def test_a_masked_call_is_no_unit():
    analysis = fxprune.analyze(Masked().eval(), torch.randn(1, 5, 16))
    assert analysis.attention_layers == []


@pytest.mark.parametrize(("attention", "size"), [("head_dim", 64), ("heads", 3)])
def test_timm_vit(attention, size):
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8
    ).eval()
    analysis = fxprune.analyze(model, torch.randn(1, 3, 32, 32), attention=attention)
    (rec,) = analysis.attention_layers
    (group,) = _groups(analysis, rec.in_units)
    assert group.size == size and group.prunable
    assert _groups(analysis, rec.out_units) == [group]
