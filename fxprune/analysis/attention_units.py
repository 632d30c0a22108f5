"""Scaled-dot-product attention calls as latency units: which channel units set their cost.

``F.scaled_dot_product_attention(q, k, v)`` over ``q: (..., L, E)``, ``k: (..., S, E)`` and
``v: (..., S, Ev)`` costs about ``batch·L·S·(E + Ev)``; pruning changes it only through the
channels its operands carry (the channel rule, ``channel_rules.scaled_dot_product_attention``):

* ``attention="head_dim"``: ``q``/``k`` carry channels on ``E`` (the input side of the unit),
  the output carries ``v``'s ``Ev`` (the output side). timm's fused ``qkv`` makes both one group
  (one variable, like a depthwise conv); separate ``q``/``k``/``v`` projections may make two.
* ``attention="heads"``: ``q``, ``k``, ``v`` and the output carry the same head units on one
  batch dim (``_batch_channels``): one variable, the kept head count.
* ``attention="auto"``: each call is one of the two, as its splits were cut.

:func:`attention_layers` turns each such call into a :class:`AttentionRecord` — a
:class:`~fxprune.analysis.channel_context.LayerRecord` of kind ``"attention"`` whose
``in_units`` are ``q``'s units on the pruned dim and ``out_units`` the output's — so the latency
tables and the problem builder map it to groups exactly as they map a conv's axes. The records
are kept apart from ``ChannelSpaces.layers`` (weight layers, which the rewrite and importance
walk). Not units (they stay in the tables' constant part): calls with an ``attn_mask`` (its
shape and cost vary by model), calls whose operands carry no channels, and written-out
``softmax(q @ k.T) @ v`` products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import fx

from fxprune.analysis.channel_context import LayerRecord
from fxprune.core.channel_units import varying_dims
from fxprune.core.meta import CHANNELS, TENSOR_META

__all__ = ["AttentionRecord", "attention_full_counts", "attention_layers", "sdpa_operands"]

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


@dataclass(frozen=True)
class AttentionRecord(LayerRecord):
    """An SDPA call as a latency unit. ``dim`` is the dim of ``q`` (negative: from the end)
    that its channels count: ``-1`` (head_dim, ``E``) or a batch dim (heads)."""

    dim: int = -1

    @property
    def mode(self) -> str:
        """``"head_dim"`` or ``"heads"``: what the unit's counts are."""
        return "head_dim" if self.dim == -1 else "heads"


def sdpa_operands(node: fx.Node) -> dict[str, object]:
    """The SDPA call's arguments by name (positional or keyword)."""
    out: dict[str, object] = dict(zip(_NAMES, node.args, strict=False))
    for name in _NAMES:
        if name in node.kwargs:
            out[name] = node.kwargs[name]
    return out


def _padded(node: object) -> tuple[np.ndarray, tuple[int, ...]] | None:
    if not isinstance(node, fx.Node):
        return None
    u, meta = node.meta.get(CHANNELS), node.meta.get(TENSOR_META)
    if not isinstance(u, np.ndarray) or meta is None or not hasattr(meta, "shape"):
        return None
    shape = tuple(int(s) for s in meta.shape)
    return u.reshape((1,) * (len(shape) - u.ndim) + u.shape), shape


def _line(padded: tuple[np.ndarray, tuple[int, ...]] | None) -> tuple[int, np.ndarray] | None:
    """``(dim from the end, units)`` of a map varying along one dim only; None otherwise."""
    if padded is None:
        return None
    u, shape = padded
    dims = varying_dims(u)
    if len(dims) != 1:
        return None
    d = dims[0]
    return d - len(shape), np.moveaxis(u, d, -1).reshape(-1)


def attention_layers(gm: fx.GraphModule) -> list[AttentionRecord]:
    """Every unmasked SDPA call of an analysed graph whose ``q`` or output carries channels on
    the embedding dim or on one batch dim (see the module doc), in graph order."""
    out: list[AttentionRecord] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        ops = sdpa_operands(node)
        if isinstance(ops.get("attn_mask"), fx.Node):
            continue
        q, o = _padded(ops.get("query")), _padded(node)
        if q is None or o is None or len(q[1]) < 2:
            continue
        lq, lo = _line(q), _line(o)
        dims = {line[0] for line in (lq, lo) if line is not None}
        # the embedding dim, or one batch dim (never L or S); both sides on the same dim
        if len(dims) != 1 or (dim := dims.pop()) == -2:
            continue
        if dim != -1 and (lq is None or lo is None):
            continue  # heads on one side only: the channel rule froze them
        empty = np.zeros(0, dtype=np.int64)
        out.append(
            AttentionRecord(
                node=node.name,
                target="",
                kind="attention",
                in_units=lq[1] if lq is not None else empty,
                out_units=lo[1] if lo is not None else empty,
                dim=dim,
            )
        )
    return out


def attention_full_counts(node: fx.Node, rec: AttentionRecord) -> tuple[int, int]:
    """The unpruned (in, out) counts of an attention unit: heads and heads, or ``E`` and
    ``Ev``."""
    ops = sdpa_operands(node)
    q = tuple(ops["query"].meta[TENSOR_META].shape)  # type: ignore[union-attr]
    o = tuple(node.meta[TENSOR_META].shape)
    return int(q[rec.dim]), int(o[rec.dim])
