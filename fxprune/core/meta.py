"""The keys under which fxprune's analyses store results in ``node.meta``.

Defined once here so passes never spell a key twice.
"""

from __future__ import annotations

__all__ = ["CHANNELS", "LATENCY", "MODULE_PATH", "NOT_LIFTED", "TENSOR_META"]

#: ChannelMap (or tuple of them, or None) describing the channel units of a node's output.
CHANNELS = "fxprune.channels"
#: LayerLatency of a conv/linear node (fxprune.latency.tables).
LATENCY = "fxprune.latency"
#: Qualified name of the user module whose forward created the node (for error messages).
MODULE_PATH = "fxprune.module_path"
#: Why a functional call on parameters was not lifted into a module (analysis.canonicalize).
NOT_LIFTED = "fxprune.not_lifted"
#: torch.fx ShapeProp's key; we read it, ShapeProp writes it.
TENSOR_META = "tensor_meta"
