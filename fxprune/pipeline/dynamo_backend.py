"""``fxprune.backend``: prune inside ``torch.compile``, as a dynamo backend, then hand on.

``torch.compile(model, backend=fxprune.backend(budget=0.5))`` (or, by name,
``torch.compile(model, backend="fxprune", options={"budget": 0.5})``) prunes every graph dynamo
captures to the latency budget, or applies a saved plan, and compiles the pruned graph with the
next backend (``then``: ``"inductor"`` by default, ``"eager"``, any registered backend name or a
backend callable).

**For inference.** The pruned weights are owned by the compiled artefact: they are copies taken
when the graph was captured, so training the model afterwards does not change what the compiled
function computes, and the model's own parameters are never modified. To fine-tune a pruned
model, use :func:`fxprune.compile` (it returns a pruned ``nn.Module`` and its plan), train that,
and compile it with ``torch.compile`` as any model.

How a captured graph becomes one fxprune can analyse: dynamo passes parameters and buffers as
graph inputs (placeholders, the module hierarchy inlined). Each placeholder whose source is a
module's parameter or buffer becomes a ``get_attr`` on a module tree rebuilt from the source
paths (``L['self']._modules['conv1']._parameters['weight']`` → ``conv1.weight``), holding the
real tensor dynamo passed as the example; the other placeholders stay inputs. That graph goes
through the same analysis and :func:`~fxprune.pipeline.compile.compile` as any model (or
:func:`~fxprune.rewrite.api.prune` with a plan), and the pruned graph is compiled by ``then`` at
the user inputs alone. The function handed back to dynamo takes dynamo's full argument list
(parameters included, in its order) and passes only the user inputs on.

Graph breaks: each captured graph is pruned on its own. What crosses a break is a graph input
or output, and fxprune keeps a graph's inputs and outputs whole, so the channels that cross a
break are frozen. Every graph's outcome is a :class:`GraphRecord` in :attr:`FxpruneBackend.graphs`
(pruned, skipped and why, what was frozen) and is logged (logger ``fxprune``). By name
(``backend="fxprune"``), dynamo builds no object the caller holds: the records of every graph
the name received are kept in this module instead, read with :func:`last_records` and dropped
with :func:`clear_records` (they hold each graph's :class:`~fxprune.CompileResult`, pruned
model and latency tables included, until then).

A graph is handed on unpruned, with the reason recorded, when it has no parameters or no
prunable channel group, when it was captured in training mode (batch statistics, dropout), when
its budget cannot be reached or a plan does not fit it, and when dynamo made a size symbolic.
That last one is what ``torch.compile``'s default (``dynamic=None``) does on the first call at a
new input shape: the recompiled graph takes the changed sizes as ``SymInt`` inputs, and it runs
*dense* (a warning, and a ``"skipped"`` record saying why). Its node names are those of the
static graph (seen on a small CNN), so the first graph's plan could in principle be applied
to it, but fxprune analyses, prunes and times a graph at concrete shapes, and a graph taking
``SymInt`` inputs (its tensors arrive at the new shape) is not pruned here. Pass
``dynamic=False`` to ``torch.compile`` so each input shape gets a static graph, pruned on its own
(each solved again, or the same ``plan=`` applied to each). Where a graph is handed on unpruned
and that is not what the caller asked for, the record is logged as a warning.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxprune.analysis import Analysis, analyze
from fxprune.analysis.channel_rules import DEFAULT_ATTENTION
from fxprune.backends import Backend
from fxprune.core.errors import ConfigError
from fxprune.core.plan import Plan
from fxprune.pipeline.compile import compile as fxprune_compile
from fxprune.pipeline.config import CompileConfig
from fxprune.pipeline.result import Budget, CompileResult
from fxprune.rewrite.api import prune

__all__ = [
    "BACKEND_NAME",
    "BackendOptions",
    "FxpruneBackend",
    "GraphRecord",
    "backend",
    "clear_records",
    "fxprune_backend",
    "last_records",
    "lift_parameters",
]

logger = logging.getLogger("fxprune")

#: the name the backend is registered under (``torch.compile(model, backend="fxprune")``)
BACKEND_NAME = "fxprune"

_PATH_PART = re.compile(r"\._(modules|parameters|buffers)\['([^']+)'\]")


@dataclass(frozen=True)
class GraphRecord:
    """What the backend did with one captured graph.

    Attributes:
        index: the graph's position among those this backend received (0 first).
        status: ``"pruned"``, ``"planned"`` (a saved plan applied), ``"dense"`` (the budget was
            already met, nothing pruned) or ``"skipped"`` (handed on unchanged).
        reason: why it was skipped (empty otherwise).
        inputs: the shapes of the graph's user inputs (parameters and buffers excluded).
        parameters: parameter and buffer tensors lifted out of the graph's inputs.
        groups: channel groups found, and how many of them are prunable.
        prunable: prunable channel groups.
        frozen: why channels were frozen (each distinct reason once; the graph's inputs and
            outputs, what crosses a graph break, among them).
        params: parameters before and after pruning.
        result: the compile result (``status == "pruned"`` or ``"dense"``), else None.
    """

    index: int
    status: str
    reason: str = ""
    inputs: tuple[tuple[int, ...], ...] = ()
    parameters: int = 0
    groups: int = 0
    prunable: int = 0
    frozen: tuple[str, ...] = ()
    params: tuple[int, int] = (0, 0)
    result: CompileResult | None = field(default=None, compare=False, repr=False)

    @property
    def pruned(self) -> bool:
        """The graph handed on is smaller than the captured one."""
        return self.status in ("pruned", "planned") and self.params[1] < self.params[0]

    def describe(self) -> str:
        """One line for the log."""
        head = f"graph {self.index}: {self.status}"
        if self.reason:
            return f"{head} ({self.reason})"
        return (
            f"{head}; {self.prunable}/{self.groups} groups prunable, params "
            f"{self.params[0]} → {self.params[1]}; {len(self.frozen)} frozen reasons"
        )


@dataclass(frozen=True)
class _Lifted:
    """A captured graph with its parameters turned into attributes of a module tree."""

    gm: fx.GraphModule
    #: positions (in dynamo's argument list) of the graph's user inputs, in order
    input_positions: tuple[int, ...]
    inputs: tuple[Any, ...]
    parameters: int


def lift_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> _Lifted:
    """``gm`` as dynamo captured it, its parameter/buffer placeholders as ``get_attr``.

    The new GraphModule's root is a tree of plain modules along the parameters' source paths,
    holding detached copies of the example tensors dynamo passed (so pruning never touches the
    user's model); its placeholders are the user inputs alone, in their original order.
    """
    root = nn.Module()
    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # the sources are read from the captured graph's own nodes: a graph copy drops dynamo's meta
    originals = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"fxprune backend: {len(placeholders)} placeholders but {len(example_inputs)} "
            "example inputs"
        )
    keep: list[int] = []
    taken: set[str] = set()
    lifted = 0
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        path = _state_path(originals[i], value)
        if path is None:
            keep.append(i)
            continue
        path = _unique(path, taken)
        taken.add(path)
        owner_path, _, name = path.rpartition(".")
        owner = _owner(root, owner_path)
        tensor = value.detach().clone()
        if isinstance(value, nn.Parameter):
            owner.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        else:
            owner.register_buffer(name, tensor)
        with graph.inserting_before(node):
            attr = graph.get_attr(path)
        attr.meta.update(node.meta)
        attr.meta.pop("grapharg", None)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        lifted += 1
    _move_get_attrs_after_placeholders(graph)
    out = fx.GraphModule(root, graph, class_name=gm.__class__.__name__)
    return _Lifted(out, tuple(keep), tuple(example_inputs[i] for i in keep), lifted)


def _state_path(node: fx.Node, value: Any) -> str | None:
    """The dotted path of a parameter/buffer placeholder (None: a user input)."""
    if not isinstance(value, torch.Tensor):
        return None
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = _source_name(source)
    parts = _PATH_PART.findall(name)
    is_state = bool(parts) and parts[-1][0] in ("parameters", "buffers")
    if not is_state and not isinstance(value, nn.Parameter):
        return None
    if is_state:
        return ".".join(_clean(p) for _, p in parts)
    return f"_state.{_clean(node.name)}"  # a Parameter reached otherwise (a global, a closure)


def _source_name(source: Any) -> str:
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


def _clean(part: str) -> str:
    """A path component without dots (``Sequential``'s ``"0"`` stays, as in ``state_dict``)."""
    return re.sub(r"[^\w]", "_", part) or "_"


def _unique(path: str, taken: set[str]) -> str:
    if path not in taken:
        return path
    k = 1
    while f"{path}_{k}" in taken:
        k += 1
    return f"{path}_{k}"


def _owner(root: nn.Module, path: str) -> nn.Module:
    owner = root
    for part in path.split(".") if path else ():
        child = getattr(owner, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    return owner


def _move_get_attrs_after_placeholders(graph: fx.Graph) -> None:
    """Keep every placeholder first (fx requires placeholders before other nodes)."""
    nodes = list(graph.nodes)
    last = [n for n in nodes if n.op == "placeholder"]
    if not last:
        return
    anchor = last[-1]
    for n in nodes:
        if n.op == "get_attr" and nodes.index(n) < nodes.index(anchor):
            anchor.append(n)
            anchor = n


_HALF = Budget(fraction=0.5)


@dataclass(frozen=True)
class BackendOptions:
    """The settings of :func:`backend` (and of ``options=`` with ``backend="fxprune"``), checked
    when made.

    Attributes:
        budget: the latency budget each captured graph is pruned to (ignored with ``plan``).
        then: the backend the pruned graph is compiled with: a registered name or a callable.
        plan: a saved plan applied instead of solving (None: solve to ``budget``).
        config: :func:`fxprune.compile`'s settings (None: its defaults).
        latency_backend: the runtime the budget is measured on (a name or a backend).
        min_parameters: graphs with fewer parameter/buffer tensors are handed on unpruned.
    """

    budget: Budget | None = _HALF
    then: str | Callable[..., Any] = "inductor"
    plan: Plan | None = None
    config: CompileConfig | None = None
    latency_backend: str | Backend = "onnxruntime"
    min_parameters: int = 1

    def __post_init__(self) -> None:
        owner = "fxprune.backend"
        if self.plan is None and self.budget is None:
            raise ConfigError(f"{owner}: give a budget or a plan")
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise ConfigError(f"{owner}(budget=): a Budget, got {self.budget!r}")
        if self.plan is not None and not isinstance(self.plan, Plan):
            raise ConfigError(f"{owner}(plan=): a Plan or a path, got {self.plan!r}")
        if not (isinstance(self.then, str) or callable(self.then)):
            raise ConfigError(
                f"{owner}(then=): a backend name ('inductor', 'eager', ...) or a callable "
                f"(gm, example_inputs) -> callable, got {self.then!r}"
            )
        if self.config is not None and not isinstance(self.config, CompileConfig):
            raise ConfigError(f"{owner}(config=): a CompileConfig, got {self.config!r}")
        if not isinstance(self.min_parameters, int) or self.min_parameters < 0:
            raise ConfigError(f"{owner}(min_parameters=): an integer ≥ 0")


class FxpruneBackend:
    """A dynamo backend: prune each captured graph, then compile it with ``options.then``.

    Use through :func:`backend`. ``graphs`` lists every captured graph's :class:`GraphRecord`,
    in the order dynamo compiled them (a recompilation appends another).
    """

    def __init__(self, options: BackendOptions, graphs: list[GraphRecord] | None = None) -> None:
        self.options = options
        #: one record per graph received (``graphs``: a list to append to, shared by the
        #: by-name backend's calls; a graph's ``index`` is its position in it)
        self.graphs: list[GraphRecord] = [] if graphs is None else graphs

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        index = len(self.graphs)
        try:
            lifted = lift_parameters(gm, example_inputs)
        except Exception as exc:  # a graph fxprune cannot take: hand it on unchanged
            return self._skip(index, gm, example_inputs, f"not liftable: {exc}", (), warn=True)
        shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else () for t in lifted.inputs)
        skip = functools.partial(
            self._skip, index, gm, example_inputs, shapes=shapes, parameters=lifted.parameters
        )
        why, warn = self._unprunable(lifted)
        if why is not None:
            return skip(why, warn=warn)
        try:
            with _outside_dynamo():
                record, pruned = self._prune(index, lifted, shapes)
        except _NothingToPrune as exc:
            return skip(str(exc))
        except ConfigError:  # a bad setting is the caller's to fix, not a graph to skip
            raise
        except Exception as exc:  # (an unreachable budget, a plan for another graph, ...)
            return skip(f"not pruned: {type(exc).__name__}: {exc}", warn=True)
        self._record(record)
        compiled = _next_backend(self.options.then)(pruned, list(lifted.inputs))
        positions = lifted.input_positions

        def run(*args: Any) -> Any:
            return compiled(*[args[i] for i in positions])

        return run

    def _unprunable(self, lifted: _Lifted) -> tuple[str | None, bool]:
        """Why the graph is handed on unpruned (None: it is not), and whether to warn."""
        training = _training_op(lifted.gm)
        if training is not None:
            return (
                f"captured in training mode ({training}): the fxprune backend is for inference; "
                "call model.eval() first, or prune with fxprune.compile and fine-tune"
            ), True
        if lifted.parameters < self.options.min_parameters:
            return f"too small: {lifted.parameters} parameter tensors", False
        if not lifted.inputs:
            return "no tensor input", False
        if any(not isinstance(t, torch.Tensor) for t in lifted.inputs):
            return (
                "symbolic sizes among the inputs (dynamo made a dimension dynamic after a "
                "recompile at a new input shape): this graph runs dense, unpruned; compile with torch.compile(..., dynamic=False) so "
                "every input shape gets a static graph, pruned on its own"
            ), True
        return None, False

    def _prune(
        self, index: int, lifted: _Lifted, shapes: tuple[tuple[int, ...], ...]
    ) -> tuple[GraphRecord, fx.GraphModule]:
        from fxprune.pipeline.report import count_params

        inputs = tuple(t.detach() for t in lifted.inputs)
        options = self.options
        config = options.config
        leaf = config.leaf_modules if config is not None else None
        attention = config.attention if config is not None else DEFAULT_ATTENTION
        if options.plan is not None:  # what the plan's groups index
            attention = options.plan.attention
        analysis = analyze(lifted.gm, inputs, leaf_modules=leaf, attention=attention)
        base = {
            "index": index,
            "inputs": shapes,
            "parameters": lifted.parameters,
            "groups": len(analysis.groups),
            "prunable": sum(g.prunable for g in analysis.groups),
            "frozen": _frozen_reasons(analysis),
        }
        if base["prunable"] == 0:
            raise _NothingToPrune("no prunable channel group")
        if options.plan is not None:
            pruned = prune(analysis, options.plan)
            status, result = "planned", None
        else:
            result = fxprune_compile(
                lifted.gm,
                options.budget,
                example_inputs=inputs,
                backend=options.latency_backend,
                config=config,
            )
            pruned = result.model
            status = "dense" if result.dense_meets_budget else "pruned"
        for p in pruned.parameters():
            p.requires_grad_(False)
        params = (count_params(analysis.gm), count_params(pruned))
        return GraphRecord(status=status, params=params, result=result, **base), pruned

    def _skip(
        self,
        index: int,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        reason: str,
        shapes: tuple[tuple[int, ...], ...],
        parameters: int = 0,
        warn: bool = False,
    ) -> Callable[..., Any]:
        """Hand the captured graph on unchanged, recording why (a warning where it matters)."""
        record = GraphRecord(index, "skipped", reason=reason, inputs=shapes, parameters=parameters)
        if warn:
            logger.warning("fxprune backend: %s", record.describe())
        self._record(record, log=not warn)
        return _next_backend(self.options.then)(gm, list(example_inputs))

    def _record(self, record: GraphRecord, log: bool = True) -> None:
        self.graphs.append(record)
        if log:
            logger.info("fxprune backend: %s", record.describe())
        for why in record.frozen:
            logger.debug("fxprune backend: graph %d frozen: %s", record.index, why)

    def __repr__(self) -> str:
        o = self.options
        what = f"plan {o.plan.signature}" if o.plan is not None else f"budget {o.budget}"
        then = o.then if isinstance(o.then, str) else getattr(o.then, "__name__", "?")
        return f"FxpruneBackend({what}, then {then}, {len(self.graphs)} graphs)"


@contextlib.contextmanager
def _outside_dynamo() -> Iterator[None]:
    """Run fxprune's own tracing and timing as outside ``torch.compile``.

    A backend is called inside dynamo's tracing context (its fake mode and shape environment
    active): fxprune's fx trace, shape propagation and measurements must neither run on fake
    tensors nor leave guards in the shape environment of the frame being compiled.
    """
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), tracing(None):
        yield


_TRAINING_ARG = {F.batch_norm: (5, "training"), F.dropout: (2, "training")}


def _training_op(gm: fx.GraphModule) -> str | None:
    """The first op that runs in training mode (batch statistics, dropout), if any."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _TRAINING_ARG:
            continue
        index, name = _TRAINING_ARG[node.target]
        flag = node.kwargs.get(name, node.args[index] if len(node.args) > index else False)
        if flag is True:
            return f"{node.name}: {node.target.__name__}(training=True)"
    return None


class _NothingToPrune(Exception):
    """The graph has no prunable channel group (it is handed on unchanged)."""


def _frozen_reasons(analysis: Analysis) -> tuple[str, ...]:
    """Every distinct reason the analysis froze channels for."""
    reasons: list[str] = []
    for g in analysis.groups:
        for why in g.frozen:
            if why not in reasons:
                reasons.append(why)
    return tuple(reasons)


def _next_backend(then: str | Callable[..., Any]) -> Callable[..., Any]:
    """The backend callable for a name (dynamo's registry) or the callable itself."""
    if callable(then):
        return then
    from torch._dynamo import lookup_backend

    return lookup_backend(then)


def backend(
    budget: float | str | Budget | None = 0.5,
    *,
    then: str | Callable[..., Any] = "inductor",
    plan: Plan | str | os.PathLike | None = None,
    config: CompileConfig | None = None,
    latency_backend: str | Backend | None = None,
) -> FxpruneBackend:
    """A dynamo backend that prunes each captured graph, for ``torch.compile(backend=...)``.

    Args:
        budget: as :func:`fxprune.compile`'s ``latency_budget`` (a fraction of the dense
            graph's latency, or a time with a unit), for each captured graph on its own.
        then: the backend the pruned graph is compiled with: a registered name
            (``"inductor"``, ``"eager"``, …) or a backend callable ``(gm, example_inputs)``.
        plan: a saved :class:`~fxprune.Plan` (or its path) to apply instead of solving (the
            budget is then ignored); it must match the captured graph (a graph break makes
            several: the others are handed on unpruned, with a warning).
        config: :func:`fxprune.compile`'s settings (None: its defaults).
        latency_backend: the runtime the budget is measured on (None: ONNX Runtime, as
            :func:`fxprune.compile`); a :class:`~fxprune.backends.Backend` or its name.

    For inference: the compiled function owns the pruned weights (see the module docstring);
    to fine-tune, prune with :func:`fxprune.compile` and train its ``model``.
    """
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    options = BackendOptions(
        budget=Budget.parse(budget) if budget is not None else None,
        then=then,
        plan=plan,
        config=config,
        latency_backend=latency_backend if latency_backend is not None else "onnxruntime",
    )
    return FxpruneBackend(options)


def fxprune_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The backend registered as ``"fxprune"``: ``options`` are :func:`backend`'s keywords.

    ``torch.compile(model, backend="fxprune", options={"budget": 0.5})`` calls it with those
    options once per captured graph (recompiles included); each graph's record is logged
    (logger ``fxprune``) and appended to the module's records, numbered across calls: read
    them with :func:`last_records`, drop them with :func:`clear_records`. (:func:`backend`
    keeps its own, in ``FxpruneBackend.graphs``.)
    """
    options = backend(**(options or {})).options
    return FxpruneBackend(options, graphs=_NAMED_RECORDS)(gm, example_inputs)


#: the records of every graph the by-name backend received since import or clear_records()
_NAMED_RECORDS: list[GraphRecord] = []


def last_records() -> list[GraphRecord]:
    """The :class:`GraphRecord` of every graph ``torch.compile(..., backend="fxprune")`` handed
    to fxprune since import or the last :func:`clear_records`, in order (a copy).

    Example::

        fxprune.pipeline.dynamo_backend.clear_records()
        compiled = torch.compile(model.eval(), backend="fxprune", options={"budget": 0.5})
        compiled(x)
        for record in fxprune.pipeline.dynamo_backend.last_records():
            print(record.describe())  # "graph 0: pruned; ...", or "skipped (why)"
    """
    return list(_NAMED_RECORDS)


def clear_records() -> None:
    """Forget the by-name backend's records (and the compile results they keep alive); the
    next graph is numbered 0."""
    _NAMED_RECORDS.clear()


def _register() -> None:
    """Register ``"fxprune"`` with dynamo on import, so the name resolves without installing.

    Where the installed package's entry point is already known to dynamo (``_BACKENDS`` holds
    it), dynamo's own lookup loads and registers it; registering here too would be a duplicate.
    """
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS and _BACKENDS.get(BACKEND_NAME) is None:
        register_backend(fxprune_backend, name=BACKEND_NAME)


_register()
