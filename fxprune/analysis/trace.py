"""Trace a model into a GraphModule with tensor shapes in ``node.meta``.

The user's model is deep-copied first and never mutated. Tracing happens in eval mode, so Python
branches on ``self.training`` (torchvision's stochastic depth, aux heads) resolve to inference;
leaf modules such as BatchNorm and Dropout keep their own train/eval behaviour in the result.
"""

from __future__ import annotations

import copy
import inspect
import operator
import os
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxprune.core.errors import ShapeError, TraceError
from fxprune.core.meta import MODULE_PATH

__all__ = [
    "BoundInputs",
    "ExampleInputs",
    "as_input_tuple",
    "bind_inputs",
    "propagate_shapes",
    "trace",
]


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
        self.branched_on: fx.Node | None = None  # the value Python control flow asked about

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

    def to_bool(self, obj: fx.Proxy) -> bool:
        self.branched_on = obj.node  # `if proxy:`, `while proxy:`, `proxy and ...`
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy):  # type: ignore[override]
        self.branched_on = obj.node  # `for v in proxy:` with a length fx cannot know
        return super().iter(obj)


#: what ``example_inputs`` may be: one tensor, one tensor per positional argument, or keyword
#: arguments by name (tensors are inputs; other values are constants baked into the graph)
ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any]


@dataclass(frozen=True)
class BoundInputs:
    """``example_inputs`` bound to a forward signature.

    ``tensors`` are the graph's inputs in signature order (the order of its placeholders);
    ``constants`` are the arguments fixed at trace time: defaults of optional arguments that
    were not given (timm's ``attn_mask=None``, ``is_causal=False``) and non-tensor values that
    were given by keyword.
    """

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    constants: dict[str, Any] = field(default_factory=dict)
    #: the tensors are the forward's leading positional arguments and every constant is a
    #: default: a positional call ``model(*tensors)`` means the same
    positional: bool = True


def as_input_tuple(
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Accept a single tensor or a sequence of tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, Sequence) or isinstance(example_inputs, str):
        raise TypeError(
            f"example_inputs is a {type(example_inputs).__name__}: pass a tensor, a sequence "
            "of tensors (one per forward argument) or a dict of keyword tensors (e.g. "
            "torch.randn(1, 3, 224, 224))"
        )
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"example_inputs[{i}] is a {type(t).__name__}, not a tensor: pass one example "
                "tensor per forward argument (e.g. torch.randn(1, 3, 224, 224), not its shape)"
            )
    return tuple(example_inputs)


