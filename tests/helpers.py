"""Shared test helpers: make random-init models sensitive to pruning mistakes, compare outputs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fxprune
from fxprune.rewrite.shapes import check_planned_shapes, planned_counts  # noqa: F401


def make_sensitive(
    model: nn.Module, example: torch.Tensor | None = None, seed: int = 0
) -> nn.Module:
    """Make a random-init model's output depend on every channel, in place.

    Fresh torchvision models have BN at identity, ConvNeXt layer scales at 1e-6 and ViT heads at
    zero, and deep random nets often lose the input entirely (EfficientNet's output is then the
    same for any image), which would let a channel mix-up pass the oracle comparison. So:
    zero heads get small random weights, layer scales become O(1), BatchNorm statistics are
    re-estimated on random data of ``example``'s shape (keeping activations normalised all the
    way down), and BN affines are randomised.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not m.weight.any():
                m.weight.normal_(0.0, 0.02, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
        if example is not None and bns:
            was_training = model.training
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
            model.eval()  # only the BNs collect statistics; aux heads, dropout stay in eval
            for m in bns:
                m.train()
            for _ in range(2):
                model(torch.randn((4, *example.shape[1:]), generator=g))
            for m, mom in zip(bns, momenta, strict=True):
                m.momentum = mom
            model.train(was_training)
        for m in bns:
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if example is None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def analysed_toy(cls: type[nn.Module]) -> tuple[nn.Module, torch.Tensor, fxprune.Analysis]:
    """A small test model (seeded, ``bn`` given non-trivial running statistics), an 8×8 input
    and its analysis: BN that is not the identity makes channel mix-ups show in the output."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    model = cls().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 1.5)
    return model, x, fxprune.analyze(model, x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def check_plan(analysis: fxprune.Analysis, plan: fxprune.Plan, x: torch.Tensor, tol: float = 1e-4):
    """Pruned model runs, has the planned channel counts and equals the masking oracle; returns
    the pruned module."""
    pruned = fxprune.prune(analysis, plan)
    check_planned_shapes(analysis, plan, pruned)
    with torch.no_grad():
        got = pruned(x)
        want = fxprune.masked_forward(analysis, plan, x)
    assert got.shape == want.shape
    assert rel_err(got, want) <= tol, f"pruned != oracle: rel err {rel_err(got, want):.2e}"
    return pruned


def random_input_masks(analysis: fxprune.Analysis, seed: int, min_keep: float = 0.3) -> dict:
    """A random kept subset of inputs for every consumer that may keep its own."""
    rng = np.random.default_rng(seed)
    masks = {}
    for c in analysis.consumers.values():
        k = int(rng.integers(max(1, int(min_keep * c.n_in)), c.n_in + 1))
        m = np.zeros(c.n_in, dtype=bool)
        m[rng.choice(c.n_in, size=k, replace=False)] = True
        masks[c.node] = m
    return masks


def check_unconstrained(analysis: fxprune.Analysis, x: torch.Tensor, seed: int, tol: float = 1e-4):
    """Random unconstrained masks: the reordered export equals the oracle and needs no more
    gathers than the naive export (consumers whose kept positions are not one range); so do
    its reads padded to a channel block and its segmented form (:mod:`fxprune.rewrite.segment`)."""
    from fxprune.rewrite.prune import rewrite
    from fxprune.rewrite.segment import segment
    from fxprune.unconstrained.layout import Layout

    plan = fxprune.unconstrained_plan(analysis, random_input_masks(analysis, seed))
    with torch.no_grad():
        want = fxprune.masked_forward(analysis, plan, x)
    gm, info = rewrite(analysis, plan, reorder=True, reads="exact")
    check_planned_shapes(analysis, plan, gm)
    with torch.no_grad():
        got = gm(x)
    err = rel_err(got, want)
    assert err <= tol, f"pruned != oracle ({err:.2e})"
    assert set(info.reads) == set(plan.consumers)
    table = analysis.consumers
    naive = Layout(analysis.spaces.keep_units(plan.kept), analysis.spaces.unit_class)
    naive_gathers = 0
    for name, kept in plan.consumers.items():
        local = np.flatnonzero(np.isin(naive.positions(table[name].units), kept))
        naive_gathers += int(local[-1] - local[0] + 1 != local.size)
    assert info.counts()["gather"] <= naive_gathers
    # reads padded to a channel block with zero columns are equal too
    padded, pinfo = rewrite(analysis, plan, reorder=True, reads="exact", read_block=8)
    with torch.no_grad():
        err = rel_err(padded(x), want)
    assert err <= tol, f"padded reads != oracle ({err:.2e})"
    assert all(r.kind == "full" or r.length % 8 == 0 for r in pinfo.reads.values())
    # the same export with read tensors carried as segments (no channel cut left) is equal too
    segmented, seg = segment(gm, (x,), block=4)
    with torch.no_grad():
        err = rel_err(segmented(x), want)
    assert err <= tol, f"segmented != oracle ({err:.2e}, {seg.segments} segments)"
    return plan
