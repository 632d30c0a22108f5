"""Canonicalise: lift functional calls on parameters into the stock ``torch.nn`` modules.

The same convolution reaches fx in three forms: a stock ``nn.Conv2d`` (a leaf ``call_module``),
a subclass with its own forward (timm's ``BatchNormAct2d``, ``Conv2dSame``: fx traces into it and
sees ``F.batch_norm(x, self.running_mean, ...)``), or a hand-written ``F.conv2d(x, self.w, ...)``
(ported or generated code, the torch.export front end). This pass rewrites the last two into the
first, right after tracing::

    F.conv2d(x, get_attr(w), get_attr(b), stride, padding, dilation, groups)
        -> call_module(nn.Conv2d(...) holding the very same w and b)

so every later pass — channel rules, pruners, latency units (conv + BN + activation), BN-Taylor
importance, the rewrite — sees one vocabulary and needs no second rule per form. We lift rather
than teach every pass the functional forms because those passes key on module instances (a
pruner returns a new module, the latency tables and importance read ``module.weight``); one
front pass keeps the op table the single place that knows an op.

The canonical module holds the *same* Parameter and buffer objects (no copies), so the lifted
graph computes exactly what the traced graph computed (in eval mode: the calls are traced with
``training=False``). Where it lives:

- when the module that owns the parameters has no other state (its own parameters and buffers
  are exactly the call's, its children are stateless and nothing calls it as a module), the
  canonical module *replaces* it at its path (``blocks.0.0.bn1`` stays ``blocks.0.0.bn1``, its
  stateless children such as ``drop``/``act`` move onto it), so state-dict keys do not change;
- otherwise the parameters move onto a new submodule under the owner, named after the call
  (``stem.conv2d``), so the pruned model holds every tensor once.

A call is lifted only when every parameter argument is a ``get_attr`` of a Parameter or buffer
(or ``None`` where the module allows it) and every other argument but the input is a constant.
A computed weight (``w - w.mean(...)``) or a parameter used by more than one node (two calls
sharing a weight, or a weight also read elsewhere) is left alone: one module cannot hold a
tensor another op also reads, and pruning one user would silently change the other. Such a call stays an unknown op, so its channels freeze, and the reason it was
not lifted is kept under :data:`~fxprune.core.meta.NOT_LIFTED` for the report. One computed
weight is recognised: timm's ``StdConv2d`` / ``ScaledStdConv2d`` standardisation (``batch_norm``
over the weight rows, times a gain in the scaled form), collapsed first into one :func:`~fxprune.analysis.std_conv.std_conv2d` call
and lifted onto a :class:`~fxprune.analysis.std_conv.StdConv2d`. One call is written out instead
of lifted: RMSNorm (functional or ``nn.RMSNorm``) becomes the elementwise ops it computes, which
the channel rules already know (:func:`_write_out_rms_norms`).
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxprune.analysis.std_conv import StdConv2d, std_conv2d
from fxprune.core.meta import MODULE_PATH, NOT_LIFTED, TENSOR_META

__all__ = ["LIFTABLE", "canonicalize"]

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass(frozen=True)
class _Form:
    """A functional op: its signature (name, default) and which arguments are tensors of state."""

    name: str
    signature: tuple[tuple[str, Any], ...]
    tensors: tuple[str, ...]  # state arguments (get_attr or None)
    build: Callable[[dict[str, Any], tuple[int, ...]], nn.Module | None]


def _conv(dim: int, transpose: bool):
    cls = {
        (1, False): nn.Conv1d,
        (2, False): nn.Conv2d,
        (3, False): nn.Conv3d,
        (1, True): nn.ConvTranspose1d,
        (2, True): nn.ConvTranspose2d,
        (3, True): nn.ConvTranspose3d,
    }[(dim, transpose)]

    def build(a: dict[str, Any], _: tuple[int, ...]) -> nn.Module | None:
        w, groups = a["weight"], a["groups"]
        if w is None or w.ndim != dim + 2:
            return None
        if transpose:
            cin, cout = w.shape[0], w.shape[1] * groups
            extra = {"output_padding": a["output_padding"]}
        else:
            cin, cout = w.shape[1] * groups, w.shape[0]
            extra = {}
        return cls(
            cin, cout, tuple(w.shape[2:]), stride=a["stride"], padding=a["padding"],
            dilation=a["dilation"], groups=groups, bias=a["bias"] is not None, device="meta",
            **extra,
        )  # fmt: skip

    return build


def _std_conv(a: dict[str, Any], _: tuple[int, ...]) -> nn.Module | None:
    w, gain, groups = a["weight"], a["gain"], a["groups"]
    if w is None or w.ndim != 4 or (gain is not None and gain.numel() != w.shape[0]):
        return None
    return StdConv2d(
        w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), scale=a["scale"], eps=a["eps"],
        gain=gain is not None,
        stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=groups,
        bias=a["bias"] is not None, device="meta",
    )  # fmt: skip


def _batch_norm(a: dict[str, Any], in_shape: tuple[int, ...]) -> nn.Module | None:
    rm, rv, w, b = a["running_mean"], a["running_var"], a["weight"], a["bias"]
    if a["training"] is not False or rm is None or rv is None or (w is None) != (b is None):
        return None  # batch statistics, or an affine nn.BatchNorm cannot express
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
        len(in_shape)
    )
    if cls is None:
        return None
    return cls(rm.numel(), eps=a["eps"], momentum=a["momentum"], affine=w is not None)


def _linear(a: dict[str, Any], _: tuple[int, ...]) -> nn.Module | None:
    w = a["weight"]
    if w is None or w.ndim != 2:
        return None
    return nn.Linear(w.shape[1], w.shape[0], bias=a["bias"] is not None, device="meta")


def _layer_norm(a: dict[str, Any], _: tuple[int, ...]) -> nn.Module | None:
    shape, w, b = a["normalized_shape"], a["weight"], a["bias"]
    if w is None and b is not None:
        return None
    return nn.LayerNorm(
        shape, eps=a["eps"], elementwise_affine=w is not None, bias=b is not None, device="meta"
    )


def _group_norm(a: dict[str, Any], in_shape: tuple[int, ...]) -> nn.Module | None:
    w, b = a["weight"], a["bias"]
    if (w is None and b is not None) or len(in_shape) < 2:
        return None  # a shift without a scale: no nn.GroupNorm computes it
    m = nn.GroupNorm(a["num_groups"], in_shape[1], eps=a["eps"], affine=w is not None)
    if w is not None and b is None:
        # scale only (timm's GroupNorm1NoBias, poolformer v2): nn.GroupNorm's forward hands
        # its bias to F.group_norm as it is, None included
        m.bias = None
    return m


def _embedding(a: dict[str, Any], _: tuple[int, ...]) -> nn.Module | None:
    w = a["weight"]
    if w is None or w.ndim != 2 or a["max_norm"] is not None:
        return None  # max_norm renormalises the weight in place: not a pure function
    return nn.Embedding(
        w.shape[0], w.shape[1], padding_idx=a["padding_idx"],
        scale_grad_by_freq=a["scale_grad_by_freq"], sparse=a["sparse"], device="meta",
    )  # fmt: skip


def _instance_norm(a: dict[str, Any], in_shape: tuple[int, ...]) -> nn.Module | None:
    w, b = a["weight"], a["bias"]
    tracked = a["running_mean"] is not None
    if (w is None) != (b is None) or tracked or a["use_input_stats"] is not True:
        return None
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(len(in_shape))
    if cls is None:
        return None
    return cls(in_shape[1], eps=a["eps"], momentum=a["momentum"], affine=w is not None)


_CONV_SIG = (("input", _MISSING), ("weight", _MISSING), ("bias", None), ("stride", 1),
             ("padding", 0), ("dilation", 1), ("groups", 1))  # fmt: skip
_CONVT_SIG = (("input", _MISSING), ("weight", _MISSING), ("bias", None), ("stride", 1),
              ("padding", 0), ("output_padding", 0), ("groups", 1), ("dilation", 1))  # fmt: skip
_BN_SIG = (("input", _MISSING), ("running_mean", _MISSING), ("running_var", _MISSING),
           ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1),
           ("eps", 1e-5))  # fmt: skip
# torch.batch_norm is the ATen order: affine first, then the running statistics
_TORCH_BN_SIG = (("input", _MISSING), ("weight", _MISSING), ("bias", _MISSING),
                 ("running_mean", _MISSING), ("running_var", _MISSING), ("training", _MISSING),
                 ("momentum", _MISSING), ("eps", _MISSING), ("cudnn_enabled", True))  # fmt: skip
_LN_SIG = (("input", _MISSING), ("normalized_shape", _MISSING), ("weight", None), ("bias", None),
           ("eps", 1e-5), ("cudnn_enable", True))  # fmt: skip
_GN_SIG = (("input", _MISSING), ("num_groups", _MISSING), ("weight", None), ("bias", None),
           ("eps", 1e-5), ("cudnn_enabled", True))  # fmt: skip
_EMB_SIG = (("input", _MISSING), ("weight", _MISSING), ("padding_idx", None), ("max_norm", None),
            ("norm_type", 2.0), ("scale_grad_by_freq", False), ("sparse", False))  # fmt: skip
_IN_SIG = (("input", _MISSING), ("running_mean", None), ("running_var", None), ("weight", None),
           ("bias", None), ("use_input_stats", True), ("momentum", 0.1), ("eps", 1e-5))  # fmt: skip

_STD_CONV_SIG = (*_CONV_SIG[:2], ("gain", _MISSING), *_CONV_SIG[2:], ("scale", 1.0),
                 ("eps", 1e-6))  # fmt: skip
_LINEAR_SIG = (("input", _MISSING), ("weight", _MISSING), ("bias", None))
_WB = ("weight", "bias")
_BN_TENSORS = ("running_mean", "running_var", "weight", "bias")

#: every functional form this pass lifts, by the function object fx records
LIFTABLE: dict[Any, _Form] = {
    F.conv1d: _Form("conv1d", _CONV_SIG, _WB, _conv(1, False)),
    F.conv2d: _Form("conv2d", _CONV_SIG, _WB, _conv(2, False)),
    F.conv3d: _Form("conv3d", _CONV_SIG, _WB, _conv(3, False)),
    std_conv2d: _Form("std_conv2d", _STD_CONV_SIG, ("weight", "gain", "bias"), _std_conv),
    F.conv_transpose1d: _Form("conv_transpose1d", _CONVT_SIG, _WB, _conv(1, True)),
    F.conv_transpose2d: _Form("conv_transpose2d", _CONVT_SIG, _WB, _conv(2, True)),
    F.conv_transpose3d: _Form("conv_transpose3d", _CONVT_SIG, _WB, _conv(3, True)),
    F.batch_norm: _Form("batch_norm", _BN_SIG, _BN_TENSORS, _batch_norm),
    torch.batch_norm: _Form("batch_norm", _TORCH_BN_SIG, _BN_TENSORS, _batch_norm),
    F.linear: _Form("linear", _LINEAR_SIG, _WB, _linear),
    F.layer_norm: _Form("layer_norm", _LN_SIG, _WB, _layer_norm),
    torch.layer_norm: _Form("layer_norm", _LN_SIG, _WB, _layer_norm),
    F.group_norm: _Form("group_norm", _GN_SIG, _WB, _group_norm),
    torch.group_norm: _Form("group_norm", _GN_SIG, _WB, _group_norm),
    F.embedding: _Form("embedding", _EMB_SIG, ("weight",), _embedding),
    F.instance_norm: _Form("instance_norm", _IN_SIG, _BN_TENSORS, _instance_norm),
}


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Lift every liftable functional call on parameters into a canonical module, in place.

    Returns ``gm``. Calls that cannot be lifted are left as they are, with the reason recorded
    in ``node.meta[NOT_LIFTED]``.
    """
    dropped = (
        _drop_rank_guards(gm)
        + _collapse_std_weights(gm)
        + _split_computed_biases(gm)
        + _write_out_rms_norms(gm)
    )
    uses = _state_uses(gm)
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        form = _form_of(node.target)
        if form is None:
            continue
        why = _lift(gm, node, form, uses)
        if why is not None:
            node.meta[NOT_LIFTED] = why
            logger.info("not lifted: %s (%s)", node.format_node(), why)
        else:
            lifted += 1
    if lifted or dropped:
        gm.graph.lint()
        gm.recompile()
        logger.debug("canonicalize: lifted %d functional calls", lifted)
    return gm


