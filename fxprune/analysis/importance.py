"""Channel importance per coupling group: data-free magnitude, or data-driven Taylor.

Magnitude (the default without data): the score of a group index is the sum, over every weight
layer that reads or writes the index's channels, of the squared L2 norm of the weights attached
to those channels (output rows and input columns). Coupled members add up (DESIGN.md §4).

Taylor (MDP's, with data): per BatchNorm channel ``|g_γ·γ + g_β·β|`` — the first-order change of
the loss when the channel is removed — computed per batch and averaged over batches; a layer
whose output channels are not normalised by a BN uses ``|Σ w·∂L/∂w|`` over each output row.
Under an initialised ``torch.distributed`` process group the per-channel sums and the batch count
are all-reduced, so every rank derives the same scores (and hence the same plan).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = ["Importance", "channel_importance", "magnitude_scores", "taylor_scores"]


def _add(
    scores: dict[int, np.ndarray], analysis: Analysis, units: np.ndarray, per_pos: np.ndarray
) -> None:
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
                [
                    (w[i * cout_g : (i + 1) * cout_g] ** 2).sum(dim=(0, *spatial)).numpy()
                    for i in range(g)
                ]
            )
            _add(scores, analysis, rec.in_units, cols)
            continue
        out = (w.reshape(w.shape[0], -1) ** 2).sum(1).numpy()
        cols = (w.transpose(0, 1).reshape(w.shape[1], -1) ** 2).sum(1).numpy()
        _add(scores, analysis, rec.out_units, out)
        if len(cols) == len(rec.in_units):
            _add(scores, analysis, rec.in_units, cols)
    return {analysis.spaces.groups[gid].name: s for gid, s in scores.items()}


@dataclass(frozen=True)
class Importance:
    """Per group name, one non-negative score per index, and the method that produced them."""

    scores: dict[str, np.ndarray]
    method: str  # "l2-magnitude" | "taylor"
    batches: int = 0


def _to_group_scores(
    analysis: Analysis, per_layer: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    scores: dict[int, np.ndarray] = {}
    for units, values in per_layer:
        _add(scores, analysis, units, values)
    return {analysis.spaces.groups[gid].name: s for gid, s in scores.items()}


def taylor_scores(
    analysis: Analysis,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    max_batches: int | None = None,
) -> Importance:
    """First-order Taylor importance from ``data`` batches ``(inputs, target)``.

    ``loss_fn(output, target)`` gives the scalar loss. The analysed graph is copied and run in
    eval mode (BatchNorm statistics are not updated); the user's model is never touched.
    """
    import copy

    gm = copy.deepcopy(analysis.gm).eval()
    for p in gm.parameters():
        p.requires_grad_(True)
    layers = []
    bn_units: set[int] = set()
    for rec in analysis.spaces.layers:
        if rec.kind == "norm" and isinstance(
            gm.get_submodule(rec.target), nn.modules.batchnorm._BatchNorm
        ):
            layers.append(("bn", rec))
            bn_units.update(analysis.spaces.unit_class[rec.out_units].tolist())
    for rec in analysis.spaces.layers:
        if (
            rec.kind in ("conv", "linear")
            and not set(analysis.spaces.unit_class[rec.out_units].tolist()) <= bn_units
        ):
            layers.append(("weight", rec))
    sums = [torch.zeros(len(rec.out_units), dtype=torch.float64) for _, rec in layers]
    batches = 0
    for batch in data:
        if max_batches is not None and batches >= max_batches:
            break
        inputs, target = (
            batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
        )
        inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        gm.zero_grad(set_to_none=True)
        out = gm(*inputs)
        loss_fn(out, target).backward()
        with torch.no_grad():
            for acc, (kind, rec) in zip(sums, layers, strict=True):
                m = gm.get_submodule(rec.target)
                if kind == "bn":
                    if m.weight is None or m.weight.grad is None:
                        continue
                    acc += (m.weight.grad * m.weight + m.bias.grad * m.bias).abs().double()
                elif m.weight.grad is not None:
                    w = m.weight
                    acc += (w.grad * w).reshape(w.shape[0], -1).sum(1).abs().double()
        batches += 1
    if batches == 0:
        raise ValueError("taylor_scores needs at least one batch of data")
    count = torch.tensor([float(batches)], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flat = torch.cat([*sums, count])
        torch.distributed.all_reduce(flat)
        parts = torch.split(flat, [len(s) for s in sums] + [1])
        sums, count = list(parts[:-1]), parts[-1]
    per_layer = [
        (rec.out_units, (acc / count).numpy()) for acc, (_, rec) in zip(sums, layers, strict=True)
    ]
    return Importance(_to_group_scores(analysis, per_layer), "taylor", int(count.item()))


def channel_importance(
    analysis: Analysis,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    max_batches: int | None = None,
) -> Importance:
    """Taylor importance when ``data`` and ``loss_fn`` are given, else L2 magnitude."""
    if data is not None:
        if loss_fn is None:
            raise ValueError("data-driven importance needs loss_fn(output, target) -> scalar loss")
        return taylor_scores(analysis, data, loss_fn, max_batches=max_batches)
    return Importance(magnitude_scores(analysis), "l2-magnitude")
