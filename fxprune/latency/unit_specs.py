"""Measurable units: a conv or linear call with its folded BN and fused activation, as a spec.

A runtime does not execute a conv on its own: ONNX Runtime folds the following BatchNorm into
the weights and fuses the activation into the kernel (``FusedConv``). So the thing whose
latency we tabulate is the *unit* ``layer → [BN] → [activation]``, read off the fx graph: the
layer's only user is a BN module, whose only user (or the layer's, without BN) is a known
activation. A :class:`UnitSpec` holds everything about the unit except its channel counts —
kernel, stride, padding, dilation, grouping, the input's batch and spatial size, bias, BN,
activation — and is the op part of the cache key: identical layers anywhere in any model share
their measurements.

Grouping: a depthwise conv (``groups == in``) keeps ``groups`` equal to its input count when
pruned, so its unit is measured with ``groups = c`` and ``k·c`` outputs (``k`` its channel
multiplier, usually 1; its table counts outputs, rounded up to multiples of ``k``); any other
grouped conv keeps its group count ``G`` and is measured with channel counts rounded up to
multiples of ``G``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxprune.core.meta import TENSOR_META

__all__ = ["UnitSpec", "build_unit", "unit_spec"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# Activations the runtime fuses into a conv or runs right after it. Modules are matched by
# type; functions by identity (never by name, STYLE.md).
_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
)
_ACT_FUNCTIONS: dict[Callable[..., Any], Callable[[fx.Node], nn.Module]] = {
    F.relu: lambda n: nn.ReLU(),
    torch.relu: lambda n: nn.ReLU(),
    F.relu6: lambda n: nn.ReLU6(),
    F.silu: lambda n: nn.SiLU(),
    F.hardswish: lambda n: nn.Hardswish(),
    F.hardsigmoid: lambda n: nn.Hardsigmoid(),
    F.gelu: lambda n: nn.GELU(approximate=n.kwargs.get("approximate", "none")),
    torch.sigmoid: lambda n: nn.Sigmoid(),
    torch.tanh: lambda n: nn.Tanh(),
}
_ACT_METHODS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@dataclass(frozen=True)
class UnitSpec:
    """A layer unit without its channel counts: what must match for two layers to share figures.

    ``input_shape`` is the layer input's shape with the channel dimension set to 0 (conv:
    ``(N, 0, H, W)``; linear: ``(..., 0)``). ``activation`` is a canonical string such as
    ``"ReLU()"`` or ``"LeakyReLU(negative_slope=0.1)"``, or ``""``.
    """

    kind: str  # "conv" | "linear"
    input_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    groups: int = 1  # fixed group count of a grouped (not depthwise) conv
    depthwise: bool = False
    multiplier: int = 1  # outputs per input of a depthwise conv
    bias: bool = False
    bn: bool = False
    activation: str = ""

    def key(self) -> dict[str, Any]:
        """JSON-ready op identity for the latency cache."""
        d = asdict(self)
        if d["multiplier"] == 1:  # the key every cached figure was stored under before it
            del d["multiplier"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def label(self) -> str:
        """Short human description, e.g. ``conv3x3/s2 dw 56x56 +BN+ReLU6()``."""
        if self.kind == "linear":
            what = "linear"
        else:
            what = "conv" + "x".join(map(str, self.kernel))
            if any(s != 1 for s in self.stride):
                uniform = len(set(self.stride)) == 1
                what += "/s" + (str(self.stride[0]) if uniform else "x".join(map(str, self.stride)))
            if self.depthwise:
                what += " dw" + (f"x{self.multiplier}" if self.multiplier > 1 else "")
            elif self.groups > 1:
                what += f" g{self.groups}"
            what += " " + "x".join(map(str, self.input_shape[2:]))
        return (
            what + ("+BN" if self.bn else "") + (f"+{self.activation}" if self.activation else "")
        )

    def counts(self, cin: int, cout: int) -> tuple[int, int]:
        """The channel counts a unit is built with (grouped convs round up to multiples of G; a
        depthwise conv has one space, given as its output count)."""
        if self.depthwise:
            c = -(-cin // self.multiplier)
            return c, c * self.multiplier
        g = self.groups
        return -(-cin // g) * g, -(-cout // g) * g


def _canonical_activation(module: nn.Module) -> str:
    # inplace never changes the cost of a deployed graph; everything else in repr might.
    text = repr(module).replace("inplace=True", "").replace("inplace=False", "")
    return text.replace("(, ", "(").replace(", )", ")")


def _activation_of(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return m if isinstance(m, _ACT_MODULES) else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target](node)
    if node.op == "call_function" and node.target is F.leaky_relu:
        slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        return nn.LeakyReLU(float(slope))
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[str(node.target)]()
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def unit_nodes(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node | None, fx.Node | None]:
    """The BN node and the activation node that form one unit with layer ``node`` (or None)."""
    bn = None
    nxt = _only_user(node)
    if (
        nxt is not None
        and nxt.op == "call_module"
        and isinstance(gm.get_submodule(str(nxt.target)), _BN)
    ):
        bn, nxt = nxt, _only_user(nxt)
    act = nxt if nxt is not None and _activation_of(nxt, gm) is not None else None
    return bn, act


def _shape(node: Any) -> tuple[int, ...]:
    meta = node.meta.get(TENSOR_META) if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise ValueError(
            f"no tensor_meta on the input of {node.format_node() if isinstance(node, fx.Node) else node}"
            "; run fxprune.analyze (which propagates shapes) before the latency pass"
        )
    return tuple(int(s) for s in meta.shape)


def unit_spec(node: fx.Node, gm: fx.GraphModule) -> tuple[UnitSpec, nn.Module | None]:
    """The unit of conv/linear call ``node``, and its activation module (for building it)."""
    module = gm.get_submodule(str(node.target))
    bn, act_node = unit_nodes(node, gm)
    act = _activation_of(act_node, gm) if act_node is not None else None
    common = {
        "bias": module.bias is not None,
        "bn": bn is not None,
        "activation": _canonical_activation(act) if act is not None else "",
    }
    shape = list(_shape(node.args[0]))
    if isinstance(module, nn.Linear):
        shape[-1] = 0
        return UnitSpec(kind="linear", input_shape=tuple(shape), **common), act
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        shape[1] = 0
        g = module.groups
        dw = g > 1 and g == module.in_channels
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        spec = UnitSpec(
            kind="conv",
            input_shape=tuple(shape),
            kernel=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=padding,
            dilation=tuple(module.dilation),
            padding_mode=module.padding_mode,
            groups=1 if dw else g,
            depthwise=dw,
            multiplier=module.out_channels // g if dw else 1,
            **common,
        )
        return spec, act
    raise TypeError(
        f"the latency pass measures Conv1d/2d/3d and Linear units; {node.format_node()} calls "
        f"{type(module).__name__}"
    )


def build_unit(
    spec: UnitSpec, cin: int, cout: int, activation: nn.Module | None = None, seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A fresh eval-mode module for ``spec`` at (``cin``, ``cout``) channels and its input.

    BN statistics are randomised so that no exporter can treat the BN as an identity.
    """
    cin, cout = spec.counts(cin, cout)
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    shape = list(spec.input_shape)
    if spec.kind == "linear":
        layers.append(nn.Linear(cin, cout, bias=spec.bias))
        shape[-1] = cin
        nd = 1
    else:
        nd = len(spec.kernel)
        layers.append(
            _CONVS[nd](
                cin,
                cout,
                spec.kernel,
                stride=spec.stride,
                padding=spec.padding,
                dilation=spec.dilation,
                groups=cin if spec.depthwise else spec.groups,
                bias=spec.bias,
                padding_mode=spec.padding_mode,
            )
        )
        shape[1] = cin
    if spec.bn:
        bn = _BN[nd - 1](cout)
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.1, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
        layers.append(bn)
    if spec.activation:
        if activation is None:
            raise ValueError(f"unit {spec.label()} needs its activation module to be built")
        layers.append(activation)
    x = torch.randn(*shape, generator=gen)
    return nn.Sequential(*layers).eval(), (x,)
