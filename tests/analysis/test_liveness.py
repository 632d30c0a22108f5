"""Peak activation memory: live sets over the execution order, counted by hand on small nets."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import fxprune
from fxprune.analysis.liveness import live_sets, peak_activation_bytes
from fxprune.core.plan import Plan

H = W = 8  # one channel of a (1, C, 8, 8) float32 tensor is 256 bytes


class Residual(nn.Module):
    """stem (8) → a (16) → b (8), added to the stem's output, → head (4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 1)
        self.b = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        return self.head(s + self.b(self.a(s)))


class Chunked(nn.Module):
    """A tuple-valued chunk whose halves are read by two later nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        first, second = self.stem(x).chunk(2, dim=1)
        return self.c(first) * second


def _traced(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    return gm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_live_sets_by_hand(dtype):
    x = torch.randn(1, 3, H, W, dtype=dtype)
    gm = _traced(Residual().to(dtype), x)
    sizes = {"x": 3, "stem": 8, "a": 16, "b": 8, "add": 8, "head": 4}  # output channels
    channels = {n.name: sum(sizes[b.name] for b in alive) for n, alive in live_sets(gm.graph)}
    # the stem's output lives until the add; each input dies after its last user
    assert channels == {
        "x": 3,
        "stem": 3 + 8,
        "a": 8 + 16,
        "b": 8 + 16 + 8,
        "add": 8 + 8 + 8,
        "head": 8 + 4,
        "output": 4,
    }
    per_channel = H * W * dtype.itemsize
    assert peak_activation_bytes(gm) == 32 * per_channel
    assert peak_activation_bytes(fx.symbolic_trace(Residual().to(dtype)), (x,)) == 32 * per_channel


def test_a_tuple_is_one_buffer_its_getitems_keep_alive():
    x = torch.randn(1, 3, H, W)
    gm = _traced(Chunked(), x)
    alive = {n.name: {b.name for b in a} for n, a in live_sets(gm.graph)}
    assert alive["chunk"] == {"stem", "chunk"}
    assert alive["getitem"] == alive["getitem_1"] == {"chunk"}  # views: no buffer of their own
    assert alive["c"] == {"chunk", "c"}
    assert alive["mul"] == {"chunk", "c", "mul"}  # the second half is read here, last
    assert alive["output"] == {"mul"}
    assert peak_activation_bytes(gm) == (8 + 8) * H * W * 4  # stem + both halves at the chunk


def _groups(analysis: fxprune.Analysis) -> tuple[str, str]:
    by_size = {g.size: g.name for g in analysis.groups if g.prunable}
    return by_size[8], by_size[16]  # the residual stream, the branch's inner channels


def test_pruned_model_peak_by_hand():
    """Counted on the pruned model (shapes the rewrite refreshed): kept channels, and a removed
    block's tensors gone with the add, its users reading the stem's output."""
    x = torch.randn(1, 3, H, W)
    analysis = fxprune.analyze(Residual(), x)
    residual, inner = _groups(analysis)
    (block,) = analysis.blocks
    per_channel = H * W * 4
    assert peak_activation_bytes(fxprune.prune(analysis, Plan.empty(analysis))) == 32 * 256
    keep = {residual: [i < 6 for i in range(8)], inner: [i < 4 for i in range(16)]}
    pruned = fxprune.prune(analysis, Plan.from_keep_masks(analysis, keep))
    # b: s 6 + h 4 + r 6 = 16; add: s 6 + r 6 + y 6 = 18 (now the peak)
    assert peak_activation_bytes(pruned) == 18 * per_channel
    gone = fxprune.prune(analysis, Plan.from_keep_masks(analysis, {}, [block.name]))
    assert not any(n.name in ("a", "b") for n in gone.graph.nodes)
    # x 3; stem: x 3 + s 8 = 11; head: s 8 + out 4 = 12
    assert peak_activation_bytes(gone) == 12 * per_channel
