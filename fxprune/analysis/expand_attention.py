"""Expand ``nn.MultiheadAttention`` self-attention calls into the ops attention code is made of.

``nn.MultiheadAttention`` is a leaf for fx and packs ``q``, ``k`` and ``v`` into one
``in_proj_weight``: as one opaque module it would freeze every channel it touches (torchvision's
ViT). This pass, run right after canonicalising, replaces a call it can prove equal by::

    qkv = in_proj(x)                                   # nn.Linear holding in_proj_weight/bias
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    out = out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, E))

so the attention channel rules (``unbind``, SDPA) and the linear pruners see it like any
hand-written attention. The module at the call's path is replaced by a container holding the
*same* Parameters as ``in_proj`` and its own ``out_proj`` (state-dict keys become
``in_proj.weight`` / ``in_proj.bias``).

Expanded only when the result is the same computation: self-attention (query, key and value
the same tensor), packed projections (``_qkv_same_embed_dim``), no ``bias_k``/``bias_v`` or
``add_zero_attn``, no masks, no attention dropout (``dropout == 0``: SDPA here runs without one),
a batched 3-D input, and the attention weights unused. Any other call stays the module, an
unknown op that freezes and is named in the report.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxprune.analysis.trace import refresh_shapes
from fxprune.core.meta import MODULE_PATH, NOT_LIFTED, TENSOR_META

__all__ = ["SelfAttention", "expand_attention"]

logger = logging.getLogger(__name__)


class SelfAttention(nn.Module):
    """What an expanded ``nn.MultiheadAttention`` leaves at its path: its two projections.

    The graph calls them; this module's own forward is never traced (it raises, so nobody
    mistakes it for the attention)."""

    def __init__(self, in_proj: nn.Linear, out_proj: nn.Linear) -> None:
        super().__init__()
        self.in_proj = in_proj
        self.out_proj = out_proj

    def forward(self, *_: object) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("an expanded attention is run by its graph, not by this module")


def _why_not(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> str | None:
    """Why this call cannot be expanded exactly, or None when it can."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")  # fmt: skip
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    q = given.get("query")
    shape = getattr(q.meta.get(TENSOR_META), "shape", ()) if isinstance(q, fx.Node) else ()
    checks = (
        (given.get("key") is q and given.get("value") is q, "not self-attention"),
        (m._qkv_same_embed_dim and m.in_proj_weight is not None, "separate q/k/v weights"),
        (m.bias_k is None and m.bias_v is None and not m.add_zero_attn, "bias_k/v or zero attn"),
        (given.get("key_padding_mask") is None and given.get("attn_mask") is None, "a mask"),
        (not given.get("is_causal", False), "is_causal"),
        (m.dropout == 0.0, "attention dropout"),
        (len(shape) == 3, "an unbatched input"),
        (
            all(
                u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users
            ),
            "its attention weights are used",
        ),
    )
    for ok, why in checks:
        if not ok:
            return why
    return None


def _expand(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> None:
    path = str(node.target)
    in_proj = nn.Linear(m.embed_dim, 3 * m.embed_dim, bias=m.in_proj_bias is not None)
    in_proj.weight = m.in_proj_weight
    if m.in_proj_bias is not None:
        in_proj.bias = m.in_proj_bias
    owner_name, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    setattr(owner, attr, SelfAttention(in_proj, m.out_proj))
    heads, e = m.num_heads, m.embed_dim
    g = gm.graph
    x = node.args[0] if node.args else node.kwargs["query"]
    before = set(g.nodes)
    with g.inserting_before(node):
        if not m.batch_first:
            x = g.call_method("transpose", (x, 0, 1))
        b, n = g.call_method("size", (x, 0)), g.call_method("size", (x, 1))
        qkv = g.call_module(f"{path}.in_proj", (x,))
        qkv = g.call_method("reshape", (qkv, b, n, 3, heads, e // heads))
        parts = g.call_method("unbind", (g.call_method("permute", (qkv, 2, 0, 3, 1, 4)), 0))
        q, k, v = (g.call_function(operator.getitem, (parts, i)) for i in range(3))
        out = g.call_function(F.scaled_dot_product_attention, (q, k, v))
        out = g.call_method("reshape", (g.call_method("transpose", (out, 1, 2)), b, n, e))
        out = g.call_module(f"{path}.out_proj", (out,))
        if not m.batch_first:
            out = g.call_method("transpose", (out, 0, 1))
    for user in list(node.users):  # output [0]; the unused weights [1] go
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
    for new in g.nodes:
        if new not in before:
            new.meta[MODULE_PATH] = path


def expand_attention(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> int:
    """Expand every provable ``nn.MultiheadAttention`` call of ``gm`` in place; how many.

    Shapes are propagated again when any was expanded. A call left alone records why under
    :data:`~fxprune.core.meta.NOT_LIFTED`.
    """
    expanded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(str(node.target))
        if type(m) is not nn.MultiheadAttention:  # a subclass may compute something else
            continue
        why = _why_not(gm, node, m)
        if why is not None:
            node.meta[NOT_LIFTED] = why
            logger.info("attention %s not expanded: %s", node.target, why)
            continue
        _expand(gm, node, m)
        expanded += 1
    if expanded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        refresh_shapes(gm, example_inputs)
    return expanded