_RMS_SIG = (("input", _MISSING), ("normalized_shape", _MISSING), ("weight", None), ("eps", None))
_RMS_FORM = _Form("rms_norm", _RMS_SIG, ("weight",), lambda a, s: None)
# timm's ``rms_norm`` / ``fast_rms_norm`` (timm.layers.fast_norm, fx-wrapped: leaves of a
# trace): F.rms_norm's signature and ops, ``eps`` defaulting to 1e-5
_TIMM_RMS = ("timm.layers.fast_norm", ("rms_norm", "fast_rms_norm"))
_TIMM_RMS_FORM = _Form("rms_norm", (*_RMS_SIG[:3], ("eps", 1e-5)), ("weight",), lambda a, s: None)


def _timm_rms_norm(target: Any) -> bool:
    return (
        getattr(target, "__module__", None) == _TIMM_RMS[0]
        and getattr(target, "__name__", None) in _TIMM_RMS[1]
    )


def _write_out_rms_norms(gm: fx.GraphModule) -> int:
    """``F.rms_norm`` / ``torch.rms_norm`` / ``nn.RMSNorm`` / timm's ``rms_norm`` over the last
    dim, written out as
    ``x * rsqrt(mean(x², -1) + eps) * w``; the count.

    Written out, every op is one the channel rules know: the mean over channels marks the
    channels *inexact* (pruning changes the statistic, as for a LayerNorm), and the weight is a
    parameter read by ``get_attr`` and multiplied per channel, which prunes with them. That is
    what RMSNorm computes (in float32; torch's kernel does the same ops), so no new module rule
    or pruner is needed; the pruned model runs the written-out form. Only a normalisation over
    the input's last dim with a ``get_attr`` weight (or none) is written out; anything else
    stays an unknown op and freezes its channels, named in the report.
    """
    count = 0
    for node in list(gm.graph.nodes):
        found = _rms_call(gm, node)
        if found is None:
            continue
        x, weight, eps = found
        meta = x.meta[TENSOR_META]
        shape, dtype = tuple(meta.shape), meta.dtype
        eps = torch.finfo(dtype).eps if eps is None else float(eps)
        reduced = (*shape[:-1], 1)
        graph = gm.graph
        with graph.inserting_before(node):
            if isinstance(weight, str):  # nn.RMSNorm: its weight read where the module ran
                weight = graph.get_attr(weight)
                weight.meta[TENSOR_META] = _meta_of((shape[-1],), dtype)
            steps = [
                (torch.pow, (x, 2), shape),
                (torch.mean, (None, -1, True), reduced),
                (operator.add, (None, eps), reduced),
                (torch.rsqrt, (None,), reduced),
                (operator.mul, (x, None), shape),
            ]
            if weight is not None:
                steps.append((operator.mul, (None, weight), shape))
            last: fx.Node | None = None
            for target, args, out_shape in steps:
                args = tuple(last if a is None else a for a in args)
                last = graph.call_function(target, args)
                last.meta = {**node.meta, TENSOR_META: _meta_of(out_shape, dtype)}
        node.replace_all_uses_with(last)
        graph.erase_node(node)
        count += 1
    return count


