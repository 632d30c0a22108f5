"""Shared test helpers: make random-init models sensitive to pruning mistakes, compare outputs."""

from __future__ import annotations

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

import fxprune
from bench._common import make_sensitive  # noqa: F401  (one copy, shared with the benches)
from fxprune.rewrite.shapes import check_planned_shapes, planned_counts  # noqa: F401

#: the keys of a round in report.json, in order: saved reports keep them
ROUND_KEYS = (
    "round",
    "target_ms",
    "predicted_ms",
    "measured_ms",
    "measured_stable",
    "dense_ms",
    "budget_ms",
    "measured_over_budget",
    "met",
    "importance_kept",
    "removed_blocks",
    "solver",
    "status",
    "gap",
    "solve_s",
    "measurements",
)


def spawn_gloo(target, world: int = 2) -> list:
    """``target(rank, world)`` on ``world`` processes joined in a gloo group; their results.

    ``target`` must be a module-level function (the processes are spawned)."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        init, out = "file://" + os.path.join(d, "init"), os.path.join(d, "out")
        mp.spawn(_gloo_rank, args=(target, world, init, out), nprocs=world, join=True)
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def _gloo_rank(rank: int, target, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(target(rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


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


def check_plan(analysis: fxprune.Analysis, plan: fxprune.Plan, x, tol: float = 1e-4):
    """Pruned model runs on ``x`` (a tensor or a tuple of them), has the planned channel counts
    and equals the masking oracle on every output (tensors, or dicts / tuples / lists of them);
    returns the pruned module."""
    pruned = fxprune.prune(analysis, plan)
    check_planned_shapes(analysis, plan, pruned)
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        got = pruned(*inputs)
        want = fxprune.masked_forward(analysis, plan, *inputs)
    assert_outputs_close(got, want, tol, "pruned != oracle")
    return pruned


def check_random_plans(analysis: fxprune.Analysis, x, max_examples: int = 12) -> None:
    """Hypothesis over valid plans (``strategies.plans``): every one passes :func:`check_plan`
    and its pruned model trains (a backward pass through it works)."""
    from hypothesis import HealthCheck, given, settings
    from strategies import plans

    @settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(plan=plans(analysis))
    def run(plan):
        pruned = check_plan(analysis, plan, x)  # planned channel counts, runs, equals the oracle
        pruned(x).sum().backward()

    run()


def assert_outputs_close(got, want, tol: float, what: str) -> None:
    """Same output structure, and every tensor within ``tol`` relative error."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    assert got_spec == want_spec, f"{what}: output structure {got_spec} != {want_spec}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        assert g.shape == w.shape, f"{what}: output {i} shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert rel_err(g, w) <= tol, f"{what}: output {i} rel err {rel_err(g, w):.2e}"


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
