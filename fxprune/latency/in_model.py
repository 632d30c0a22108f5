"""What each layer costs *inside* the whole model, from one profiled run of the dense model.

A unit timed alone (its own session, cold thread pool, its own input in cache) does not cost
what the same layer costs in the model, and the difference varies by layer and in both
directions (small late layers tend to cost more alone, large early ones can cost less). The
tables keep the *shape* of each layer's cost over channel counts (steps, alignment); this
module supplies each layer's *scale*: the runtime's per-kernel profile of the dense model gives
every conv/linear kernel's time, and

    factor[layer] = time of its kernel in the dense model / its table's cost at full width

so that ``Σ factor·C(k_in, k_out)`` sums to the profiled kernel time at full width and keeps the
measured shape below it (assumed: the in-model/alone ratio does not depend on the counts).

Matching kernels to layers: the runtime fuses BN and activations into convs and may reorder
independent branches, so kernels are matched to fx layers by kind (conv / matmul), output shape
and kernel size, in execution order among equals (equal-shaped layers are interchangeable for a
scale); an activation kernel the runtime left unfused right after a matched kernel (same output
shape) is counted with it. Unmatched layers keep factor 1; factors are clipped to ``[1/4, 4]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from fxprune.backends import KernelProfile, MeasureConfig
from fxprune.core.meta import TENSOR_META

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.latency.tables import LatencyTables

__all__ = ["in_model_factors", "match_kernels"]

_CONV_OPS = {"Conv", "FusedConv", "NchwcConv", "QLinearConv"}
_MATMUL_OPS = {"Gemm", "MatMul", "FusedMatMul", "FusedGemm"}
# activations the runtime may leave unfused right after a layer (ORT may run SiLU as QuickGelu);
# a unit's table includes its activation, so its in-model time does too
_ACTIVATION_OPS = {"QuickGelu", "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Gelu"}


def _layer_key(analysis: Analysis, node_name: str) -> tuple | None:
    node = next(n for n in analysis.gm.graph.nodes if n.name == node_name)
    module = analysis.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    shape = tuple(node.meta[TENSOR_META].shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        return ("conv", shape[1], tuple(shape[2:]), tuple(module.kernel_size))
    if isinstance(module, nn.Linear):
        return ("matmul", shape[-1], (), ())
    return None


def _kernel_key(kernel: Mapping[str, Any]) -> tuple | None:
    op = kernel["op"]
    if not kernel["output_shape"]:
        return None
    out = list(kernel["output_shape"][0])
    if op in _CONV_OPS and len(out) >= 3:
        w = kernel["input_shapes"][1] if len(kernel["input_shapes"]) > 1 else []
        return ("conv", out[1], tuple(out[2:]), tuple(w[2:]) if len(w) > 2 else None)
    if op in _MATMUL_OPS:
        return ("matmul", out[-1], (), ())
    return None


def _same(layer: tuple, kernel: tuple) -> bool:
    if layer[0] != kernel[0] or layer[2] != kernel[2]:
        return False
    if kernel[3] is not None and layer[3] and tuple(layer[3]) != tuple(kernel[3]):
        return False
    # a blocked (NCHWc) kernel may pad channels up to its block size
    return layer[1] <= kernel[1] < layer[1] + 16 if layer[0] == "conv" else layer[1] == kernel[1]


def match_kernels(
    analysis: Analysis, layer_names: list[str], kernels: list[Mapping[str, Any]]
) -> dict[str, float]:
    """Kernel time (ms) per layer node name, for the layers a kernel could be matched to."""
    keys = [_kernel_key(k) for k in kernels]
    used = [False] * len(kernels)
    out: dict[str, float] = {}
    for name in layer_names:
        key = _layer_key(analysis, name)
        if key is None:
            continue
        for i, kk in enumerate(keys):
            if not used[i] and kk is not None and _same(key, kk):
                used[i] = True
                ms = float(kernels[i]["median_ms"])
                nxt = kernels[i + 1] if i + 1 < len(kernels) else None
                if (
                    nxt is not None
                    and nxt["op"] in _ACTIVATION_OPS
                    and nxt["output_shape"] == kernels[i]["output_shape"]
                ):
                    ms += float(nxt["median_ms"])
                out[name] = ms
                break
    return out


def in_model_factors(
    analysis: Analysis,
    tables: LatencyTables,
    backend: Any,
    config: MeasureConfig | None = None,
    clip: float = 4.0,
) -> dict[str, float]:
    """Per table layer, in-model kernel time / table cost at full width (see module doc).

    Needs a backend with ``profile_kernels`` (ONNX Runtime); returns {} otherwise.
    """
    if not isinstance(backend, KernelProfile):
        return {}
    kernels = backend.profile_kernels(
        analysis.gm, analysis.example_inputs, config or MeasureConfig(5, 30)
    )
    times = match_kernels(analysis, list(tables.layers), kernels)
    factors = {}
    for name, ms in times.items():
        full = tables.layers[name].full_ms
        if full > 0:
            factors[name] = float(np.clip(ms / full, 1.0 / clip, clip))
    return factors
