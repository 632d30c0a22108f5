"""The rewrite leaves shapes current: every node's ``tensor_meta`` is the pruned shape it produces.

Constrained and unconstrained plans on torchvision's ResNet-18 (with reads, padded reads and
segments), a train-mode graph (flags restored, BatchNorm statistics untouched), and the analysed
graph, which keeps its dense shapes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from helpers import analysed_toy, make_sensitive, random_input_masks, rel_err
from torch import fx, nn

import fxprune
from fxprune.analysis.plans import random_plan
from fxprune.core.meta import TENSOR_META
from fxprune.rewrite.prune import channel_copies, rewrite
from fxprune.rewrite.segment import segment


class _Recorder(fx.Interpreter):
    """Runs a GraphModule and records the shape tree of every node's actual output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n.name] = _value_shapes(out)
        return out


def _value_shapes(v: Any) -> Any:
    """A tensor's shape; a tuple/list of them as a tuple; anything else None."""
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (tuple, list)):
        return tuple(_value_shapes(x) for x in v)
    return None


def _meta_shapes(meta: Any) -> Any:
    """The same tree from a node's ``tensor_meta`` (ShapeProp's TensorMetadata, or a tuple)."""
    if hasattr(meta, "shape") and hasattr(meta, "stride"):
        return tuple(meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_meta_shapes(x) for x in meta)
    return None


def _has_tensor(tree: Any) -> bool:
    if isinstance(tree, tuple) and all(isinstance(d, int) for d in tree):
        return True
    return isinstance(tree, tuple) and any(_has_tensor(t) for t in tree)


def meta_of(gm: fx.GraphModule) -> dict[str, Any]:
    """Node name -> the shape tree its ``tensor_meta`` records (None: no ``tensor_meta``)."""
    return {n.name: _meta_shapes(n.meta.get(TENSOR_META)) for n in gm.graph.nodes}


def run_shapes(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, Any]:
    """Node name -> the shape tree it actually produces on ``x``."""
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(x)
    return recorder.shapes


def assert_meta_is_current(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Every node that produces a tensor records exactly the shapes it produces; others none."""
    ran, meta = run_shapes(gm, x), meta_of(gm)
    assert set(ran) == set(meta)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        want = ran[node.name] if _has_tensor(ran[node.name]) else None
        assert meta[node.name] == want, f"{node.format_node()}: meta {meta[node.name]} != {want}"


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = make_sensitive(torchvision.models.resnet18(weights=None), x).eval()
    return model, x, fxprune.analyze(model, x)


def _conv_widths(gm: fx.GraphModule) -> dict[str, int]:
    """Output channels each conv's ``tensor_meta`` records."""
    return {
        n.name: n.meta[TENSOR_META].shape[1]
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_plan_meta_is_the_pruned_shape(resnet18, seed):
    _, x, a = resnet18
    dense = meta_of(a.gm)
    plan = random_plan(a, seed, block_prob=0.5)
    assert plan.kept, "the plan prunes something"
    gm, _ = rewrite(a, plan)
    assert_meta_is_current(gm, x)
    # the shapes did change: some conv records fewer channels than in the dense graph
    before, after = _conv_widths(a.gm), _conv_widths(gm)
    assert any(after[n] < before[n] for n in after)
    if plan.removed_blocks:  # removed blocks' nodes are gone, their metas with them
        assert set(meta_of(gm)) < set(dense)
    assert meta_of(a.gm) == dense  # the analysed graph keeps its dense shapes
    assert_meta_is_current(a.gm, x)
    with torch.no_grad():
        assert rel_err(gm(x), fxprune.masked_forward(a, plan, x)) < 1e-4


@pytest.mark.parametrize(
    "options",
    [
        {"reads": "exact"},
        {"reads": "exact", "read_block": 8},
        {"reads": "auto"},
        {"reads": "exact", "segment_block": 4},
    ],
    ids=["exact", "read_block", "auto", "segmented"],
)
def test_unconstrained_plan_meta_is_the_pruned_shape(resnet18, options):
    _, x, a = resnet18
    dense = meta_of(a.gm)
    plan = fxprune.unconstrained_plan(a, random_input_masks(a, 0))
    assert plan.consumers
    gm, info = rewrite(a, plan, **options)
    assert_meta_is_current(gm, x)  # the reads (narrow, index_select, their buffers) included
    if "segment_block" in options:
        assert info.segments is not None and info.segments.regions
    else:
        assert sum(channel_copies(gm)) > 0
    assert meta_of(a.gm) == dense
    with torch.no_grad():
        assert rel_err(gm(x), fxprune.masked_forward(a, plan, x)) < 1e-4


def test_segment_reads_the_rewritten_shapes(resnet18):
    """segment() uses the rewrite's ``tensor_meta``; a graph without any is propagated first."""
    _, x, a = resnet18
    plan = fxprune.unconstrained_plan(a, random_input_masks(a, 1))
    gm, _ = rewrite(a, plan, reads="exact")
    sg, si = segment(gm, (x,), block=4)
    assert si.regions
    assert_meta_is_current(sg, x)
    bare = copy.deepcopy(gm)  # as if re-traced: no node carries shapes
    for node in bare.graph.nodes:
        node.meta.pop(TENSOR_META, None)
    sb, sbi = segment(bare, (x,), block=4)
    assert sbi.regions == si.regions and sbi.reads == si.reads
    assert sb.code == sg.code
    assert_meta_is_current(sb, x)


def test_train_mode_graph_keeps_its_flags_and_statistics():
    _, x, a = analysed_toy(_Toy)
    plan = fxprune.Plan.from_keep_masks(
        a, {g.name: np.arange(g.size) % 3 != 1 for g in a.groups if g.prunable}
    )
    eval_gm, _ = rewrite(a, plan)
    a.gm.train()
    a.gm.bn.eval()  # a mixed state, to see every flag restored as it was
    try:
        gm, _ = rewrite(a, plan)
    finally:
        a.gm.eval()
    flags = {name: m.training for name, m in gm.named_modules()}
    assert flags[""] and not flags["bn"] and flags["bn2"]
    for key, value in eval_gm.state_dict().items():
        assert torch.equal(gm.state_dict()[key], value), key  # no BatchNorm statistic moved
    assert_meta_is_current(gm.eval(), x)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.conv = nn.Conv2d(12, 9, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(9)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.bn2(self.conv(y)))
        return self.head(y.mean((2, 3)))


def test_macs_of_a_rewritten_graph_need_no_second_propagation():
    """The rewrite's refreshed shapes are what report and compile count MACs from."""
    from fxprune.analysis.plans import random_plan
    from fxprune.pipeline.report import count_macs

    x = torch.randn(1, 3, 64, 64)
    a = fxprune.analyze(torchvision.models.resnet18().eval(), x)
    for seed in range(2):
        pruned = fxprune.prune(a, random_plan(a, seed))
        assert count_macs(pruned) == count_macs(copy.deepcopy(pruned), a.example_inputs)
        assert count_macs(pruned) < count_macs(a.gm)