def _rms_call(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Any, Any] | None:
    """``(input, weight, eps)`` of an RMSNorm call over the last dim that can be written out
    (weight: a ``get_attr`` node, maybe cast, a parameter path for a module, or None), else
    None."""
    timm_form = node.op == "call_function" and _timm_rms_norm(node.target)
    if node.op == "call_function" and (timm_form or node.target in (F.rms_norm, torch.rms_norm)):
        bound = _bind(node, _TIMM_RMS_FORM if timm_form else _RMS_FORM)
        if bound is None:
            return None
        x, normalized, weight, eps = (
            bound[k] for k in ("input", "normalized_shape", "weight", "eps")
        )
        if weight is not None and not _state_read(weight):
            return None
    elif node.op == "call_module" and not node.kwargs and len(node.args) == 1:
        m = gm.get_submodule(str(node.target))
        if type(m) is not nn.RMSNorm:
            return None
        x, normalized, eps = node.args[0], m.normalized_shape, m.eps
        weight = None if m.weight is None else f"{node.target}.weight"
    else:
        return None
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    meta = x.meta.get(TENSOR_META) if isinstance(x, fx.Node) else None
    if not hasattr(meta, "shape") or len(normalized) != 1 or tuple(meta.shape[-1:]) != normalized:
        return None
    if not isinstance(eps, (float, int, type(None))):
        return None
    return x, weight, eps


