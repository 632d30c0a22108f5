"""Channel importance per coupling group (data-free L2 magnitude).

The score of a group index is the sum, over every weight layer that reads or writes the index's
channels, of the squared L2 norm of the weights attached to those channels (output rows and input
columns). Coupled members therefore add up, as in DESIGN.md §4. Data-driven Taylor importance
belongs here too when calibration data is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = ["magnitude_scores"]


def _add(scores: dict[int, np.ndarray], analysis: Analysis, units: np.ndarray, per_pos: np.ndarray) -> None:
    spaces = analysis.spaces
    classes = spaces.unit_class[units]
    for pos, c in enumerate(classes.tolist()):
        hit = spaces.class_index.get(c)
        if hit is not None:
            gid, idx = hit
            scores.setdefault(gid, np.zeros(spaces.groups[gid].size))[idx] += per_pos[pos]


def magnitude_scores(analysis: Analysis) -> dict[str, np.ndarray]:
    """Per group name, a non-negative score per index (higher = more important)."""
    scores: dict[int, np.ndarray] = {}
    seen: set[str] = set()
    for rec in analysis.spaces.layers:
        if rec.target in seen:
            continue
        seen.add(rec.target)
        try:
            m = analysis.gm.get_submodule(rec.target)
        except AttributeError:
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        w = w.detach().float()
        if rec.kind == "norm":
            _add(scores, analysis, rec.out_units, (w**2).numpy())
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            out = (w.reshape(w.shape[0], -1) ** 2).sum(1).numpy()
            _add(scores, analysis, rec.out_units, out)
            if m.groups == m.in_channels == m.out_channels:
                continue
            g, cout_g = m.groups, m.out_channels // m.groups
            spatial = tuple(range(2, w.ndim))
            cols = np.concatenate(
                [(w[i * cout_g : (i + 1) * cout_g] ** 2).sum(dim=(0, *spatial)).numpy() for i in range(g)]
            )
            _add(scores, analysis, rec.in_units, cols)
            continue
        out = (w.reshape(w.shape[0], -1) ** 2).sum(1).numpy()
        cols = (w.transpose(0, 1).reshape(w.shape[1], -1) ** 2).sum(1).numpy()
        _add(scores, analysis, rec.out_units, out)
        if len(cols) == len(rec.in_units):
            _add(scores, analysis, rec.in_units, cols)
    return {analysis.spaces.groups[gid].name: s for gid, s in scores.items()}
