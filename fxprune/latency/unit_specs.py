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

Attention (``kind="attention"``): an unmasked ``F.scaled_dot_product_attention`` call
(:mod:`fxprune.analysis.attention_units`), measured as SDPA alone on random ``q``, ``k``, ``v``.
``input_shape`` is ``q``'s shape with the dim the counts set at 0: the last (``E``, under
``attention="head_dim"``; the output count is then ``Ev``) or the head dim (under ``"heads"``:
both counts are the head count, ``E`` and ``Ev`` fixed). ``seq_kv`` is the key/value length
``S``, ``value_dim`` the full ``Ev``, ``causal`` its ``is_causal``. These fields are left out
of conv/linear keys, so figures cached before attention units existed still hit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxprune.analysis.attention_units import sdpa_operands
from fxprune.core.meta import TENSOR_META

__all__ = ["AttentionUnit", "UnitSpec", "attention_spec", "build_unit", "unit_spec"]

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

    kind: str  # "conv" | "linear" | "attention"
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
    seq_kv: int = 0  # attention: the key/value length S
    value_dim: int = 0  # attention: the full value width Ev
    causal: bool = False  # attention: is_causal

    def key(self) -> dict[str, Any]:
        """JSON-ready op identity for the latency cache."""
        d = asdict(self)
        # fields added later are left out at their defaults: the key every cached figure was
        # stored under before them
        for name, default in (
            ("multiplier", 1),
            ("seq_kv", 0),
            ("value_dim", 0),
            ("causal", False),
        ):
            if d[name] == default:
                del d[name]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def label(self) -> str:
        """Short human description, e.g. ``conv3x3/s2 dw 56x56 +BN+ReLU6()``."""
        if self.kind == "linear":
            what = "linear"
        elif self.kind == "attention":
            q = self.input_shape
            heads = q[-1] != 0
            what = "sdpa" + (" heads" if heads else " head_dim") + f" L{q[-2]} S{self.seq_kv}"
            what += f" d{q[-1]}" if heads else ""
            what += " causal" if self.causal else ""
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
        if self.kind == "attention":
            return cin, cout
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


def attention_spec(node: fx.Node, dim: int) -> UnitSpec:
    """The unit of an SDPA call ``node`` whose counts set ``q``'s dim ``dim`` (negative: -1 for
    the embedding dim, a batch dim for heads); see the module doc."""
    ops = sdpa_operands(node)
    q, k, v = (list(_shape(ops[name])) for name in ("query", "key", "value"))
    q[dim] = 0
    return UnitSpec(
        kind="attention",
        input_shape=tuple(q),
        seq_kv=k[-2],
        value_dim=v[-1],
        causal=bool(ops.get("is_causal", False)),
    )


class AttentionUnit(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v)``: what an attention unit times."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def _build_attention(
    spec: UnitSpec, cin: int, cout: int, gen: torch.Generator
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    q = list(spec.input_shape)
    dim = q.index(0)
    q[dim] = cin
    ev = cout if dim == len(q) - 1 else spec.value_dim
    k = [*q[:-2], spec.seq_kv, q[-1]]
    v = [*q[:-2], spec.seq_kv, ev]
    inputs = tuple(torch.randn(*s, generator=gen) for s in (q, k, v))
    return AttentionUnit(spec.causal).eval(), inputs


def build_unit(
    spec: UnitSpec, cin: int, cout: int, activation: nn.Module | None = None, seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A fresh eval-mode module for ``spec`` at (``cin``, ``cout``) channels and its input.

    BN statistics are randomised so that no exporter can treat the BN as an identity.
    """
    cin, cout = spec.counts(cin, cout)
    gen = torch.Generator().manual_seed(seed)
    if spec.kind == "attention":
        return _build_attention(spec, cin, cout, gen)
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
