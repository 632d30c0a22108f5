"""Unconstrained channel pruning (UCPE): every consumer keeps its own input channels.

Constrained pruning makes every tensor joined by a residual add or a concat keep the same channel
indices. Unconstrained pruning lifts that: each *consumer* — a conv or linear call with
``groups=1`` — keeps its own subset of input positions, and the tensor it reads keeps the union
of what its readers use (a producer channel goes only when nothing reads it). The pruned model
equals the original with every consumer's dropped inputs zeroed (the masking oracle does exactly
that), so masks from any source are valid: per-layer magnitude or FPGM heuristics at a target
sparsity (:func:`magnitude_masks`), the zero columns of a model someone already pruned by
masking (:func:`masks_from_zeros`), or a user's own boolean masks.

How consumers read their subset in the exported model (slice, gather, or a zero-padded read) is
the rewrite's business (:mod:`fxprune.unconstrained.layout`, :mod:`fxprune.rewrite.prune`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fxprune.core.counts import aligned_count
from fxprune.core.errors import PlanError
from fxprune.core.meta import CHANNELS
from fxprune.core.plan import Plan

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.analysis.consumers import Consumer

__all__ = [
    "align_unions",
    "consumer_choice",
    "magnitude_masks",
    "masks_from_zeros",
    "unconstrained_plan",
]

_CRITERIA = ("l1", "l2", "fpgm")


def unconstrained_plan(
    analysis: Analysis,
    input_masks: Mapping[str, Iterable[bool]],
    *,
    removed_blocks: Iterable[str] = (),
    include_inexact: bool = False,
    align: int | Mapping[str, Sequence[int]] | None = None,
    notes: Mapping[str, object] | None = None,
) -> Plan:
    """The plan in which each named consumer keeps the input positions its mask marks True.

    Args:
        input_masks: consumer (node name or module qualified name) -> boolean mask over its input
            positions. Consumers not named read everything.
        removed_blocks: blocks to remove as well (their layers' masks are ignored).
        include_inexact: let groups whose pruning is not equal to masking (LayerNorm over
            channels) drop unread channels too.
        align: round each group's kept count *up* to a count the runtime runs well — a
            multiple, or per group the allowed counts (a latency table's candidates). The
            channels added back are read by no consumer, so the output does not change; a
            union of 254 of 256 channels can run slower than all 256 on aligned kernels.

    A group keeps a channel iff something reads it: a masked consumer at a kept position, any
    other layer, or any op that takes the channel in without passing it on (a channel-wise sum,
    the model output). Groups that are frozen (or inexact) keep all channels; their consumers
    may still read subsets.
    """
    table = analysis.consumers
    masks = _consumer_masks(table, input_masks)
    removed = tuple(removed_blocks)
    dead = {n for b in removed for n in analysis.block(b).region}
    read = _read_classes(analysis, masks, dead, table)
    internal = {g for b in removed for g in analysis.internal_groups(analysis.block(b))}
    kept = _kept_unions(analysis, read, internal, include_inexact, align)
    keep_unit = analysis.spaces.keep_units(kept)
    own: dict[str, tuple[int, ...]] = {}
    for name, m in masks.items():
        if name in dead:
            continue
        available = keep_unit[table[name].units]
        if (m & available).sum() < available.sum():  # reads less than its tensor keeps
            own[name] = tuple(np.flatnonzero(m & available).tolist())
    plan = Plan(kept, removed, analysis.signature, dict(notes or {}), own)
    plan.validate(analysis)
    return plan


def _consumer_masks(
    table: Mapping[str, Consumer], input_masks: Mapping[str, Iterable[bool]]
) -> dict[str, np.ndarray]:
    """The masks by consumer node name, each checked to be one boolean per input, not all False."""
    by_target = {c.target: c for c in table.values()}
    masks: dict[str, np.ndarray] = {}
    for key, mask in input_masks.items():
        c = table.get(key) or by_target.get(key)
        if c is None:
            raise PlanError(
                f"'{key}' is not a consumer that can keep its own input channels (conv/linear "
                "with groups=1, called once); known consumers include "
                f"{', '.join(list(by_target)[:5])}..."
            )
        m = np.asarray(list(mask) if not isinstance(mask, np.ndarray) else mask, dtype=bool)
        if m.shape != (c.n_in,):
            raise PlanError(
                f"Mask for '{key}' has shape {m.shape}; '{c.target}' has {c.n_in} inputs."
            )
        if not m.any():
            raise PlanError(f"Mask for '{key}' keeps no input channel; keep at least one.")
        masks[c.node] = m
    return masks


def _kept_unions(
    analysis: Analysis,
    read: np.ndarray,
    internal: set[str],
    include_inexact: bool,
    align: int | Mapping[str, Sequence[int]] | None,
) -> dict[str, tuple[int, ...]]:
    """Per pruned group, the channels something reads (rounded up to ``align``)."""
    kept: dict[str, tuple[int, ...]] = {}
    for g in analysis.groups:
        if g.frozen or g.equal_count or (g.inexact and not include_inexact):
            continue  # grouped ops need equal counts per group: keep such groups whole
        keep = np.isin(g.classes, read)
        if not keep.any() and g.name not in internal:
            continue  # read only inside removed blocks: the tensor itself stays
        if align is not None and keep.any():
            _align_keep(keep, align, g.name)
        if not keep.all():
            kept[g.name] = tuple(np.flatnonzero(keep).tolist())
    return kept


def consumer_choice(
    analysis: Analysis,
    plan: Plan,
    *,
    criterion: str = "l2",
    align: int | Mapping[str, Sequence[int]] | None = None,
) -> Plan:
    """Lift a constrained plan: each consumer keeps as many inputs, but its own best ones.

    Every consumer keeps the number of input channels ``plan`` gives it, chosen by its own weight
    columns (``criterion`` as in :func:`magnitude_masks`) instead of the group's joint score; the
    tensors keep the union. Latency rises where the union outgrows the plan's kept sets, which
    ``fxprune.compile(coupling="unconstrained")`` measures and corrects over its rounds.
    ``align`` rounds the unions up to runtime-friendly counts (see :func:`unconstrained_plan`).
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    keep_unit = analysis.spaces.keep_units(plan.kept)
    dead = {n for b in plan.removed_blocks for n in analysis.block(b).region}
    masks: dict[str, np.ndarray] = {}
    for c in analysis.consumers.values():
        k = int(keep_unit[c.units].sum())
        if c.node in dead or k >= c.n_in or k == 0:
            continue
        scores = _column_scores(analysis.gm.get_submodule(c.target).weight, criterion)
        mask = np.zeros(c.n_in, dtype=bool)
        mask[np.argsort(-scores, kind="stable")[:k]] = True
        masks[c.node] = mask
    notes = {**plan.notes, "coupling": "unconstrained", "consumer_criterion": criterion}
    return unconstrained_plan(
        analysis, masks, removed_blocks=plan.removed_blocks, notes=notes, align=align
    )


def align_unions(analysis: Analysis, plan: Plan, align: int | Mapping[str, Sequence[int]]) -> Plan:
    """``plan`` with every pruned group's kept channels rounded *up* to an aligned count.

    Only channels are added, and no consumer reads them: a consumer that read everything its
    tensor kept now keeps exactly that as its own inputs, so the output does not change. With
    reads padded to the same block (``rewrite(read_block=)``), every conv then sees an aligned
    input count, which ONNX Runtime CPU needs to run it in its blocked layout.
    """
    old = analysis.spaces.keep_units(plan.kept)
    kept: dict[str, tuple[int, ...]] = {}
    for g in analysis.groups:
        if g.name not in plan.kept:
            continue  # kept whole
        keep = np.zeros(g.size, dtype=bool)
        keep[list(plan.kept[g.name])] = True
        _align_keep(keep, align, g.name)
        if not keep.all():
            kept[g.name] = tuple(np.flatnonzero(keep).tolist())
    new = analysis.spaces.keep_units(kept)
    dead = {n for b in plan.removed_blocks for n in analysis.block(b).region}
    own = dict(plan.consumers)
    for c in analysis.consumers.values():
        if c.node in dead or c.node in own:
            continue
        was = old[c.units]
        if was.sum() < new[c.units].sum():
            own[c.node] = tuple(np.flatnonzero(was).tolist())
    aligned = Plan(kept, plan.removed_blocks, plan.signature, dict(plan.notes), own)
    aligned.validate(analysis)
    return aligned


def _align_keep(keep: np.ndarray, align: int | Mapping[str, Sequence[int]], name: str) -> None:
    """Round a group's keep mask up, in place, to an aligned count (the first dropped channels
    come back: nobody reads them)."""
    target = _aligned_up(int(keep.sum()), keep.size, align, name)
    keep[np.flatnonzero(~keep)[: target - int(keep.sum())]] = True


def _aligned_up(k: int, size: int, align: int | Mapping[str, Sequence[int]], name: str) -> int:
    """The smallest allowed count ≥ k (the group's size if none is)."""
    if isinstance(align, int):
        return min(size, -(-k // align) * align)
    allowed = [c for c in align.get(name, ()) if k <= c <= size]
    return min(allowed) if allowed else size


def _read_classes(
    analysis: Analysis,
    masks: Mapping[str, np.ndarray],
    dead: set[str],
    table: Mapping[str, Consumer],
) -> np.ndarray:
    """Unit classes some live node reads (takes in without passing on)."""
    unit_class = analysis.spaces.unit_class
    read: set[int] = set()
    for node in analysis.gm.graph.nodes:
        if node.name in dead or node.op in ("placeholder", "get_attr"):
            continue
        if node.name in masks:
            c = table[node.name]
            read.update(np.unique(unit_class[c.units[masks[node.name]]]).tolist())
            continue
        if node.meta.get(CHANNELS) is None and node.op != "output":
            continue  # sizes and shapes read no channel values
        out = _classes(node.meta.get(CHANNELS), unit_class)
        for src in node.all_input_nodes:
            if src.name in dead:
                continue
            read.update(_classes(src.meta.get(CHANNELS), unit_class) - out)
    return np.fromiter(read, dtype=np.int64, count=len(read))


def _classes(u: object, unit_class: np.ndarray) -> set[int]:
    if isinstance(u, (tuple, list)):
        return set().union(*(_classes(v, unit_class) for v in u)) if u else set()
    if isinstance(u, np.ndarray):
        return set(np.unique(unit_class[u]).tolist())
    return set()


def _columns(weight: torch.Tensor) -> torch.Tensor:
    """A conv/linear weight as one row per input channel."""
    return weight.detach().float().transpose(0, 1).reshape(weight.shape[1], -1)


def _column_scores(weight: torch.Tensor, criterion: str) -> np.ndarray:
    """Importance of each input column of a conv/linear weight (higher = keep)."""
    w = _columns(weight)
    if criterion == "l1":
        return w.abs().sum(1).numpy()
    if criterion == "l2":
        return w.norm(dim=1).numpy()
    # FPGM: a column close to the geometric median of the others is the most replaceable
    return torch.cdist(w[None], w[None])[0].sum(1).numpy()


def magnitude_masks(
    analysis: Analysis,
    sparsity: float,
    *,
    criterion: str = "l2",
    multiple: int = 1,
    pool: float | None = None,
    skip_model_inputs: bool = True,
) -> dict[str, np.ndarray]:
    """Per-layer input-channel masks: each consumer drops its ``sparsity`` least important inputs.

    This is UPSCALE's post-training setting: every conv/linear with ``groups=1`` ranks its input
    columns by norm (``"l1"``, ``"l2"``) or by distance to the others (``"fpgm"``, Filter
    Pruning via Geometric Median) and keeps ``max(1, round((1 - sparsity) * n_in))``.

    Args:
        multiple: round each kept count to a multiple of this (at least one multiple).
        pool: bound the unions. Each group first keeps a pool of its
            ``(1 - sparsity)(1 + pool)`` best channels by its consumers' joint score (each
            consumer's column scores normalised to sum 1); consumers then choose only from their
            groups' pools. ``pool=0`` gives every consumer of a group the same channels
            (constrained pruning); None leaves consumers free (unions grow toward the whole
            group and keep residual streams wide, which costs latency on runtimes that copy).
        skip_model_inputs: leave layers that read a model input (the stem conv on RGB) whole.
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    placeholders = {n.name for n in analysis.gm.graph.nodes if n.op == "placeholder"}
    table = {
        c.node: c
        for c in analysis.consumers.values()
        if not (skip_model_inputs and c.input_node in placeholders)
    }
    scores = {
        name: _column_scores(analysis.gm.get_submodule(c.target).weight, criterion)
        for name, c in table.items()
    }
    allowed = None
    if pool is not None:
        allowed = _pools(analysis, table, scores, (1.0 - sparsity) * (1.0 + pool), multiple)
    out: dict[str, np.ndarray] = {}
    for name, c in table.items():
        n_keep = aligned_count(c.n_in, 1.0 - sparsity, multiple)
        if n_keep >= c.n_in:
            continue
        s = scores[name]
        if allowed is not None:  # outside the pool ranks below every pooled channel
            s = np.where(allowed[analysis.spaces.unit_class[c.units]], s, s - np.inf)
        mask = np.zeros(c.n_in, dtype=bool)
        mask[np.argsort(-s, kind="stable")[:n_keep]] = True
        out[name] = mask
    return out


def _pools(
    analysis: Analysis,
    table: Mapping[str, Consumer],
    scores: Mapping[str, np.ndarray],
    keep: float,
    multiple: int,
) -> np.ndarray:
    """Per unit class: inside its group's pool of the ``keep`` fraction with the best joint score.

    Classes outside prunable groups are always allowed (their tensors keep every channel).
    """
    unit_class = analysis.spaces.unit_class
    joint = np.zeros(len(unit_class))
    for name, c in table.items():
        s = scores[name]
        np.add.at(joint, unit_class[c.units], s / max(float(s.sum()), 1e-12))
    allowed = np.ones(len(unit_class), dtype=bool)
    for g in analysis.groups:
        if g.frozen or g.equal_count or g.inexact:
            continue
        k = min(g.size, max(multiple, int(np.ceil(keep * g.size / multiple)) * multiple))
        order = np.argsort(-joint[g.classes], kind="stable")
        allowed[g.classes[order[k:]]] = False
    return allowed


def masks_from_zeros(analysis: Analysis, *, atol: float = 0.0) -> dict[str, np.ndarray]:
    """The input masks of a model pruned by zeroing: a consumer drops each all-zero input column.

    Use it to turn a model whose pruned weights were zeroed in place (by another tool, or by
    training with masks) into a genuinely smaller one: ``unconstrained_plan(a, masks_from_zeros(a))``.
    """
    out: dict[str, np.ndarray] = {}
    for c in analysis.consumers.values():
        cols = _columns(analysis.gm.get_submodule(c.target).weight).abs().amax(1)
        mask = (cols > atol).numpy()
        if not mask.all() and mask.any():
            out[c.node] = mask
    return out
