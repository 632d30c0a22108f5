"""Channel importance per coupling group: data-free magnitude, or data-driven Taylor.

Magnitude (the default without data): the score of a group index is the sum, over every weight
layer that reads or writes the index's channels, of the squared L2 norm of the weights attached
to those channels (output rows and input columns). Coupled members add up (DESIGN.md §4).

Taylor (MDP's, with data): per BatchNorm channel ``|g_γ·γ + g_β·β|`` — the first-order change of
the loss when the channel is removed — computed per batch and averaged over batches; a layer
whose output channels are not normalised by a BN uses ``|Σ w·∂L/∂w|`` over each output row.
Under an initialised ``torch.distributed`` process group the per-channel sums and the batch count
are all-reduced, so every rank derives the same scores (and hence the same plan).

Non-finite values are refused with a :class:`~fxprune.core.errors.NonFiniteError` naming the
parameter (or the batch and gradient), before anything is measured: a NaN score sorts as the
least important channel and is silently pruned, an infinite one makes the solver's objective NaN,
and the pruned model of a model with NaN weights is as broken as the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fxprune.core.batches import split_batch
from fxprune.core.errors import NonFiniteError

if TYPE_CHECKING:
    from fxprune.analysis import Analysis

__all__ = [
    "IMPORTANCE_METHODS",
    "NORMALIZATIONS",
    "Importance",
    "channel_importance",
    "check_finite_weights",
    "magnitude_scores",
    "normalize_scores",
    "taylor_scores",
]


def check_finite_weights(module: nn.Module) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter or norm statistic with NaN/inf.

    Every floating parameter is checked (a NaN bias is not scored but breaks the pruned model
    all the same), and the running statistics of batch norms, which deployment folds into the
    weights. Other buffers are left alone: masks filled with ``-inf`` are legitimate.
    """
    for path, m in module.named_modules():
        tensors = [(n, "Parameter", t) for n, t in m.named_parameters(recurse=False)]
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            tensors += [("running_mean", "Statistic", m.running_mean)]
            tensors += [("running_var", "Statistic", m.running_var)]
        for name, what, t in tensors:
            if t is None or not t.is_floating_point():
                continue
            bad = ~torch.isfinite(t.detach())
            if not bad.any():
                continue
            first = tuple(torch.nonzero(bad)[0].tolist())
            value = float(t.detach()[first])
            qualified = f"{path}.{name}" if path else name
            n_nan = int(torch.isnan(t.detach()).sum())
            raise NonFiniteError(
                f"{what} '{qualified}' of {type(m).__name__} '{path or '<top level>'}' holds "
                f"{n_nan} NaN and {int(bad.sum()) - n_nan} infinite value(s) out of "
                f"{t.numel()} (first: {value} at index {first}). Channels cannot be ranked or "
                "pruned from non-finite weights, and the pruned model would be as broken as this "
                "one. Fix the checkpoint (or the training run that wrote it) and try again."
            )


def _layers_of(analysis: Analysis, group: str) -> list[str]:
    """The layers (module paths) whose inputs or outputs belong to ``group``."""
    spaces = analysis.spaces
    gid = [g.name for g in spaces.groups].index(group)
    out = []
    for rec in spaces.layers:
        if rec.target not in out and (
            gid in spaces.groups_of(rec.in_units) or gid in spaces.groups_of(rec.out_units)
        ):
            out.append(rec.target)
    return out


def _check_scores(analysis: Analysis, scores: dict[str, np.ndarray], method: str) -> None:
    """Raise :class:`NonFiniteError` if any score is NaN or infinite, naming group and layers."""
    for name, s in scores.items():
        bad = np.flatnonzero(~np.isfinite(s))
        if not bad.size:
            continue
        layers = _layers_of(analysis, name)
        raise NonFiniteError(
            f"The {method} importance of group '{name}' is {s[bad[0]]} at index {bad[0]} "
            f"({bad.size} of {s.size} indices non-finite) although every weight is finite: the "
            f"weights (or gradients) of its layers ({', '.join(layers[:6])}"
            f"{'...' if len(layers) > 6 else ''}) are too large to score in float32. Check the "
            "checkpoint, or rescale those layers."
        )


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
    """Per group name, a non-negative score per index (higher = more important).

    Raises:
        NonFiniteError: a weight is NaN or infinite, or a score overflows.
    """
    check_finite_weights(analysis.gm)
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
    named = {analysis.spaces.groups[gid].name: s for gid, s in scores.items()}
    _check_scores(analysis, named, "l2-magnitude")
    return named