def _state_read(node: Any) -> bool:
    """A ``get_attr``, or one cast to another float dtype (timm's ``self.weight.float()``)."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "get_attr"


_CASTS = ("float", "double", "half", "bfloat16", "to")


def _meta_of(shape: tuple[int, ...], dtype: torch.dtype) -> Any:
    """ShapeProp's record of a contiguous tensor of ``shape`` and ``dtype``."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    return _extract_tensor_metadata(torch.empty(shape, dtype=dtype, device="meta"))


def _split_computed_biases(gm: fx.GraphModule) -> int:
    """``F.linear(x, w, b)`` with a computed bias becomes ``F.linear(x, w) + b``; the count.

    BEiT / EVA build their qkv bias in the forward, ``torch.cat((q_bias, k_bias, v_bias))`` with
    a zero ``k_bias`` buffer, and pass it to ``F.linear(x, self.qkv.weight, qkv_bias)``. Split
    off, the weight lifts onto its ``nn.Linear`` like any other, and the bias is an elementwise
    add whose channels the rules of ``cat`` and of parameters read by ``get_attr`` derive: row
    ``j`` of the bias is tied to output row ``j`` of the linear, so a pruned q/k/v channel drops
    its row of ``q_bias`` / ``k_bias`` / ``v_bias`` exactly, and anything the rules cannot follow
    (a bias mixed across channels) freezes as before. The same computation as timm's
    ``qkv_bias_separate=True``; results differ by float rounding only (addmm vs mm + add).
    Only a 1-d bias of the output's last-dim size, on a ``get_attr`` weight, is split.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.linear:
            continue
        bound = _bind(node, LIFTABLE[F.linear])
        if bound is None:
            continue
        w, b = bound["weight"], bound["bias"]
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            continue
        if not isinstance(b, fx.Node) or b.op == "get_attr":
            continue
        bmeta, ometa = b.meta.get(TENSOR_META), node.meta.get(TENSOR_META)
        if not hasattr(bmeta, "shape") or not hasattr(ometa, "shape"):
            continue
        if len(bmeta.shape) != 1 or not ometa.shape or bmeta.shape[0] != ometa.shape[-1]:
            continue
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(F.linear, (bound["input"], w))
        linear.meta = dict(node.meta)
        node.target, node.args, node.kwargs = operator.add, (linear, b), {}
        count += 1
    return count


_RANK_FUNCTIONS = frozenset({operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                             operator.ge, operator.not_, operator.and_, operator.or_})  # fmt: skip


def _drop_rank_guards(gm: fx.GraphModule) -> int:
    """Erase ``torch._assert`` calls that test only tensor ranks (``x.ndim == 4``); their count.

    A subclass's forward often guards its input rank (timm's ``BatchNormAct2d``); the trace ran
    it on the example, channel pruning never changes a rank, and a side-effecting assert reading
    a residual branch would keep a removed branch alive and make it look non-single-exit.
    """
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch._assert or not node.args:
            continue
        cond = node.args[0]
        if not isinstance(cond, fx.Node) or not _rank_only(cond):
            continue
        gm.graph.erase_node(node)
        dropped += 1
    if dropped:  # the rank queries left unused (also those only formatted into the message)
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and _rank_only(node):
                gm.graph.erase_node(node)
    return dropped


def _collapse_std_weights(gm: fx.GraphModule) -> int:
    """Rewrite convs on a standardised weight as one :func:`std_conv2d` call; their count.

    timm's ``ScaledStdConv2d`` computes its weight in the forward (fx and export alike)::

        w' = batch_norm(w.reshape(1, O, -1), None, None, weight=(gain * s).view(-1),
                        training=True, eps=eps).reshape_as(w)
        y = conv2d(x, w', b, ...)

    and timm's ``StdConv2d`` the same with ``weight=None`` (no gain, no scale). Collapsed, the
    call is lifted like any functional conv (onto a ``StdConv2d`` holding ``w``, ``gain`` if
    any and ``b``). Only that exact form, on parameters read nowhere else, is collapsed.
    """
    collapsed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.conv2d:
            continue
        bound = _bind(node, LIFTABLE[F.conv2d])
        found = _std_weight(gm, bound["weight"]) if bound is not None else None
        if found is None:
            continue
        w, gain, scale, eps, dead = found
        args = (bound["input"], w, gain, *(bound[k] for k, _ in _CONV_SIG[2:]), scale, eps)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(std_conv2d, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for n in dead:
            gm.graph.erase_node(n)
        collapsed += 1
    return collapsed


def _reshaped(node: Any, shape: tuple[int, ...]) -> fx.Node | None:
    """What ``node`` reshapes to ``shape`` (used by ``node`` alone), else None."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    is_reshape = (node.op == "call_method" and node.target in ("reshape", "view")) or (
        node.op == "call_function" and node.target is torch.reshape
    )
    meta = node.meta.get(TENSOR_META)
    if not is_reshape or tuple(getattr(meta, "shape", ())) != shape:
        return None
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def _std_weight(gm: fx.GraphModule, wn: Any) -> tuple[Any, ...] | None:
    """``(w, gain, scale, eps, nodes to erase)`` when ``wn`` standardises a parameter ``w``."""
    if not isinstance(wn, fx.Node) or wn.op != "call_method" or len(wn.users) != 1:
        return None
    if wn.target not in ("reshape_as", "view_as") or len(wn.args) != 2:
        return None
    bn, w = wn.args
    weight = _fetch(gm, str(w.target)) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not isinstance(bn, fx.Node):
        return None
    form = _form_of(bn.target) if bn.op == "call_function" else None
    b = _bind(bn, form) if form is not None and form.name == "batch_norm" else None
    if b is None or len(bn.users) != 1 or b["training"] is not True:
        return None
    if any(b[k] is not None for k in ("running_mean", "running_var", "bias")):
        return None
    rows = (1, weight.shape[0], weight[0].numel())
    if _reshaped(b["input"], rows) is not w or set(w.users) != {b["input"], wn}:
        return None
    if b["weight"] is None:  # timm's StdConv2d: standardised, no gain
        return w, None, 1.0, b["eps"], [wn, bn, b["input"]]
    scaled = _reshaped(b["weight"], (weight.shape[0],))
    scale: Any = 1.0
    dead = [wn, bn, b["input"], b["weight"]]
    if scaled is not None and scaled.target in (operator.mul, torch.mul) and not scaled.kwargs:
        if len(scaled.users) != 1 or len(scaled.args) != 2:
            return None
        consts = [a for a in scaled.args if not isinstance(a, fx.Node)]
        nodes = [a for a in scaled.args if isinstance(a, fx.Node)]
        if len(consts) != 1 or not isinstance(consts[0], (int, float)) or len(nodes) != 1:
            return None
        dead.append(scaled)
        scale, scaled = consts[0], nodes[0]
    if not isinstance(scaled, fx.Node) or scaled.op != "get_attr" or len(scaled.users) != 1:
        return None
    gain = _fetch(gm, str(scaled.target))
    if not isinstance(gain, torch.Tensor) or gain.numel() != weight.shape[0]:
        return None
    return w, scaled, scale, b["eps"], dead


