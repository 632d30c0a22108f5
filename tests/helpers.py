"""Shared test helpers: make random-init models sensitive to pruning mistakes, compare outputs."""

from __future__ import annotations

import torch
from torch import nn

import fxprune


def make_sensitive(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise BN statistics/affines and layer scales in place.

    Fresh torchvision models have BN at identity, ConvNeXt layer scales at 1e-6 and ViT heads at
    zero, which hides channel-mixing bugs; after this every channel carries a distinct, sizeable signal.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        for m in model.modules():
            # zero-initialised heads (torchvision ViT) would make every output equal
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not m.weight.any():
                m.weight.normal_(0.0, 0.02, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def check_plan(analysis: fxprune.Analysis, plan: fxprune.Plan, x: torch.Tensor, tol: float = 1e-4):
    """Pruned model equals the masking oracle; returns the pruned module."""
    pruned = fxprune.prune(analysis, plan)
    with torch.no_grad():
        got = pruned(x)
        want = fxprune.masked_forward(analysis, plan, x)
    assert got.shape == want.shape
    assert rel_err(got, want) <= tol, f"pruned != oracle: rel err {rel_err(got, want):.2e}"
    return pruned


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
