"""Optional adapter around the UPSCALE authors' exporter (``pip install apple-upscale``, 0.1.1).

UPSCALE (Wan et al., ICML 2023) exports *unconstrained* channel pruning: every consumer keeps
its own input-channel set, producers drop only the channels no consumer reads, and the
remaining mismatches are paid for with activation subselections, whose number the authors
minimise by reordering producer and consumer channels. That is the same problem fxprune's
channel ordering solves, so the bench compares the two on identical masks: *how many gathers,
over how many channels, does each export execute*.

The package is not a dependency of fxprune (it pins torch 2.0.1 and pulls seaborn, yacs and
ninja that its exporter never imports), so it is installed by hand with ``--no-deps`` and this
module imports it lazily; :func:`available` tells the bench whether to run the comparison.

Authors' API used (``upscale/pruning/manager.py``): ``PruningManager(net).compute([x],
pruned_inputs=[("<module>.weight", channel), ...])`` traces ``net`` with their ``Tracer``
tensor subclass and builds a ``PruningSpec``; ``.prune(is_not_ane=...)`` then slices the
weights in place and wraps each consumer that needs a subselection in
``nn.Sequential(Subselect(indices), module)``. Without ``pruned_inputs`` it would detect all-zero
weight columns *and rows*; we pass our masks explicitly so nothing else is inferred.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["authors_export", "available", "count_gathers"]


def available() -> bool:
    """True when ``apple-upscale`` imports (the bench skips the comparison otherwise).

    Imports rather than ``find_spec``: ``upscale`` is a generic top-level name, and the exporter's
    own modules are what must load under our torch.
    """
    try:
        from upscale import PruningManager  # noqa: F401
    except ImportError:
        return False
    return True


def _zero_input_columns(module: nn.Module, keep: np.ndarray) -> None:
    """Zero the weight columns of dropped input channels: exactly the masked model's output."""
    with torch.no_grad():
        module.weight[:, torch.from_numpy(~keep)] = 0


def _masked_forward(
    net: nn.Module, example: torch.Tensor, masks: Mapping[str, np.ndarray]
) -> torch.Tensor:
    """``net(example)`` with the masked input channels zeroed by pre-hooks (the oracle)."""
    modules = dict(net.named_modules())

    def hook_for(mod: nn.Module, keep: np.ndarray) -> Callable:
        k = torch.from_numpy(np.asarray(keep, dtype=bool))
        if isinstance(mod, nn.Linear):  # features are the last axis
            return lambda _m, a: (a[0] * k.to(a[0].dtype),)
        return lambda _m, a: (a[0] * k.to(a[0].dtype).view(1, -1, *[1] * (a[0].dim() - 2)),)

    handles = [
        modules[n].register_forward_pre_hook(hook_for(modules[n], k)) for n, k in masks.items()
    ]
    try:
        with torch.no_grad():
            return net(example)
    finally:
        for h in handles:
            h.remove()


def _check_close(name: str, got: object, expected: object) -> None:
    """Raise unless every output tensor matches the masked model.

    ``allclose(rtol=1e-3, atol=1e-4)``, with atol scaled down for outputs far below 1:
    randomly initialised torchvision nets in eval mode can output ~1e-9 (MobileNetV2), where
    a fixed atol of 1e-4 would accept anything.
    """
    g, e = tree_leaves(got), tree_leaves(expected)
    if len(g) != len(e):
        raise RuntimeError(f"UPSCALE export of {name} returns {len(g)} outputs, the model {len(e)}")
    for a, b in zip(g, e, strict=True):
        if not isinstance(b, torch.Tensor):
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * min(1.0, scale)):
            err = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            raise RuntimeError(
                f"UPSCALE export of {name} differs from the masked model "
                f"(shape {tuple(a.shape)} vs {tuple(b.shape)}, max abs error {err:.3g}, output scale {scale:.3g})"
            )


