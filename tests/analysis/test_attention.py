"""Attention (``unbind``, ``@`` / ``matmul``, ``F.scaled_dot_product_attention``, ``roll``,
``F.pad``, class tokens and position tables): what stays prunable, what freezes and why, and
that random plans equal the masking oracle under both front ends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attention_models import CASES, analysed
from helpers import check_plan, check_random_plans
from hypothesis import HealthCheck, settings

import fxprune

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _analysis(name: str, frontend: str = "fx"):
    return analysed(name, frontend)


def _prunable(a: fxprune.Analysis) -> set[str]:
    return {g.name for g in a.groups if g.prunable and not g.inexact and g.size > 1}


def _frozen_reasons(a: fxprune.Analysis) -> str:
    return " | ".join(r for g in a.groups for r in g.frozen)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_random_plans_equal_masking_and_run_at_planned_shapes(name, frontend):
    _, x, a = _analysis(name, frontend)

    check_random_plans(a, x, max_examples=12)


def test_fused_vit_every_layer_is_prunable():
    _, _, a = _analysis("fused_vit")
    # the residual stream (patch embedding, class token, position table, proj, fc2) is one
    # group of all its channels: the (1, N, C) table is paired with C, not its longer N
    stream = a.group("embed")
    assert stream.size == 16 and stream.prunable
    assert {"cls_token", "pos_embed", "proj", "fc2"} <= set(stream.roots)
    # q, k and v of every head keep the same head-dim positions: 8 per head, tied
    qkv = a.group("qkv")
    assert qkv.size == 8 and qkv.prunable and not qkv.frozen
    assert {"embed", "qkv", "fc1"} <= _prunable(a)


def test_pruned_attention_keeps_the_dense_scale():
    _, x, a = _analysis("fused_vit")
    plan = fxprune.Plan(kept={"qkv": np.array([0, 2, 5])})
    pruned = check_plan(a, plan, x)
    (sdpa,) = [n for n in pruned.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert sdpa.kwargs["scale"] == pytest.approx(1 / math.sqrt(8))  # not 1/sqrt(3)
    assert sdpa.kwargs["query"].meta["tensor_meta"].shape[-1] == 3


def test_explicit_attention_prunes_head_dims_and_freezes_the_bias_table():
    _, _, a = _analysis("explicit")
    # q and k are contracted: their head-dim channels are tied into one group
    (qk,) = [g for g in a.groups if {"q", "k"} <= set(g.roots)]
    assert qk.prunable and qk.size == 4
    assert a.group("v").prunable and a.group("v").size == 4
    # the relative-position bias is added to scores that carry no channels: never pruned
    assert not [g for g in a.groups if "bias" in g.roots and g.prunable]


def test_functional_parameters_pair_with_the_contracted_dim():
    _, _, a = _analysis("functional")
    # t @ W_out, W_out square: its dim 0 (not the later of two equal dims) pairs with t
    (stream,) = [g for g in a.groups if "w_out" in g.roots]
    assert stream.prunable and stream.size == 8 and "linear" in stream.roots
    assert not _frozen_reasons(a).count("contracted dim")


def test_shifted_windows_are_prunable():
    _, _, a = _analysis("shifted_windows")
    assert {"embed", "qkv"} <= _prunable(a)
    assert "roll" not in _frozen_reasons(a) and "pad" not in _frozen_reasons(a)


def test_attention_over_channels_freezes_and_names_the_product():
    _, _, a = _analysis("channel_attention")
    assert a.group("q").frozen and a.group("k").frozen
    assert "matmul" in _frozen_reasons(a) and "cannot follow" in _frozen_reasons(a)


def test_unbind_along_channels_freezes_and_names_unbind():
    _, _, a = _analysis("unbind_channels")
    assert a.group("fc").frozen
    assert "unbind" in _frozen_reasons(a) and "channel dim apart" in _frozen_reasons(a)


def test_a_contracted_dim_with_channels_on_one_side_only_freezes_it():
    class OneSided(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):  # x: (B, N, 4), the model input: no channels to drop with fc's
            return (self.fc(x) @ x.transpose(-2, -1)).sum(-1)

    x = torch.randn(2, 3, 4)
    a = fxprune.analyze(OneSided().eval(), x)
    assert a.group("fc").frozen
    assert "contracted dim" in _frozen_reasons(a)


def test_timm_vit_and_swin_are_prunable_and_exact():
    timm = pytest.importorskip("timm")
    from fxprune.pipeline.report import prunable_fraction

    for name, kw in (
        ("vit_tiny_patch16_224", {"depth": 2}),
        ("swin_tiny_patch4_window7_224", {"depths": (2, 2, 2, 2)}),
    ):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kw).eval()
        x = torch.randn(1, 3, 224, 224)
        a = fxprune.analyze(model, x)
        assert prunable_fraction(a)["prunable"] == 1.0, name
        assert not [g for g in a.groups if g.frozen and not g.name.startswith("head")], name
        plan = fxprune.analysis.plans.random_plan(a, seed=1)
        check_plan(a, plan, x)


def test_rotary_ties_the_positions_that_turn_together():
    _, x, a = _analysis("rotary")
    # the table is built in forward from an inverse-frequency buffer of D/2 entries (folded
    # with its reshape into one constant): cos and sin are elementwise, so its entries join
    # the head-dim group, and each index is the two positions that rotate into each other
    # (p and p + D/2) and their frequency
    qkv = a.group("qkv")
    assert qkv.prunable and not qkv.frozen and not qkv.inexact
    (table,) = [r for r in qkv.roots if r != "qkv"]
    assert qkv.size == 4 and tuple(a.gm.get_buffer(table).shape)[-1] == 4
    plan = fxprune.Plan(kept={"qkv": np.array([1, 3])})
    pruned = check_plan(a, plan, x)
    assert pruned.get_submodule("qkv").out_features == 3 * 2 * 4  # q, k, v × 2 heads × 4 kept
    assert tuple(pruned.get_buffer(table).shape)[-1] == 2


def test_interleaved_rotary_freezes_head_dims_and_names_the_strided_slice():
    # x[..., 1::2] takes every other channel: the rewrite cannot re-derive that slice
    _, _, a = _analysis("rotary_pairs")
    assert a.group("qkv").frozen
    assert "picks single channels" in _frozen_reasons(a)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", ["rotary", "rotary_pairs"])
def test_rotary_attention_prunes_whole_heads(name, frontend):
    # the split's head dim is followed through the rotation (slices of the tokens, chunk /
    # strided slices, cat / stack, a reshape of the last dim, the table broadcast over heads)
    _, x, a = analysed(name, frontend, attention="heads")
    qkv = a.group("qkv")
    assert qkv.prunable and not qkv.inexact and qkv.size == 2
    check_random_plans(a, x, max_examples=6)


def _shapes(a: fxprune.Analysis) -> dict[str, tuple[int, bool]]:
    return {g.name: (g.size, g.prunable) for g in a.groups}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize(("name", "split"), [("rotary_pairs", "qkv"), ("rotary_projections", "q")])
def test_auto_cuts_whole_heads_where_positions_freeze(name, split, frontend):
    # interleaved rotary: positions freeze ("picks single channels"), whole heads do not, so
    # "auto" ends as "heads" does on that split, and stays exact; with separate projections
    # and rotary on q and k only, v's split (whose positions alone would prune) is cut into
    # heads too, as attention ties its heads to q's
    _, x, auto = analysed(name, frontend, attention="auto")
    _, _, heads = analysed(name, frontend, attention="heads")
    qkv = auto.group(split)
    assert qkv.prunable and not qkv.inexact and qkv.size == 2
    assert _shapes(auto) == _shapes(heads)
    assert "picks single channels" not in _frozen_reasons(auto)
    check_random_plans(auto, x, max_examples=6)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"rotary_pairs", "rotary_projections"}))
def test_auto_keeps_positions_where_they_prune(name):
    # no split's positions freeze in these: "auto" is "head_dim", group for group
    _, x, auto = analysed(name, attention="auto")
    _, _, positions = analysed(name)
    assert _shapes(auto) == _shapes(positions)
    check_random_plans(auto, x, max_examples=4)