def _rank_only(node: fx.Node) -> bool:
    """The value is computed from constants and tensor ranks alone."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] == "ndim"
    if node.op == "call_method" and node.target in ("dim", "ndimension"):
        return True
    if node.op == "call_function" and node.target in _RANK_FUNCTIONS:
        return all(_rank_only(a) for a in node.all_input_nodes)
    return False


def _form_of(target: Any) -> _Form | None:
    try:
        return LIFTABLE.get(target)
    except TypeError:  # unhashable target
        return None


def _state_uses(gm: fx.GraphModule) -> Counter[int]:
    """How many graph nodes read each parameter/buffer (by tensor identity)."""
    uses: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                uses[id(value)] += 1  # its users are checked where it is lifted
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            for t in (*module.parameters(), *module.buffers()):
                uses[id(t)] += 1
    return uses


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    owner_name, _, attr = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_name) if owner_name else gm
    except AttributeError:
        return None
    return getattr(owner, attr, None)


def _bind(node: fx.Node, form: _Form) -> dict[str, Any] | None:
    """The call's arguments by name (defaults filled), or None for a form we do not know."""
    names = [n for n, _ in form.signature]
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    bound = dict(zip(names, node.args, strict=False))
    for k, v in node.kwargs.items():
        if k in bound:
            return None
        bound[k] = v
    for name, default in form.signature:
        if name not in bound:
            if default is _MISSING:
                return None
            bound[name] = default
    return bound