def authors_export(
    model: nn.Module,
    example: torch.Tensor,
    input_masks: Mapping[str, np.ndarray],
    *,
    is_not_ane: bool = True,
    check: bool = True,
) -> nn.Module:
    """Run the authors' unconstrained exporter on a deep copy of ``model`` (eval mode).

    ``input_masks`` maps a conv/linear module name to a boolean keep-mask over its input
    channels. The result computes ``model`` with those input channels zeroed.

    ``is_not_ane=True`` (default here; the authors' GPU setting) makes every non-contiguous
    subselection one advanced-indexing op, i.e. one gather, which is what fxprune emits and what
    :func:`count_gathers` counts. The authors' default (``False``, for the Apple Neural Engine)
    emits the same copies as a ``cat`` of slices instead, which no gather count would see.

    A module that reads the network input is not a "consumer" to UPSCALE (the image cannot be
    pruned) and its exporter asserts on it; such masks are applied by zeroing the weight columns
    instead, and their names are left in ``exported.upscale_unpruned`` so callers can tell.

    The copy is traced in eval mode: their tracer runs a real forward pass, which in train mode
    would update BatchNorm running statistics. Any failure inside the exporter is re-raised as a
    ``RuntimeError`` naming the model, so the bench can record it and carry on. With ``check``
    (default) the export is also run on ``example`` and compared with the masked model
    (see :func:`_check_close`): the exporter can return a model that does not run or
    computes something else without raising (non-depthwise grouped convs, e.g. RegNet, are
    rewritten as if depthwise), and such a result must not be benchmarked.
    """
    try:
        from upscale import PruningManager
        from upscale.pruning.resolve import get_producers_consumers
        from upscale.pruning.tracing import trace
    except ImportError as e:  # pragma: no cover - optional dependency
        raise RuntimeError(
            "apple-upscale is not installed (pip install apple-upscale --no-deps)"
        ) from e

    name = type(model).__name__
    net = copy.deepcopy(model).eval()
    modules = dict(net.named_modules())
    for key, keep in input_masks.items():
        mod = modules.get(key)
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"{key!r} is not a Conv2d/Linear of {name}")
        if np.shape(keep) != (mod.weight.shape[1],):
            raise ValueError(
                f"mask for {key!r} has shape {np.shape(keep)}, want ({mod.weight.shape[1]},)"
            )
    expected = _masked_forward(net, example, input_masks) if check else None
    try:
        with torch.no_grad():
            # Trace once ourselves to learn which modules UPSCALE accepts as consumers.
            traced = trace(net, [example])
            _, consumers = get_producers_consumers(traced)
            consumer_params = {
                getattr(p, "_metadata", {}).get("name")
                for tid in consumers
                for p in traced.tensor_to_metadata[tid].non_tracers
            }
            pruned_inputs: list[tuple[str, int]] = []
            unpruned: list[str] = []
            for key, keep in input_masks.items():
                keep = np.asarray(keep, dtype=bool)
                if keep.all():
                    continue
                if f"{key}.weight" in consumer_params:
                    pruned_inputs += [(f"{key}.weight", int(c)) for c in np.flatnonzero(~keep)]
                else:
                    _zero_input_columns(modules[key], keep)
                    unpruned.append(key)
            manager = PruningManager(net)
            manager.traced = traced  # reuse the trace; compute() would otherwise trace again
            manager.compute([example], pruned_inputs=pruned_inputs)
            manager.prune(is_not_ane=is_not_ane)
            got = net(example) if check else None
    except Exception as e:
        raise RuntimeError(f"UPSCALE export failed on {name}: {type(e).__name__}: {e}") from e
    if check:
        _check_close(name, got, expected)
    net.upscale_unpruned = unpruned  # type: ignore[assignment]
    return net


# aten ops that copy an activation through an index tensor (advanced indexing lowers to
# aten.index.Tensor; torch.index_select / torch.gather to their own ops).
_GATHER_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_select.default,
    torch.ops.aten.gather.default,
    torch.ops.aten.take.default,
}


class _GatherCounter(TorchDispatchMode):
    """Counts gathers at the aten level, i.e. what actually executes, whatever built the module."""

    def __init__(self, constants: set[int]) -> None:
        super().__init__()
        self.constants = constants
        self.gathers = 0
        self.channels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GATHER_OPS and args[0].untyped_storage().data_ptr() not in self.constants:
            if func is torch.ops.aten.index.Tensor:
                n = sum(int(i.numel()) for i in args[1] if i is not None)
            elif func is torch.ops.aten.gather.default:
                n = int(args[2].shape[args[1]])
            else:
                n = (
                    int(args[2].numel())
                    if func is torch.ops.aten.index_select.default
                    else int(args[1].numel())
                )
            self.gathers += 1
            self.channels += n
        return func(*args, **kwargs)


def count_gathers(module: nn.Module, example: torch.Tensor) -> dict:
    """Gathers that ``module`` executes on ``example``: ``{"gathers", "gathered_channels"}``.

    Counted with a ``TorchDispatchMode`` over one no-grad forward pass rather than an fx trace
    or ONNX export, so it sees exactly the ops that run (UPSCALE's ``Subselect`` and fxprune's
    ``GraphModule`` alike) without either having to trace or export. A gather is an
    ``aten.index.Tensor`` / ``index_select`` / ``gather`` / ``take`` whose data input is an
    activation, not a parameter or buffer of ``module`` (those are weights, e.g. an embedding
    lookup). Gathered channels is the number of indices, summed over those ops (for
    ``gather``, the index extent along ``dim``). Slices (``narrow``/basic indexing) are views,
    not counted. The module runs in eval mode and its training flag is restored.
    """
    constants = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    counter = _GatherCounter(constants)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), counter:
            module(example)
    finally:
        module.train(was_training)
    return {"gathers": counter.gathers, "gathered_channels": counter.channels}
