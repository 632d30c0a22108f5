"""The keys under which fxprune's analyses store results in ``node.meta``.

Defined once here so passes never spell a key twice.
"""

from __future__ import annotations

__all__ = ["CHANNELS", "LATENCY", "MODULE_PATH", "NOT_LIFTED", "SIZES", "SIZE_ARGS", "TENSOR_META"]

#: ChannelMap (or tuple of them, or None) describing the channel units of a node's output.
CHANNELS = "fxprune.channels"
#: LayerLatency of a conv/linear node (fxprune.latency.tables).
LATENCY = "fxprune.latency"
#: Qualified name of the user module whose forward created the node (for error messages).
MODULE_PATH = "fxprune.module_path"
#: Why a functional call on parameters was not lifted into a module (analysis.canonicalize).
NOT_LIFTED = "fxprune.not_lifted"
#: SizeExpr (or tuple of them) of a node computing an int from shape reads (analysis.sizes).
SIZES = "fxprune.sizes"
#: SizeSlot tuple of an op taking its output's sizes: where each size argument sits and which
#: output dims it gives (analysis.sizes; the rewrite writes their pruned values there).
SIZE_ARGS = "fxprune.size_args"
#: torch.fx ShapeProp's key; we read it, ShapeProp writes it.
TENSOR_META = "tensor_meta"