def bind_inputs(model: nn.Module, example_inputs: ExampleInputs) -> BoundInputs:
    """Bind ``example_inputs`` to ``model.forward``'s parameters, as a call would.

    Positional tensors fill the leading parameters, a dict fills parameters by name; an
    optional parameter not given keeps its default and is not an input. A forward taking
    ``*args`` / ``**kwargs`` (or one whose signature cannot be read) takes the tensors as given.

    Raises:
        TypeError: a value is not a tensor where one is needed, a key names no parameter, or
            a required parameter has no example.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
    if isinstance(example_inputs, Mapping):
        return _bind_keywords(params, dict(example_inputs), variadic)
    tensors = as_input_tuple(example_inputs)
    if variadic or not params:
        return BoundInputs(tuple(p.name for p in params[: len(tensors)]), tensors)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(tensors) > len(positional):
        raise TypeError(
            f"{len(tensors)} example inputs were given but forward takes at most "
            f"{len(positional)} positional argument(s) ({', '.join(p.name for p in positional)})"
        )
    given = dict(zip((p.name for p in positional), tensors, strict=False))
    return _bind_keywords(params, given, variadic)


def _bind_keywords(params: list[inspect.Parameter], given: dict[str, Any], variadic: bool):
    names = [p.name for p in params]
    unknown = [k for k in given if k not in names]
    if unknown and not variadic:
        raise TypeError(
            f"example_inputs has key {unknown[0]!r}, which names no argument of forward "
            f"({', '.join(names)}): use the forward's argument names"
        )
    order = [n for n in names if n in given] + unknown
    constants = {n: given[n] for n in order if not isinstance(given[n], torch.Tensor)}
    for p in params:
        if p.name in given or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(
                f"forward's argument {p.name!r} has no default and no example: pass a tensor "
                f"for it (by position, or as example_inputs={{{p.name!r}: tensor, ...}})"
            )
        constants[p.name] = p.default
    if constants and variadic:
        raise TypeError(
            f"forward takes *args/**kwargs, so a non-tensor value ({next(iter(constants))!r}) "
            "cannot be fixed at trace time: pass tensors only"
        )
    inputs = [n for n in order if n not in constants]
    leading = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = inputs == leading[: len(inputs)] and all(n not in given for n in constants)
    return BoundInputs(tuple(inputs), tuple(given[n] for n in inputs), constants, positional)


def trace(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    leaf_modules: Iterable[type | str] | None = None,
) -> fx.GraphModule:
    """Symbolically trace a copy of ``model`` and propagate shapes from ``example_inputs``.

    Args:
        model: any ``nn.Module``; it is copied, never modified.
        example_inputs: tensors with the deployment's rank and a representative size: one
            tensor, one per positional argument, or a dict by argument name (see
            :func:`bind_inputs`). Optional arguments not given keep their defaults, fixed in
            the graph; the graph's inputs are the given tensors, in signature order.
        leaf_modules: module classes or qualified names to keep opaque (not traced into).
            fxprune freezes the channels such a module touches, so this is the escape hatch for
            modules with data-dependent control flow. The top-level module cannot be a leaf;
            a function registered with ``torch.fx.wrap`` is the same escape hatch inside it.

    Returns:
        A GraphModule whose nodes carry ``tensor_meta`` (shape, dtype) and the module path.

    Raises:
        TraceError: the real cause first, then the module and source line that stopped
            tracing (or the node whose op failed on the example inputs), and what to do.
    """
    bound = bind_inputs(model, example_inputs)
    leaf_types = tuple(m for m in (leaf_modules or ()) if isinstance(m, type))
    leaf_names = frozenset(m for m in (leaf_modules or ()) if isinstance(m, str))
    root = copy.deepcopy(model).eval()
    tracer = _PathTracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(root, concrete_args=bound.constants or None)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        raise TraceError(_trace_failure(root, tracer, exc)) from exc
    _drop_constant_inputs(graph, root, bound)
    # A pickled GraphModule records its graph's tracer class and re-traces its code with it
    # when loaded (keeping every submodule a leaf, whatever the class). Record none: a saved
    # model then loads wherever torch and the model's own module classes import.
    graph._tracer_cls = None
    gm = fx.GraphModule(root, graph, root.__class__.__name__)
    propagate_shapes(gm, bound.tensors, root)
    return gm


#: the guards fx adds on an argument fixed by ``concrete_args`` (``x is None``, ``x == value``)
_GUARDS = frozenset({torch.fx._symbolic_trace._assert_is_none, torch._assert, operator.eq})


def _drop_constant_inputs(graph: fx.Graph, root: nn.Module, bound: BoundInputs) -> None:
    """Remove the placeholders of arguments fixed at trace time, and fx's guards on them.

    fx keeps a placeholder per ``concrete_args`` entry, checked by ``_assert_is_none`` /
    ``_assert(x == value)``: the graph would take, and check, an argument the user never
    passes. The value is baked in, so the placeholder and its guards go; any other use of it
    gets the constant.
    """
    if not bound.constants:
        return
    params = [p.name for p in inspect.signature(root.forward).parameters.values()]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(params, placeholders, strict=False):
        if name not in bound.constants:
            continue
        for guard in _guard_chain(node):
            graph.erase_node(guard)
        node.replace_all_uses_with(bound.constants[name])  # type: ignore[arg-type]
        graph.erase_node(node)
    graph.lint()


def _guard_chain(node: fx.Node) -> list[fx.Node]:
    """The guard nodes hanging off ``node``, users before what they use (erasable in order)."""
    chain: list[fx.Node] = []
    todo = [u for u in node.users if u.op == "call_function" and u.target in _GUARDS]
    while todo:
        n = todo.pop()
        if n in chain or any(u.target not in _GUARDS for u in n.users):
            continue
        chain.append(n)
        todo.extend(n.users)
    ordered = sorted(chain, key=lambda n: list(n.graph.nodes).index(n), reverse=True)
    return [n for n in ordered if all(u in chain for u in n.users)]


# what a shape-only condition is computed from: sizes, never tensor contents
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
_SHAPE_ATTRS = frozenset({"shape", "ndim"})


def _is_size(n: fx.Node) -> bool:
    """``x.size(...)``, ``x.dim()``, ``x.numel()``, ``x.shape``, ``x.ndim``."""
    if n.op == "call_method":
        return n.target in _SHAPE_METHODS
    return n.op == "call_function" and n.target is getattr and n.args[1] in _SHAPE_ATTRS


def _reads_only_shapes(node: fx.Node) -> bool:
    """Whether ``node``'s value follows from tensor sizes alone (``x.shape[1] == 3``)."""
    seen: dict[fx.Node, bool] = {}

    def visit(n: fx.Node) -> bool:
        if n not in seen:
            if _is_size(n):
                seen[n] = True
            elif n.op in ("placeholder", "get_attr", "call_module") or not n.all_input_nodes:
                seen[n] = False  # a tensor (or a value fx cannot see into)
            else:
                seen[n] = all(visit(i) for i in n.all_input_nodes)
        return seen[n]

    return visit(node)