def _lift(gm: fx.GraphModule, node: fx.Node, form: _Form, uses: Counter[int]) -> str | None:
    """Replace ``node`` by a canonical module call; the reason when it cannot."""
    bound = _bind(node, form)
    if bound is None:
        return f"{form.name} called with arguments this pass does not know"
    x = bound.pop("input")
    meta = x.meta.get(TENSOR_META) if isinstance(x, fx.Node) else None
    if not hasattr(meta, "shape"):
        return f"the input of {form.name} is not a tensor of known shape"
    values: dict[str, Any] = {}
    targets: dict[str, str] = {}
    attrs: dict[str, fx.Node] = {}
    for name in form.tensors:
        value = bound[name]
        if value is None:
            values[name] = None
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            return f"'{name}' of {form.name} is computed, not a parameter or buffer"
        tensor = _fetch(gm, str(value.target))
        if not isinstance(tensor, torch.Tensor):
            return f"'{name}' of {form.name} ('{value.target}') is not a tensor"
        values[name], targets[name], attrs[name] = tensor, str(value.target), value
    folded: set[fx.Node] = set()  # size queries on the lifted tensors (padding=w.shape[-1]//2)
    for name, value in bound.items():
        if name in form.tensors:
            continue
        if _has_node(value):
            try:
                value = fx.node.map_arg(value, lambda n: _fold(n, set(attrs.values()), folded))
            except _NotConstant:
                return f"argument '{name}' of {form.name} is computed in the graph"
            if any(isinstance(v, torch.Tensor) for v in _leaves(value)):
                return f"argument '{name}' of {form.name} is a tensor, not a constant"
        values[name] = value
    for name, attr in attrs.items():
        if uses[id(values[name])] != 1 or set(attr.users) - folded - {node}:
            return (
                f"'{attr.target}' is used by more than one node (a shared parameter, or one "
                "also read elsewhere): one module cannot hold it for all its users"
            )
    if any(set(n.users) - folded - {node} for n in folded):
        return f"a size {form.name} reads is also used elsewhere"
    try:
        module = form.build(values, tuple(meta.shape))
    except (TypeError, ValueError) as exc:
        return f"{form.name} arguments do not form a torch.nn module ({exc})"
    if module is None:
        return f"{form.name} in a form no torch.nn module computes"
    for name, tensor in values.items():
        if name in form.tensors and tensor is not None:
            _put(module, name, tensor)
    path = _place(gm, node, module, targets)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    new.meta.setdefault(MODULE_PATH, path)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for n in reversed(list(gm.graph.nodes)):
        if n in folded and not n.users:
            gm.graph.erase_node(n)
    for attr in attrs.values():
        if not attr.users:
            gm.graph.erase_node(attr)
    return None


