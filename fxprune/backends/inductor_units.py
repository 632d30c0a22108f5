"""Shape-generic inductor compiles for latency-table units: one compile per kind of unit.

A latency table times one unit (``conv → [BN] → [activation]``, or a linear) at a grid of
channel counts. Compiled statically, every count is a fresh inductor compile (seconds each on a
CPU). ``dynamic=True`` alone does not help: inductor's CPU conv lowering turns the weight's
sizes into ints (``guard_int_seq(weight.get_size())`` in ``torch/_inductor/kernel/conv.py``),
so every channel count still recompiles (measured: 3 counts, 3 compiles, for a conv, conv+BN
and a linear under ``dynamic=True``).

What inductor generates for a static conv unit on CPU (``TORCH_LOGS=output_code``, torch
2.14): one generated kernel copying the input and the weight to channels-last, the conv as an
extern call (``extern_kernels.convolution``: ATen's oneDNN conv), then BN and the activation
fused into one generated pointwise kernel. The surrogate compiles the same steps with the conv
behind an opaque custom op (``fxprune::unit_conv``, ATen's convolution at run time, the group
count read off the shapes), the weights passed as plain tensor inputs and the channel dims
marked dynamic: nothing specialises them, so one compiled artefact per kind of unit (kernel,
stride, padding, BN, activation, input size) times every count. Its figures rank and predict
the static compile; they are not the same figures (symbolic sizes in the pointwise kernels),
so tables key them apart from static ones, and the budget loop measures whole models
statically as before.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["family_key", "mark_input", "supported", "unit_function", "unit_state"]

# Attributes that carry channel counts: ignored when deciding whether two units are one kind.
_CHANNEL_ATTRS = frozenset(
    {"in_channels", "out_channels", "groups", "num_features", "in_features", "out_features"}
)


@torch.library.custom_op("fxprune::unit_conv", mutates_args=())
def unit_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """ATen's convolution with the group count read off the shapes (depthwise: ``groups = c``)."""
    groups = x.shape[1] // weight.shape[1]
    out = torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
    )
    return out.contiguous(memory_format=_memory_format(x))


@unit_conv.register_fake
def _(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(
            x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True
        )
    ]
    out = x.new_empty((x.shape[0], weight.shape[0], *spatial))
    return out.contiguous(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def supported(module: nn.Module) -> bool:
    """Whether ``module`` is a unit the surrogate can run: a Sequential of one conv (integer
    padding, zero padding mode) or linear, then modules without channel-count attributes
    other than BatchNorm's."""
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        return False
    head = module[0]
    if isinstance(head, nn.modules.conv._ConvNd):
        if head.transposed or isinstance(head.padding, str) or head.padding_mode != "zeros":
            return False
    elif not isinstance(head, nn.Linear):
        return False
    return all(not isinstance(m, nn.modules.conv._ConvNd | nn.Linear) for m in list(module)[1:])


def family_key(module: nn.Module) -> str:
    """What must match for two units to share one compiled artefact: every layer's type and
    attributes except its channel counts."""
    parts = []
    for layer in module:
        attrs = {
            k: v
            for k, v in vars(layer).items()
            if not k.startswith("_") and k not in _CHANNEL_ATTRS and k != "training"
        }
        parts.append(f"{type(layer).__qualname__}{sorted(attrs.items())!r}")
    return ";".join(parts)


def unit_state(module: nn.Module) -> list[dict[str, Tensor]]:
    """Each layer's parameters and buffers as plain tensors with their channel dims marked
    dynamic (dynamo keeps ``nn.Parameter`` shapes static: ``force_parameter_static_shapes``)."""
    state = []
    for layer in module:
        tensors = {}
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            t = t.detach().clone()
            for dim in range(min(t.dim(), 2)):  # (out, in, *kernel) weights; 1-D: channels
                torch._dynamo.maybe_mark_dynamic(t, dim)
            tensors[name] = t
        state.append(tensors)
    return state


def mark_input(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` with its channel dim marked dynamic (dim 1 for a conv, the last for a linear)."""
    x = x.detach().clone()
    torch._dynamo.maybe_mark_dynamic(x, x.dim() - 1 if isinstance(module[0], nn.Linear) else 1)
    return x


def unit_function(template: nn.Sequential, name: str) -> Callable[..., Any]:
    """``f(state, x)``: the unit's forward with weights from ``state`` (:func:`unit_state`).

    Every call returns a function with its own code object, named ``name``: dynamo caches and
    limits recompiles per code object, so kinds of unit never count against each other.
    """
    layers = list(template)
    head = layers[0]

    def forward(state: list[dict[str, Tensor]], x: Tensor) -> Tensor:
        for layer, tensors in zip(layers, state, strict=True):
            if layer is head and isinstance(head, nn.modules.conv._ConvNd):
                weight = tensors["weight"]
                if x.dim() == 4:  # what inductor's conv lowering does on CPU
                    x = x.contiguous(memory_format=torch.channels_last)
                    weight = weight.contiguous(memory_format=torch.channels_last)
                x = torch.ops.fxprune.unit_conv(
                    x,
                    weight,
                    tensors.get("bias"),
                    list(head.stride),
                    list(head.padding),
                    list(head.dilation),
                )
            else:
                x = torch.func.functional_call(layer, tensors, (x,))
        return x

    code = forward.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, forward.__globals__, name, None, forward.__closure__)
