"""The reorder pass: which groups may be permuted, and the layout the rewrite follows."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.unconstrained.layout import Layout, reorder_blockers


class Sliced(nn.Module):
    """Group of ``a`` is cut positionally (a channel slice); group of ``b`` is only added."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(4, 8, 1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(self.a(x)[:, 2:6])
        z = torch.relu(self.b(x)) + y
        return self.d(z).mean((2, 3))


def test_positional_ops_block_reordering():
    a = fxprune.analyze(Sliced(), torch.randn(1, 3, 4, 4))
    blocked = reorder_blockers(a)
    names = {a.groups[g].name: why for g, why in blocked.items()}
    assert "positional op" in names["a"] and "getitem" in names["a"]
    assert "b" not in names  # b and c joined by the add: elementwise only


@st.composite
def layouts(draw):
    """A tensor holding a cat of blocks: some groups reordered (random ranks), some not."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    n = sum(sizes)
    units = np.arange(n)
    gid = np.repeat(np.arange(len(sizes)), sizes)
    moved = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    keep = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    rank = np.full(n, -1)
    for g, size in enumerate(sizes):
        if moved[g]:
            rank[gid == g] = draw(st.permutations(range(size)))
    return Layout(keep, units, rank, gid), keep, gid, rank


@given(layouts())
def test_layout_permutes_within_blocks(case):
    layout, keep, gid, rank = case
    pos = layout.positions(np.arange(keep.size))
    assert sorted(pos.tolist()) == np.flatnonzero(keep).tolist()
    # each block keeps its place; inside a reordered block positions follow the ranks
    assert np.all(np.diff(gid[pos]) >= 0)
    for g in np.unique(gid):
        inside = pos[gid[pos] == g]
        key = rank[inside] if rank[inside].min(initial=0) >= 0 else inside
        assert np.all(np.diff(key) > 0)


def _patterns(family: list[set[int]], channels: set[int]) -> int:
    """Distinct non-empty membership patterns of ``channels`` in the sets of ``family``."""
    return len({tuple(ch in f for f in family) for ch in channels} - {(False,) * len(family)})


def test_orders_reach_the_interval_bound_on_resnet18():
    """Three intervals on a line make at most 5 distinct non-empty membership patterns (6
    endpoints, 7 pieces, two of them outside every interval). So where every three consumer
    subsets of a group make more, at most two of them can be contiguous in any order: the
    rest must gather whatever the reordering does. The orders must reach that bound."""
    import itertools

    import torchvision

    from fxprune.unconstrained.layout import channel_layout

    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    a = fxprune.analyze(torchvision.models.resnet18(weights=None).eval(), x)
    plan = fxprune.unconstrained_plan(a, fxprune.magnitude_masks(a, 0.3))
    keep_unit = a.spaces.keep_units(plan.kept)
    layout = channel_layout(a, plan, keep_unit, a.consumers)
    table, unit_class = a.consumers, a.spaces.unit_class
    by_group: dict[str, list[set[int]]] = {}
    for name, idx in plan.consumers.items():
        classes = unit_class[table[name].units]
        for g in a.groups:
            if set(classes.tolist()) <= set(g.classes.tolist()):
                by_group.setdefault(g.name, []).append(set(classes[list(idx)].tolist()))
    bounded = 0
    for order in layout.orders:
        g = next(g for g in a.groups if g.name == order.group)
        kept = set(g.classes[keep_unit[g.classes]].tolist())
        family = [f for f in by_group[order.group] if f != kept]
        partial = len(family) >= 3 and all(
            _patterns(list(t), kept) > 5 for t in itertools.combinations(family, 3)
        )
        if partial:
            bounded += 1
            whole = order.sets - len(family)  # sets that read the whole group
            assert order.contiguous == whole + 2, order
    assert bounded >= 3  # the residual streams of layer1..layer3 at least
