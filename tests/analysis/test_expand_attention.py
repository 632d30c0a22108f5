"""``nn.MultiheadAttention`` self-attention expanded into in_proj + SDPA + out_proj
(``fxprune/analysis/expand_attention.py``): the same outputs, prunable channels equal to the
masking oracle, the user's model untouched, and the calls it cannot prove left frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_plan, check_random_plans, make_sensitive
from hypothesis import HealthCheck, settings
from torch import nn

import fxprune
from fxprune.analysis.expand_attention import SelfAttention

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Encoder(nn.Module):
    """A pre-norm-free encoder block around ``nn.MultiheadAttention`` (``x, _ = attn(x, x, x)``,
    as torchvision's ViT writes it), batch-first or sequence-first."""

    def __init__(self, batch_first: bool = True, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.embed = nn.Linear(4, 12)
        self.attn = nn.MultiheadAttention(12, 3, dropout=dropout, batch_first=batch_first)
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        y, _ = self.attn(t, t, x.repeat(1, 1, 3) if self.cross else t, need_weights=False)
        return self.fc(F.relu(t + y))


def _analysis(model: nn.Module, shape=(2, 5, 4)):
    torch.manual_seed(0)
    model = make_sensitive(model.eval())
    x = torch.randn(shape)
    return model, x, fxprune.analyze(model, x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_expanded_attention_computes_the_same_and_prunes_exactly(batch_first):
    model, x, a = _analysis(Encoder(batch_first=batch_first))
    assert isinstance(a.gm.get_submodule("attn"), SelfAttention)
    assert type(model.attn) is nn.MultiheadAttention  # the user's model is untouched
    torch.testing.assert_close(a.gm(x), model(x), rtol=1e-5, atol=1e-6)
    # the packed projection holds the packed weight, once
    assert torch.equal(a.gm.get_submodule("attn.in_proj").weight, model.attn.in_proj_weight)
    assert sum(p.numel() for p in a.gm.parameters()) == sum(p.numel() for p in model.parameters())
    qkv = a.group("attn.in_proj")
    assert qkv.prunable and qkv.size == 4  # head dim 12 / 3, tied across q, k, v and heads
    assert a.group("embed").prunable and a.group("embed").size == 12

    check_random_plans(a, x, max_examples=10)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [({"cross": True}, "not self-attention"), ({"dropout": 0.1}, "attention dropout")],
)
def test_calls_it_cannot_prove_stay_the_module_and_freeze(kwargs, why, caplog):
    with caplog.at_level("INFO", logger="fxprune.analysis.expand_attention"):
        _, _, a = _analysis(Encoder(**kwargs))
    assert isinstance(a.gm.get_submodule("attn"), nn.MultiheadAttention)
    assert why in caplog.text
    assert a.group("embed").frozen
    assert any("MultiheadAttention" in r for r in a.group("embed").frozen)


def test_torchvision_vit_is_prunable_and_exact():
    torchvision = pytest.importorskip("torchvision")
    from fxprune.pipeline.report import prunable_fraction

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    model = torchvision.models.vit_b_16().eval()
    model.encoder.layers = model.encoder.layers[:2]
    model = make_sensitive(model, x)
    a = fxprune.analyze(model, x)
    assert prunable_fraction(a)["prunable"] == 1.0
    plan = fxprune.analysis.plans.random_plan(a, seed=0)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" in plan.kept
    check_plan(a, plan, x)
