"""Trace a model into a GraphModule with tensor shapes in ``node.meta``.

The user's model is deep-copied first and never mutated. Tracing happens in eval mode, so Python
branches on ``self.training`` (torchvision's stochastic depth, aux heads) resolve to inference;
leaf modules such as BatchNorm and Dropout keep their own train/eval behaviour in the result.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.core.errors import TraceError
from fxprune.core.meta import MODULE_PATH

__all__ = ["as_input_tuple", "trace"]


class _PathTracer(fx.Tracer):
    """A Tracer that remembers which module it is inside, to name it when tracing fails.

    Its arguments have defaults: unpickling a GraphModule re-traces its code with a no-argument
    instance of the graph's tracer class (``trace`` records none, but a graph traced with this
    class directly would carry it).
    """

    def __init__(
        self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self.path: list[str] = []
        self.failed_at: str | None = None  # innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types) or module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path[-1]
            raise
        finally:
            self.path.pop()

    def create_node(self, *args, **kwargs) -> fx.Node:  # type: ignore[override]
        node = super().create_node(*args, **kwargs)
        node.meta[MODULE_PATH] = self.path[-1] if self.path else ""
        return node


def as_input_tuple(
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Accept a single tensor or a sequence of tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def trace(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    leaf_modules: Iterable[type | str] | None = None,
) -> fx.GraphModule:
    """Symbolically trace a copy of ``model`` and propagate shapes from ``example_inputs``.

    Args:
        model: any ``nn.Module``; it is copied, never modified.
        example_inputs: tensors with the deployment's rank and a representative size.
        leaf_modules: module classes or qualified names to keep opaque (not traced into).
            fxprune freezes the channels such a module touches, so this is the escape hatch for
            modules with data-dependent control flow.

    Returns:
        A GraphModule whose nodes carry ``tensor_meta`` (shape, dtype) and the module path.

    Raises:
        TraceError: naming the module and op that stopped tracing, and what to do about it.
    """
    inputs = as_input_tuple(example_inputs)
    leaf_types = tuple(m for m in (leaf_modules or ()) if isinstance(m, type))
    leaf_names = frozenset(m for m in (leaf_modules or ()) if isinstance(m, str))
    root = copy.deepcopy(model).eval()
    tracer = _PathTracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        where = tracer.failed_at or "<top level>"
        kind = type(root.get_submodule(where)).__name__ if tracer.failed_at else type(root).__name__
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: inside module '{where}' ({kind}) "
            f"the forward did `{exc}` ({type(exc).__name__}). fx records operations on symbolic "
            f"values and cannot follow Python control flow or conversions that depend on tensor "
            f"values. Either keep that module opaque with "
            f"`leaf_modules=[{kind if tracer.failed_at else 'YourModule'}]` or `leaf_modules=['{where}']` (fxprune then "
            f"freezes the channels it touches) or make its forward traceable (e.g. use "
            f"torch.where instead of `if tensor:`)."
        ) from exc
    # A pickled GraphModule records its graph's tracer class and re-traces its code with it
    # when loaded (keeping every submodule a leaf, whatever the class). Record none: a saved
    # model then loads wherever torch and the model's own module classes import.
    graph._tracer_cls = None
    gm = fx.GraphModule(root, graph, root.__class__.__name__)
    _propagate_shapes(gm, inputs)
    return gm


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise TraceError(
            f"The model's forward takes {len(placeholders)} tensor input(s) "
            f"({', '.join(p.name for p in placeholders)}) but {len(inputs)} example input(s) were "
            "given. Pass one example tensor per forward argument."
        )
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise TraceError(
            f"Running the traced graph on the example inputs failed: {exc}. Check that the "
            "example inputs have the shape and dtype the model expects (e.g. ViT needs its "
            "exact image size)."
        ) from exc