class _NotConstant(Exception):
    """An argument depends on more than the sizes of the lifted tensors."""


_SIZE_FUNCTIONS = frozenset({operator.getitem, operator.floordiv, operator.mul, operator.add,
                             operator.sub, operator.neg, getattr, len})  # fmt: skip


def _fold(node: fx.Node, attrs: set[fx.Node], seen: set[fx.Node]) -> Any:
    """The value of a size computed from the lifted tensors' shapes alone (else raise)."""
    if node in attrs:
        return _fetch(node.graph.owning_module, str(node.target))
    if node.op == "call_function" and node.target in _SIZE_FUNCTIONS:
        if node.target is getattr and node.args[1:] not in (("shape",),):
            raise _NotConstant
        fn = node.target
    elif node.op == "call_method" and node.target == "size":
        fn = lambda t, *a: t.size(*a)  # noqa: E731
    else:
        raise _NotConstant
    args = fx.node.map_arg(node.args, lambda n: _fold(n, attrs, seen))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: _fold(n, attrs, seen))
    value = fn(*args, **kwargs)
    if isinstance(value, torch.Tensor):
        raise _NotConstant  # a tensor, not a size
    seen.add(node)
    return value


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _has_node(value: Any) -> bool:
    found = []
    fx.node.map_arg(value, lambda n: found.append(n))
    return bool(found)