def _user_line(exc: BaseException) -> str:
    """The innermost line of the user's code in ``exc``'s traceback: ``file:line: `code```."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fxprune/
    skip = (os.path.dirname(torch.__file__) + os.sep, package + os.sep)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


def _trace_failure(root: nn.Module, tracer: _PathTracer, exc: Exception) -> str:
    """Why tracing stopped, where, and what to do: the message of the TraceError raised."""
    where = tracer.failed_at
    kind = type(root.get_submodule(where) if where else root).__name__
    subject = f"module '{where}' ({kind})" if where else f"the top-level forward of {kind}"
    if where:
        opaque = (
            f"Keep that module opaque with `leaf_modules=[{kind}]` or `leaf_modules=['{where}']` "
            "(fxprune then freezes the channels it touches)"
        )
    else:  # the root is always traced: it cannot be a leaf
        opaque = (
            "The top-level module cannot be kept opaque: move that code into a submodule and "
            "pass it in `leaf_modules`, or (if it calls no submodule) into a module-level "
            "function registered with `torch.fx.wrap`, which fx records as one opaque call "
            "(fxprune then freezes the channels it touches)"
        )
    line = _user_line(exc)
    branch = tracer.branched_on
    is_branch = isinstance(exc, fx.proxy.TraceError) and branch is not None
    if is_branch and _reads_only_shapes(branch):
        return (
            f"{subject} branches on a tensor's shape{line}. torch.fx traces sizes as symbolic "
            f"values too, so it cannot follow Python control flow on them. {opaque}; or decide "
            "the branch outside the traced code (a constructor argument, or a constant if that "
            "size is fixed for deployment; not a channel count, which pruning changes)."
        )
    if is_branch:
        return (
            f"{subject} branches on tensor values{line}. torch.fx records operations "
            "symbolically and cannot follow Python control flow that depends on what a tensor "
            f"holds. {opaque}; or compute both branches and select with torch.where."
        )
    return (
        f"{type(exc).__name__}: {exc}\n(raised while torch.fx traced {subject}{line}). fx "
        "records operations on symbolic values and cannot run Python conversions or control "
        f"flow that need real ones. {opaque}; or make that code traceable."
    )


class _ShapeProp(fx.Interpreter):
    """ShapeProp's ``tensor_meta`` on every node, remembering the node that failed.

    torch's ShapeProp prints a traceback and re-raises a wrapper that buries the op's message
    under the node's metadata; this raises the op's own exception, untouched.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # keep the op's message as it is
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        tensors = False

        def extract(obj: Any) -> Any:
            nonlocal tensors
            if isinstance(obj, torch.Tensor):
                tensors = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if tensors:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], root: nn.Module) -> None:
    """Run ``gm`` on ``inputs`` and record every node's ``tensor_meta``; ``root`` is the module
    the graph was captured from (it names the module of a failing node).

    Raises:
        TraceError: the input count does not match the graph's; ShapeError (a TraceError): an
            op failed on the inputs (naming it).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise TraceError(  # fx's reading of the signature: the export front end may take it
            f"The model's forward takes {len(placeholders)} tensor input(s) "
            f"({', '.join(p.name for p in placeholders)}) but {len(inputs)} example input(s) were "
            "given. Pass one example tensor per forward argument."
        )
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            prop.run(*inputs)
    except Exception as exc:
        raise ShapeError(_shape_failure(root, prop.failed, inputs, exc)) from exc


def _shape_failure(
    root: nn.Module, node: fx.Node | None, inputs: tuple[torch.Tensor, ...], exc: Exception
) -> str:
    shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
    where = ""
    if node is not None:
        path = str(node.target) if node.op == "call_module" else node.meta.get(MODULE_PATH, "")
        try:
            kind = type(root.get_submodule(path)).__name__  # gm keeps only leaves
        except AttributeError:  # a path of the user's model the captured graph does not hold
            kind = "module"
        module = f"module '{path}' ({kind})" if path else f"the top-level forward ({kind})"
        where = f" at node {node.name} in {module}: {node.format_node()}"
    return (
        f"{type(exc).__name__}: {exc}\n(raised running the traced graph on the example "
        f"input(s) {shapes}{where}). Check that the example inputs have the shape and dtype "
        "the model expects: channels, image size (e.g. ViT needs its exact size), batch."
    )


__all__ += ["refresh_shapes"]  # declared beside the function, appended after the tracer


def refresh_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Propagate shapes through ``gm`` again, so every node's ``tensor_meta`` is current.

    Runs :class:`~torch.fx.passes.shape_prop.ShapeProp` in eval mode without autograd, so
    BatchNorm statistics are not updated, then restores every module's training flag. Stale
    entries are dropped first: a node whose output is not a tensor carries none. Passes that
    change a graph's shapes (the rewrite, segments) call it.
    """
    from torch.fx.passes.shape_prop import ShapeProp  # imported here: this edit stays local

    from fxprune.core.meta import TENSOR_META

    for node in gm.graph.nodes:
        node.meta.pop(TENSOR_META, None)
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, training in modes:
            m.training = training