IMPORTANCE_METHODS = ("auto", "taylor", "magnitude")


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

    Raises:
        NonFiniteError: a weight is NaN or infinite (before any batch runs), or a batch gives a
            non-finite gradient (named with the batch; later batches are not run).
    """
    import copy

    check_finite_weights(analysis.gm)
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
    problem = ""  # the first non-finite gradient seen here (other ranks may see none)
    for batch in data:
        if max_batches is not None and batches >= max_batches:
            break
        inputs, target = split_batch(batch)
        gm.zero_grad(set_to_none=True)
        out = gm(*inputs)
        loss = loss_fn(out, target)
        loss.backward()
        with torch.no_grad():
            for acc, (kind, rec) in zip(sums, layers, strict=True):
                m = gm.get_submodule(rec.target)
                if kind == "bn":
                    if m.weight is None or m.weight.grad is None:
                        continue
                    part = (m.weight.grad * m.weight + m.bias.grad * m.bias).abs().double()
                elif m.weight.grad is not None:
                    w = m.weight
                    part = (w.grad * w).reshape(w.shape[0], -1).sum(1).abs().double()
                else:
                    continue
                if not problem and not torch.isfinite(part).all():
                    problem = _gradient_problem(batches, rec.target, m, loss)
                acc += part
        batches += 1
        # Stop at the first bad batch; the non-finite sums carry it through the all-reduce, so
        # every rank raises instead of waiting for this one.
        if problem:
            break
    if batches == 0:
        raise ValueError("taylor_scores needs at least one batch of data")
    count = torch.tensor([float(batches)], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flat = torch.cat([*sums, count])
        torch.distributed.all_reduce(flat)
        parts = torch.split(flat, [len(s) for s in sums] + [1])
        sums, count = list(parts[:-1]), parts[-1]
    if problem or not all(bool(torch.isfinite(acc).all()) for acc in sums):
        raise NonFiniteError(
            problem
            or "Taylor importance: another rank saw a non-finite gradient (its error names the "
            "batch and the parameter)."
        )
    per_layer = [
        (rec.out_units, (acc / count).numpy()) for acc, (_, rec) in zip(sums, layers, strict=True)
    ]
    scores = _to_group_scores(analysis, per_layer)
    _check_scores(analysis, scores, "taylor")
    return Importance(scores, "taylor", int(count.item()))


def _gradient_problem(batch: int, target: str, m: nn.Module, loss: torch.Tensor) -> str:
    """The error message for the first non-finite per-channel term of a Taylor batch."""
    names = [n for n, p in m.named_parameters(recurse=False) if p.grad is not None]
    bad = [n for n in names if not torch.isfinite(m.get_parameter(n).grad).all()]
    what = (
        f"a non-finite gradient of '{target}.{bad[0]}'"
        if bad
        else f"finite gradients of '{target}' whose products with the weights overflow"
    )
    return (
        f"Taylor importance: batch {batch} (counting from 0) gave {what} (loss "
        f"{float(loss.detach()):.4g}). Check that batch's inputs and targets and loss_fn (a NaN "
        "or infinite loss, or one scaled too large), or leave out data to score by weight "
        "magnitude."
    )


NORMALIZATIONS = ("none", "mean")


def normalize_scores(importance: Importance, how: str) -> Importance:
    """Scores made comparable across groups.

    ``"none"`` keeps them as measured: a group's worth is its summed score, so groups whose
    channels score low as a whole (first-order Taylor is near zero where a trained model's loss
    is flat) are cut far more than their neighbours. ``"mean"`` divides every group's scores by
    their mean, as Torch-Pruning's importance normaliser does: every group is worth its channel
    count, and scores only rank channels within their group.
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")
    if how == "none":
        return importance
    scores = {}
    for name, s in importance.scores.items():
        mean = float(np.mean(s)) if len(s) else 0.0
        scores[name] = s / mean if mean > 0 else np.ones_like(s)
    return Importance(scores, f"{importance.method}, mean-normalised", importance.batches)


def channel_importance(
    analysis: Analysis,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    max_batches: int | None = None,
    method: str = "auto",
) -> Importance:
    """Channel importance by ``method``: ``"auto"`` is Taylor when ``data`` and ``loss_fn`` are
    given, else L2 magnitude; ``"taylor"`` needs both; ``"magnitude"`` ignores them."""
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"method must be one of {IMPORTANCE_METHODS}, got {method!r}")
    if method == "taylor" and (data is None or loss_fn is None):
        raise ValueError("Taylor importance needs data and loss_fn(output, target)")
    if data is not None and method != "magnitude":
        if loss_fn is None:
            raise ValueError("data-driven importance needs loss_fn(output, target) -> scalar loss")
        return taylor_scores(analysis, data, loss_fn, max_batches=max_batches)
    return Importance(magnitude_scores(analysis), "l2-magnitude")
