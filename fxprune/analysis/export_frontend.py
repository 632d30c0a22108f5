"""The torch.export front end: an ``ExportedProgram`` as an fx graph in fxprune's vocabulary.

``torch.export`` captures what ``symbolic_trace`` cannot (Python control flow on shapes, which it
specialises to the example's; ``torch._check``; code fx's proxies break on), but it records ATen
calls (``aten.conv2d.default``, ``aten.batch_norm.default``) with parameters reached by
``get_attr``. Every pass after the trace knows ops in torch's own vocabulary (``F.conv2d``,
``torch.add``, ``torch.reshape``, stock ``nn`` modules), so this module translates each ATen call
into its torch-level counterpart through ONE table, :data:`ATEN_TO_TORCH`, and leaves the rest
to the existing passes: the canonicalising pass then lifts ``F.conv2d(x, get_attr w, ...)`` into
an ``nn.Conv2d`` exactly as it does for traced functional code, so the op table
(:mod:`fxprune.analysis.ops`) stays the one place that knows what an op does.

What the translation does, and why:

- parameters and buffers stay ``get_attr`` nodes on the module tree of ``ep.module()`` (the
  canonicalising pass moves them onto the modules it builds; state-dict keys keep their paths);
- each node's module path comes from export's ``nn_module_stack``, so a frozen op or a failure
  names the user's module as it does under fx;
- in-place ATen ops (``relu_``, ``add_``: export keeps them in its training IR) become their
  out-of-place twins, and later readers of the mutated tensor read the new value instead. That
  is only exact when no other alias of the tensor (its base, another view of it) is read after
  the write, so such an op is left as it is, an unknown op that freezes its channels;
- ATen ops returning tuples whose first element is the torch op's result (inference batch norm,
  ``max_pool2d_with_indices``, ``native_layer_norm``) are translated only when nothing reads the
  other elements;
- no-ops in eval mode (``dropout`` with ``train=False``, ``alias``) disappear (copies such as
  ``clone`` stay: a write kept in place on a copy must not reach the original), and so do
  export's guard and assertion nodes: they test only the example's shapes, which channel
  pruning leaves alone except for channel counts the rewrite recomputes, and a side-effecting
  node would keep a removed block's branch alive;
- anything not in the table stays an ATen call: the channel analysis freezes what it touches
  and names it with its module (``unsupported op: function aten::erf at node 'erf' (in
  'act')``).
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from fxprune.analysis.trace import as_input_tuple, propagate_shapes
from fxprune.core.errors import TraceError
from fxprune.core.meta import MODULE_PATH

__all__ = ["ATEN_TO_TORCH", "capture", "from_exported"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

#: a translation: (op, target, args, kwargs) of the torch-level node, or None to keep the ATen
#: call. It receives the ATen node (for shapes and users) and its arguments in the new graph.
Translation = tuple[str, Any, tuple[Any, ...], dict[str, Any]] | None
Translate = Callable[[fx.Node, tuple[Any, ...], dict[str, Any]], Translation]

_IDENTITY = "identity"  # the node's value is its first argument (an eval-mode no-op)


def _fn(
    target: Callable[..., Any], order: Callable[..., tuple[Any, ...]] | None = None
) -> Translate:
    """Call ``target`` with the ATen arguments (re-ordered by ``order(*args)`` when given)."""

    def translate(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
        if order is not None:
            if kwargs:
                return None  # a keyword form the re-ordering does not know
            return ("call_function", target, tuple(order(*args)), {})
        return ("call_function", target, args, kwargs)

    return translate


def _method(name: str) -> Translate:
    """Call the tensor method ``name`` with the ATen arguments."""

    def translate(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
        return ("call_method", name, args, kwargs)

    return translate


def _first(translate: Translate) -> Translate:
    """An ATen op returning a tuple whose element 0 is the torch op's result: translated only
    when every reader takes element 0 (those reads are then dropped)."""

    def wrapped(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
        if not all(_reads_element(u, node, 0) for u in node.users):
            return None
        return translate(node, args, kwargs)

    wrapped.first = True  # type: ignore[attr-defined]
    return wrapped


def _reads_element(user: fx.Node, node: fx.Node, index: int) -> bool:
    return (
        user.op == "call_function"
        and user.target is operator.getitem
        and user.args[0] is node
        and user.args[1] == index
    )


def _identity(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    return (_IDENTITY, None, args[:1], {})


def _dropout(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    train = args[2] if len(args) > 2 else kwargs.get("train", True)
    return _identity(node, args, kwargs) if train is False else None


def _ndim(value: Any) -> int | None:
    """Rank of an ATen node's value (export's ``val`` meta), or None."""
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return val.ndim if isinstance(val, torch.Tensor) else None


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSES = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _convolution(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """``aten.convolution`` (core ATen) as ``F.conv{n}d`` or ``F.conv_transpose{n}d``."""
    if kwargs or len(args) != 9:
        return None
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
    dim = len(stride)
    if transposed:
        fn = _CONV_TRANSPOSES.get(dim)
        rest = (stride, padding, output_padding, groups, dilation)
    else:
        fn = _CONVS.get(dim)
        rest = (stride, padding, dilation, groups)
    return None if fn is None else ("call_function", fn, (x, w, b, *rest), {})


def _slice(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """``aten.slice(x, dim, start, end, step)`` as ``x[:, ..., start:end:step]``."""
    a = dict(zip(("self", "dim", "start", "end", "step"), args, strict=False)) | kwargs
    return _getitem(
        node, a["self"], a.get("dim", 0), slice(a.get("start"), a.get("end"), a.get("step", 1))
    )


def _select(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """``aten.select(x, dim, i)`` as ``x[:, ..., i]``."""
    if kwargs or len(args) != 3:
        return None
    return _getitem(node, args[0], args[1], args[2])


def _getitem(node: fx.Node, x: Any, dim: int, item: Any) -> Translation:
    ndim = _ndim(node.args[0])
    if ndim is None or not isinstance(dim, int):
        return None
    index = (slice(None),) * (dim % ndim) + (item,)
    return ("call_function", operator.getitem, (x, index), {})


def _transposed_weight(mat: Any) -> Any:
    """``w`` when ``mat`` (a node of the new graph) is ``w.T`` of a 2-D ``get_attr`` weight."""
    if not isinstance(mat, fx.Node) or mat.op != "call_function" or not mat.args:
        return None
    w = mat.args[0]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    if mat.target is torch.permute and list(mat.args[1]) == [1, 0]:
        return w
    if mat.target is torch.transpose and sorted(mat.args[1:3]) == [0, 1]:
        return w
    return None


def _addmm(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """Core ATen's linear, ``addmm(b, x, w.T)`` / ``mm(x, w.T)``, as ``F.linear(x, w, b)``."""
    if any(kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or set(kwargs) - {"beta", "alpha"}:
        return None
    bias, x, mat = (None, *args) if len(args) == 2 else args
    w = _transposed_weight(mat)
    if w is None or (bias is not None and getattr(bias, "op", None) != "get_attr"):
        return None
    return ("call_function", F.linear, (x, w, bias), {})


def _t(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    if _ndim(node.args[0]) != 2:
        return None
    return ("call_function", torch.transpose, (args[0], 0, 1), {})


def _reshape(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """``view`` / ``reshape`` / ``_unsafe_view`` as ``torch.reshape(x, [sizes])`` (the rewrite
    recomputes the channel entry of a constant size list)."""
    if kwargs or len(args) != 2:
        return None
    return ("call_function", torch.reshape, (args[0], list(args[1])), {})


def _expand(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    if kwargs.get("implicit", False) or len(args) != 2:
        return None
    return ("call_method", "expand", (args[0], list(args[1])), {})


def _size(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """``aten.sym_size.int(x, d)`` (a dynamic size) as ``x.size(d)``, which ONNX and TorchScript
    record as a size of the tensor, not as the example's number."""
    if kwargs or len(args) != 2:
        return None
    return ("call_method", "size", args, {})


def _keep_kwargs(target: Callable[..., Any], *names: str) -> Translate:
    """Call ``target`` with the ATen positional arguments and only the keywords in ``names``
    (export spells defaults such as ``dtype=None`` that the torch function does not take)."""

    def translate(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
        extra = set(kwargs) - set(names)
        if any(kwargs[k] is not None for k in extra):
            return None
        return ("call_function", target, args, {k: v for k, v in kwargs.items() if k in names})

    return translate


def _reduce(target: Callable[..., Any]) -> Translate:
    """``aten.mean`` / ``aten.sum`` (``.dim`` and full reductions) as ``target(x[, dim,
    keepdim])``; a ``dtype`` argument is left untranslated (it changes what is computed)."""

    def translate(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
        dtype = args[3] if len(args) > 3 else kwargs.get("dtype")
        if dtype is not None or set(kwargs) - {"dtype", "keepdim"}:
            return None
        if len(args) == 1:  # .default: over every dim
            return ("call_function", target, (args[0],), {})
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        return ("call_function", target, (args[0], args[1], keepdim), {})

    return translate


def _to_dtype(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """``aten.to.dtype(x, dtype)`` as ``x.to(dtype)``; the other overloads (a device, another
    tensor, a memory format, a forced copy) are left untranslated."""
    if node.target is not torch.ops.aten.to.dtype or len(args) != 2:
        return None
    if any(kwargs.get(k) for k in ("non_blocking", "copy", "memory_format")):
        return None
    return ("call_method", "to", args, {})


def _upsample(mode: str) -> Translate:
    """``aten.upsample_{mode}.vec(x, output_size, [align_corners,] scale_factors)`` as
    ``F.interpolate`` (which calls exactly that op)."""

    def translate(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
        if kwargs:
            return None
        if mode == "nearest" and len(args) == 3:
            x, size, scale = args
            extra = {}
        elif mode != "nearest" and len(args) == 4:
            x, size, align_corners, scale = args
            extra = {"align_corners": align_corners}
        else:
            return None
        kw = {"size": size, "scale_factor": scale, "mode": mode, **extra}
        return ("call_function", F.interpolate, (x,), kw)

    return translate


def _softmax(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Translation:
    """``aten._softmax(x, dim, half_to_float)`` / ``aten.softmax.int(x, dim, dtype)``."""
    if len(args) > 2 and args[2] not in (None, False):
        return None
    return ("call_function", torch.softmax, (args[0], args[1]), {})


#: every ATen op the front end translates, by overload packet: the one table of the front end
ATEN_TO_TORCH: dict[Any, Translate] = {
    # layers (the canonicalising pass lifts these onto modules)
    aten.conv1d: _fn(F.conv1d),
    aten.conv2d: _fn(F.conv2d),
    aten.conv3d: _fn(F.conv3d),
    aten.conv_transpose1d: _fn(F.conv_transpose1d),
    aten.conv_transpose2d: _fn(F.conv_transpose2d),
    aten.conv_transpose3d: _fn(F.conv_transpose3d),
    aten.convolution: _convolution,
    aten.linear: _fn(F.linear),
    aten.addmm: _addmm,
    aten.mm: _addmm,
    aten.batch_norm: _fn(torch.batch_norm),
    aten._native_batch_norm_legit_no_training: _first(
        _fn(
            F.batch_norm,
            lambda x, w, b, rm, rv, momentum, eps: (x, rm, rv, w, b, False, momentum, eps),
        )
    ),
    aten.layer_norm: _fn(
        F.layer_norm, lambda x, shape, w=None, b=None, eps=1e-5, _=True: (x, shape, w, b, eps)
    ),
    aten.native_layer_norm: _first(
        _fn(F.layer_norm, lambda x, shape, w, b, eps: (x, shape, w, b, eps))
    ),
    aten.rms_norm: _fn(F.rms_norm),  # written out by canonicalize
    aten.group_norm: _fn(
        F.group_norm, lambda x, g, w=None, b=None, eps=1e-5, _=True: (x, g, w, b, eps)
    ),
    # elementwise between tensors (Tensor and Scalar overloads alike)
    aten.add: _fn(torch.add),
    aten.sub: _fn(torch.sub),
    aten.mul: _fn(torch.mul),
    aten.div: _fn(torch.div),
    aten.pow: _fn(torch.pow),  # Tensor_Scalar (x ** 2), Scalar (2 ** x), Tensor_Tensor
    aten.maximum: _fn(torch.maximum),
    aten.minimum: _fn(torch.minimum),
    aten.where: _fn(torch.where),
    # channel layout
    aten.cat: _fn(torch.cat),
    aten.stack: _fn(torch.stack),
    aten.split: _fn(torch.split),
    aten.split_with_sizes: _fn(torch.split),
    aten.chunk: _fn(torch.chunk),
    aten.unbind: _fn(torch.unbind),
    aten.slice: _slice,
    aten.select: _select,
    aten.view: _reshape,
    aten.reshape: _reshape,
    aten._unsafe_view: _reshape,
    aten.permute: _fn(torch.permute),
    aten.transpose: _fn(torch.transpose),
    aten.t: _t,
    aten.flatten: _fn(torch.flatten),
    aten.unflatten: _fn(torch.unflatten),
    aten.roll: _fn(torch.roll),
    aten.pad: _fn(F.pad),
    aten.constant_pad_nd: _fn(F.pad, lambda x, pad, value=0.0: (x, pad, "constant", value)),
    aten.unsqueeze: _fn(torch.unsqueeze),
    aten.squeeze: _fn(torch.squeeze),
    aten.expand: _expand,
    aten.reshape_as: _method("reshape_as"),  # the sizes of another tensor (fxprune.analysis.sizes)
    aten.view_as: _method("reshape_as"),
    aten.sym_size: _size,
    # reductions and pooling
    aten.mean: _reduce(torch.mean),
    aten.sum: _reduce(torch.sum),
    aten.amax: _fn(torch.amax),
    aten.amin: _fn(torch.amin),
    aten.adaptive_avg_pool1d: _fn(F.adaptive_avg_pool1d),
    aten.adaptive_avg_pool2d: _fn(F.adaptive_avg_pool2d),
    aten._adaptive_avg_pool2d: _fn(F.adaptive_avg_pool2d),
    aten.adaptive_avg_pool3d: _fn(F.adaptive_avg_pool3d),
    aten.adaptive_max_pool2d: _first(_fn(F.adaptive_max_pool2d, lambda x, size: (x, size))),
    aten.avg_pool1d: _fn(F.avg_pool1d),
    aten.avg_pool2d: _fn(F.avg_pool2d),
    aten.avg_pool3d: _fn(F.avg_pool3d),
    aten.max_pool1d: _fn(F.max_pool1d),
    aten.max_pool2d: _fn(F.max_pool2d),
    aten.max_pool3d: _fn(F.max_pool3d),
    aten.max_pool2d_with_indices: _first(_fn(F.max_pool2d)),
    aten.max_pool3d_with_indices: _first(_fn(F.max_pool3d)),
    aten.upsample_nearest2d: _upsample("nearest"),
    aten.upsample_bilinear2d: _upsample("bilinear"),
    # activations
    aten.relu: _fn(F.relu),
    aten.relu6: _fn(F.relu6),
    aten.gelu: _keep_kwargs(F.gelu, "approximate"),
    aten.silu: _fn(F.silu),
    aten.sigmoid: _fn(torch.sigmoid),
    aten.hardswish: _fn(F.hardswish),
    aten.hardsigmoid: _fn(F.hardsigmoid),
    aten.tanh: _fn(torch.tanh),
    aten.clamp: _fn(torch.clamp),
    aten.hardtanh: _fn(F.hardtanh),
    aten.leaky_relu: _fn(F.leaky_relu),
    aten.mish: _fn(F.mish),
    aten.neg: _fn(torch.neg),
    aten.square: _fn(torch.square),
    aten.sqrt: _fn(torch.sqrt),
    aten.rsqrt: _fn(torch.rsqrt),
    aten.exp: _fn(torch.exp),
    aten.sin: _fn(torch.sin),
    aten.cos: _fn(torch.cos),
    aten._softmax: _softmax,
    aten.softmax: _softmax,
    # attention
    aten.matmul: _fn(torch.matmul),
    aten.bmm: _fn(torch.bmm),
    aten.scaled_dot_product_attention: _fn(F.scaled_dot_product_attention),
    # eval-mode no-ops
    aten.dropout: _dropout,
    aten.feature_dropout: _dropout,
    aten.alpha_dropout: _dropout,
    aten.alias: _identity,  # the same memory: exact, whatever writes to it later
    # copies stay copies: an in-place write kept on one must not reach the original
    aten.clone: _fn(torch.clone),
    aten.lift_fresh_copy: _fn(torch.clone),
    aten.contiguous: _method("contiguous"),
    aten.detach: _method("detach"),
    # dtype changes: the channels stay where they are
    aten.to: _to_dtype,
    aten.type_as: _method("type_as"),
}

# export's guards and assertions: they test the example's shapes (or dtypes) and return nothing
_CHECKS = frozenset({
    aten._assert_scalar, aten._assert_tensor_metadata, aten.sym_constrain_range,
    aten.sym_constrain_range_for_size, aten._assert_async, aten._functional_assert_async,
})  # fmt: skip


def capture(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    """``torch.export.export`` a copy of ``model`` in eval mode (the model is not modified).

    The batch (dim 0 of every input) is captured as a dynamic size where export can keep it so,
    because export otherwise bakes the example's batch into every reshape (``view(x, [1, 512])``)
    and the pruned model, like its ONNX file, would run at that batch only. Export specialises a
    size of 1, so a batch-1 example is doubled for the capture; if the batch does not stay
    dynamic (the model fixes it), the model is captured again at the example's static shapes.

    Raises:
        TraceError: export's own message, and what the user can do.
    """
    inputs = as_input_tuple(example_inputs)
    root = copy.deepcopy(model).eval()
    if inputs and all(t.ndim > 0 for t in inputs):
        doubled = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in inputs)
        batch = tuple({0: torch.export.Dim.AUTO} for _ in inputs)
        try:
            ep = torch.export.export(root, doubled, dynamic_shapes=batch)
        except Exception:  # any failure: the static capture below reports it
            logger.debug("dynamic-batch capture failed; capturing at static shapes")
        else:
            if _dynamic_batch(ep):
                return ep
    try:
        return torch.export.export(root, inputs)
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependent...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(
            f"{type(exc).__name__}: {first}\n(raised while torch.export captured "
            f"{type(model).__name__}). torch.export specialises shapes to the example but cannot "
            "follow Python control flow on tensor values: rewrite such code with torch.cond or "
            "torch.where; check that the example inputs fit the model; or export the model "
            "yourself and pass the ExportedProgram."
        ) from exc


def _dynamic_batch(ep: torch.export.ExportedProgram) -> bool:
    """Every user input of ``ep`` has a symbolic dim 0."""
    names = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]
    return bool(vals) and all(
        isinstance(v, torch.Tensor) and not isinstance(v.shape[0], int) for v in vals
    )


def from_exported(
    ep: torch.export.ExportedProgram,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    name: str | None = None,
) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]]:
    """Translate ``ep`` into a GraphModule of torch-level ops with shapes in ``node.meta``.

    Args:
        ep: the exported program (not modified).
        example_inputs: one tensor per forward argument; None: the program's own example.
        name: the GraphModule's class name (the model's), for reprs and reports.

    Returns:
        The GraphModule (parameters as ``get_attr``, ready for the canonicalising pass) and the
        example inputs its shapes were propagated with.
    """
    inputs = _example_inputs(ep, example_inputs)
    src = ep.module()
    out_spec = src._out_spec if hasattr(src, "_out_spec") else ep.call_spec.out_spec
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    firsts: set[fx.Node] = set()  # tuple-returning ATen nodes now their element 0
    kept, dropped = 0, 0
    order = {n: i for i, n in enumerate(src.graph.nodes)}

    def read(n: fx.Node) -> Any:
        if n not in env and n.op == "get_attr":
            env[n] = graph.get_attr(str(n.target))
        return env[n]

    for node in src.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            continue
        if node.op == "output":
            flat = [fx.node.map_arg(a, read) for a in node.args[0]]
            graph.output(
                pytree.tree_unflatten(flat, out_spec) if out_spec is not None else tuple(flat)
            )
            continue
        if _is_check(node):
            dropped += 1
            continue
        if node.op == "get_attr":
            continue  # made where first read, as fx places them (group order follows)
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and node.args[0] in firsts
        ):
            env[node] = env[node.args[0]]  # element 0 of a tuple op translated to its result
            continue
        args = fx.node.map_arg(node.args, read)
        kwargs = fx.node.map_arg(node.kwargs, read)
        translated, mutated = _translate(node, args, kwargs, order)
        if translated is None:
            op, target = node.op, node.target
            kept += node.op == "call_function"
        else:
            op, target, args, kwargs = translated
        if op == _IDENTITY:
            value = args[0]
        else:
            # a translated node is named after its torch op, as fx names it ("add", "add_1")
            value = graph.create_node(
                op, target, args, kwargs, name=node.name if translated is None else None
            )
            value.meta[MODULE_PATH] = _module_path(node)
        env[node] = value
        if translated is not None and _is_first(node):
            firsts.add(node)
        if mutated is not None:
            env[mutated] = value  # later readers of the mutated tensor read the new value
    graph.eliminate_dead_code()
    gm = fx.GraphModule(src, graph, name or "ExportedProgram")
    graph._tracer_cls = None
    gm.eval()
    if kept:
        logger.info("export front end: %d ATen call(s) kept untranslated", kept)
    logger.debug("export front end: dropped %d guard/assert node(s)", dropped)
    propagate_shapes(gm, inputs, gm)
    return gm, inputs


def _example_inputs(
    ep: torch.export.ExportedProgram, example_inputs: Any
) -> tuple[torch.Tensor, ...]:
    if example_inputs is not None:
        return as_input_tuple(example_inputs)
    stored = ep.example_inputs
    if stored is None:
        raise TraceError(
            "The ExportedProgram holds no example inputs: pass example_inputs (one tensor per "
            "forward argument)."
        )
    args, kwargs = stored
    if kwargs:
        raise TraceError(
            f"The ExportedProgram's example inputs include keyword tensors ({', '.join(kwargs)}); "
            "fxprune takes positional tensors only: export with positional inputs."
        )
    return as_input_tuple(args)


def _is_check(node: fx.Node) -> bool:
    """Export's guard module call or an assertion node (nothing reads their value)."""
    if node.users:
        return False
    if node.op == "call_module":
        return str(node.target).startswith("_guards_fn")
    target = getattr(node.target, "overloadpacket", None)
    return node.op == "call_function" and (target in _CHECKS or node.target is torch._check)


def _is_first(node: fx.Node) -> bool:
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(ATEN_TO_TORCH.get(packet), "first", False)


def _translate(
    node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], order: dict[fx.Node, int]
) -> tuple[Translation, fx.Node | None]:
    """The torch-level form of an ATen node, and the tensor it mutates in place (if any)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None, None
    packet = node.target.overloadpacket
    mutated = None
    if _mutates_first(node.target):
        twin = _out_of_place(node.target)
        if twin is None or not _safe_to_functionalise(node, order):
            return None, None
        packet, mutated = twin.overloadpacket, node.args[0]
    translate = ATEN_TO_TORCH.get(packet)
    if translate is None:
        return None, None
    return translate(node, args, kwargs), mutated


def _mutates_first(op: torch._ops.OpOverload) -> bool:
    schema = op._schema
    alias = schema.arguments[0].alias_info if schema.arguments else None
    return alias is not None and alias.is_write


def _out_of_place(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.add_.Tensor`` → ``aten.add.Tensor``; None when there is no such twin."""
    name = op.overloadpacket.__name__
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _aliases_first(node: Any) -> bool:
    """The ATen node's result is its first argument's memory: a view, or an in-place op's."""
    if not isinstance(node, fx.Node) or not isinstance(node.target, torch._ops.OpOverload):
        return False
    schema = node.target._schema
    return bool(schema.arguments) and schema.arguments[0].alias_info is not None


def _safe_to_functionalise(node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether an in-place op may become out-of-place without changing what any read sees.

    The write changes every alias of the tensor it writes: the base it is a view of and every
    view of that base. Reads of the written tensor and of the op's result are redirected to the
    new value, and so are views taken of those after the write (*fresh* aliases). Any other alias
    read after the write would see the old value, so then the op stays in place (an unknown op:
    its channels freeze). The base must be computed in the graph or be an input (a buffer
    written in place is model state).
    """
    target = node.args[0]
    if not isinstance(target, fx.Node):
        return False
    base = target
    while _aliases_first(base) and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if base.op not in ("call_function", "placeholder"):
        return False
    family, todo = {base}, [base]
    while todo:  # the base, every view of it and every in-place op's result, transitively
        for user in todo.pop().users:
            if _aliases_first(user) and user.args[0] in family and user not in family:
                family.add(user)
                todo.append(user)
    fresh = {target, node}
    for alias in sorted(family, key=order.__getitem__):
        if order[alias] > order[node] and alias.args[0] in fresh:
            fresh.add(alias)
    return not any(order[u] > order[node] for alias in family - fresh for u in alias.users)


def _module_path(node: fx.Node) -> str:
    """The innermost user module whose forward made ``node`` (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path in ("L__self__", "") else str(path)
