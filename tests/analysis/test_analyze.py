"""``Analysis``: a compact repr (never the example tensor or the graph's code)."""

from __future__ import annotations

import torch
import torchvision

import fxprune


def test_analysis_repr_is_one_line():
    a = fxprune.analyze(torchvision.models.resnet18().eval(), torch.randn(2, 3, 32, 32))
    text = repr(a)
    assert "\n" not in text and len(text) < 200
    assert "tensor(" not in text and "GraphModule(" not in text
    assert text.startswith("Analysis(ResNet")
    prunable = sum(g.prunable for g in a.groups)
    assert f"{len(a.groups)} groups ({prunable} prunable)" in text
    assert f"{len(a.blocks)} blocks" in text
    assert "inputs 2×3×32×32" in text and a.signature in text
