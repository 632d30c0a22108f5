"""Segmented tensors: the segmented export equals the oracle, and no op cuts a read tensor."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torchvision
from helpers import analysed_toy, make_sensitive, random_input_masks, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.rewrite.prune import channel_copies, rewrite
from fxprune.rewrite.segment import SegmentCost, _macs_per_channel, _merge, _RegionRead, segment


class Stream(nn.Module):
    """A residual stream read by three consumers, with SE-style scaling and a pooled head."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.a = nn.Conv2d(c, 8, 1)
        self.a2 = nn.Conv2d(8, c, 1)
        self.b = nn.Conv2d(c, 6, 3, padding=1)
        self.se1 = nn.Conv2d(c, 6, 1)
        self.se2 = nn.Conv2d(6, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.head = nn.Linear(c + 6, 5)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        r = s + self.a2(torch.relu(self.a(s)))
        pooled = nn.functional.adaptive_avg_pool2d(r, 1)
        r = self.dw(r * torch.sigmoid(self.se2(torch.relu(self.se1(pooled)))))
        y = torch.cat([r, self.b(s)], 1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def stream():
    return analysed_toy(Stream)


def channel_cuts(gm: torch.fx.GraphModule) -> int:
    return sum(channel_copies(gm))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), block=st.sampled_from([1, 2, 4, 8]))
def test_segmented_equals_the_oracle(stream, seed, block):
    _, x, a = stream
    plan = fxprune.unconstrained_plan(a, random_input_masks(a, seed))
    gm, _info = rewrite(a, plan, reads="exact")
    code = gm.code
    sg, si = segment(gm, (x,), block=block)
    assert gm.code == code  # the input module is left as it was
    with torch.no_grad():
        want = fxprune.masked_forward(a, plan, x)
        assert rel_err(sg(x), want) < 1e-5
    # every narrow read of a segmented region became a list of segments: no cut is left
    # but the reads of regions that were not segmented
    assert channel_cuts(sg) == channel_cuts(gm) - si.reads["narrow"] - si.reads["gather"]
    for r in si.regions:
        bounds = r["bounds"]
        assert bounds[0] == 0 and bounds[-1] == r["channels"]
        assert all(b % block == 0 for b in bounds[1:-1])
        assert list(bounds) == sorted(set(bounds))


def _modelled(edges, reads, fixed, cost):
    total = 0.0
    for a, b in itertools.pairwise(edges):
        touching = [r for r in reads if r.touches(a, b)]
        total += cost.launch_s * (fixed + sum(r.layers for r in touching))
        total += cost.mac_s * (b - a) * sum(r.macs_per_channel for r in touching)
    return total


@settings(max_examples=60, deadline=None)
@given(
    inner=st.lists(st.integers(1, 63), max_size=6, unique=True),
    spans=st.lists(
        st.tuples(st.integers(0, 63), st.integers(1, 32), st.integers(1, 3), st.integers(1, 500)),
        min_size=1,
        max_size=5,
    ),
    gathers=st.integers(0, 2),
    fixed=st.integers(1, 4),
    launch=st.sampled_from([0.0, 1.0, 50.0, 5000.0]),
)
def test_merge_is_the_cheapest_sub_cut(inner, spans, gathers, fixed, launch):
    edges = [0, *sorted(inner), 64]
    reads = [_RegionRead((a, min(a + n, 64)), k, w) for a, n, k, w in spans]
    reads += [_RegionRead(None, 1, 100)] * gathers
    cost = SegmentCost(launch_s=launch, mac_s=1.0)
    got = _merge(edges, reads, fixed, cost)
    assert got[0] == 0 and got[-1] == 64 and set(got) <= set(edges) and got == sorted(got)
    best = min(
        _modelled([0, *sub, 64], reads, fixed, cost)
        for r in range(len(inner) + 1)
        for sub in itertools.combinations(sorted(inner), r)
    )
    assert _modelled(got, reads, fixed, cost) == pytest.approx(best)
    if launch == 0.0:  # free segments: every cut saves multiply-adds or costs nothing
        assert _modelled(got, reads, fixed, cost) == pytest.approx(_modelled(edges, reads, 0, cost))


@pytest.mark.parametrize("launch", [0.0, 1e-4, 1.0])
def test_merged_segments_equal_the_oracle(stream, launch):
    _, x, a = stream
    plan = fxprune.unconstrained_plan(a, random_input_masks(a, 3))
    gm, _info = rewrite(a, plan, reads="exact")
    _, every = segment(gm, (x,))
    sg, si = segment(gm, (x,), cost=SegmentCost(launch_s=launch, mac_s=1e-9))
    assert [r["candidates"] for r in si.regions] == [len(r["bounds"]) - 1 for r in every.regions]
    pairs = zip(si.regions, every.regions, strict=True)
    assert all(set(m["bounds"]) <= set(e["bounds"]) for m, e in pairs)
    if launch == 0.0:
        assert si.regions == every.regions
    if launch == 1.0:  # a segment costs far more than any multiply-add: one per region
        assert all(len(r["bounds"]) == 2 for r in si.regions)
    assert channel_cuts(sg) == channel_cuts(gm) - si.reads["narrow"] - si.reads["gather"]
    with torch.no_grad():
        assert rel_err(sg(x), fxprune.masked_forward(a, plan, x)) < 1e-5