def _put(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Set ``module.<name>`` to ``tensor`` itself, as a parameter or buffer like it was."""
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    if hasattr(module, name):
        delattr(module, name)  # a plain attribute (e.g. bias=None placeholder)
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


def _place(gm: fx.GraphModule, node: fx.Node, module: nn.Module, targets: dict[str, str]) -> str:
    """Register ``module`` on ``gm`` and take the lifted tensors off their owners; its path."""
    owners = {t.rpartition(".")[0] for t in targets.values()}
    owner_path = owners.pop() if len(owners) == 1 else ""
    owner = gm.get_submodule(owner_path) if owner_path else gm
    module.eval()  # the call was traced in eval mode (an fx container's flag says nothing)
    if owner_path and _only_state_of(gm, owner, owner_path, targets):
        for child_name, child in owner.named_children():
            module.add_module(child_name, child)
        nbt = owner._buffers.get("num_batches_tracked")
        if nbt is not None and "num_batches_tracked" in module._buffers:
            module.register_buffer("num_batches_tracked", nbt)
        parent_path, _, attr = owner_path.rpartition(".")
        setattr(gm.get_submodule(parent_path) if parent_path else gm, attr, module)
        return owner_path
    for target in targets.values():
        o_path, _, attr = target.rpartition(".")
        o = gm.get_submodule(o_path) if o_path else gm
        o._parameters.pop(attr, None)
        o._buffers.pop(attr, None)
    base = node.name
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    owner.add_module(name, module)
    return f"{owner_path}.{name}" if owner_path else name


def _only_state_of(
    gm: fx.GraphModule, owner: nn.Module, owner_path: str, targets: dict[str, str]
) -> bool:
    """The owner holds nothing but the lifted tensors, has stateless children, is not called."""
    own = {n for n, t in owner._parameters.items() if t is not None}
    own |= {n for n, t in owner._buffers.items() if t is not None and n != "num_batches_tracked"}
    if own != {t.rpartition(".")[2] for t in targets.values()}:
        return False
    for child in owner.children():
        if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            return False
    return not any(n.op == "call_module" and n.target == owner_path for n in gm.graph.nodes)