class Read(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        r = torch.narrow(x, 1, 2, 4)
        return self.conv(r), self.fc(torch.narrow(x.mean((2, 3)), 1, 0, 4))


@pytest.mark.parametrize("batch", [1, 3])
def test_macs_per_channel_counts_the_batch(batch):
    gm = torch.fx.symbolic_trace(Read())
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(torch.randn(batch, 8, 8, 8))
    narrows = [n for n in gm.graph.nodes if n.target is torch.narrow]
    # conv: 6 outputs x 4x4 positions x 3x3 kernel per read channel, for every sample
    assert _macs_per_channel(narrows[0], gm) == batch * 6 * 16 * 9
    assert _macs_per_channel(narrows[1], gm) == batch * 3  # a linear: 3 outputs per sample


def test_reads_become_partial_layers(stream):
    _, x, a = stream
    plan = fxprune.unconstrained_plan(a, random_input_masks(a, 3))
    gm, _info = rewrite(a, plan, reads="exact")
    sg, si = segment(gm, (x,))
    assert si.regions, "the stream is read in ranges, so it must be segmented"
    n_cat = sum(n.target is torch.cat for n in sg.graph.nodes if n.op == "call_function")
    # the head's concatenation takes the segments as they are: one cat, as in the original
    assert n_cat == 1 and not si.materialised
    convs = [m for m in sg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > len([m for m in gm.modules() if isinstance(m, nn.Conv2d)])


def test_no_reads_no_change(stream):
    _, x, a = stream
    gm = fxprune.prune(a, fxprune.uniform_plan(a, 0.5))
    sg, si = segment(gm, (x,), block=8)
    assert si.regions == [] and si.segments == 0
    assert sg.code == gm.code
    with torch.no_grad():
        torch.testing.assert_close(sg(x), gm(x))


def test_bad_block(stream):
    _, x, a = stream
    with pytest.raises(ValueError, match="block"):
        segment(fxprune.prune(a, fxprune.Plan.empty(a)), (x,), block=0)


class Scaled(nn.Module):
    """A stream whose tensors pass through a parameter (a layer scale): left unsegmented."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.a = nn.Conv2d(c, 4, 1)
        self.b = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        s = self.stem(x) * self.gamma
        return self.a(s) + self.b(s)


def test_parameter_roots_are_left_alone():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(Scaled().eval(), x)
    plan = fxprune.unconstrained_plan(a, random_input_masks(a, 0, min_keep=0.5))
    gm, _ = rewrite(a, plan, reads="exact")
    sg, si = segment(gm, (x,))
    if channel_cuts(gm):  # the reads exist, but the region holds a parameter
        assert si.regions == []
    with torch.no_grad():
        assert rel_err(sg(x), fxprune.masked_forward(a, plan, x)) < 1e-5


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_segmented_exports(name, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 96)
    model = make_sensitive(torchvision.models.get_model(name, weights=None), x).eval()
    a = fxprune.analyze(model, x)
    masks = fxprune.magnitude_masks(a, 0.3, multiple=8)
    plan = fxprune.unconstrained_plan(a, masks, align=8)
    plain, _ = rewrite(a, plan, reads="exact")
    gm, info = rewrite(a, plan, reads="exact", segment_block=8)
    assert info.segment_block == 8 and info.segments.regions
    done = info.segments.reads["narrow"] + info.segments.reads["gather"]
    assert done > 0 and channel_cuts(gm) == channel_cuts(plain) - done
    with torch.no_grad():
        assert rel_err(gm(x), fxprune.masked_forward(a, plan, x)) < 1e-4
    # ONNX export checked against ONNX Runtime, and a rebuild from the plan notes loads
    fxprune.export_onnx(gm, tmp_path / "m.onnx", x)
    plan = dataclasses.replace(plan, notes={**plan.notes, "segment_block": 8})
    rebuilt = fxprune.rebuild(model, x, plan, gm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), gm(x))
    # merged under a price (what compile does): fewer segments, still exact, and rebuilt
    # from the price recorded in the notes
    cost = SegmentCost(launch_s=4e-5, mac_s=1.3e-11)
    merged, minfo = rewrite(a, plan, reads="exact", segment_block=8, segment_cost=cost)
    assert minfo.segment_cost == cost and minfo.segments.segments < info.segments.segments
    with torch.no_grad():
        assert rel_err(merged(x), fxprune.masked_forward(a, plan, x)) < 1e-4
    notes = {**plan.notes, "segment_cost": dataclasses.asdict(cost)}
    again = fxprune.Plan.from_json(dataclasses.replace(plan, notes=notes).to_json())
    rebuilt = fxprune.rebuild(model, x, again, merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), merged(x))
