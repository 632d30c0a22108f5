"""A deterministic stand-in for a runtime: latency computed from the module's conv/linear shapes.

Cost of a conv or linear call: ``BASE + SCALE·MACs``, times ``PENALTY`` unless its channel
counts are multiples of ``period`` (the runtime's alignment), plus ``ACT`` per activation; an
``F.scaled_dot_product_attention`` call (an attention unit, or one inside a model) costs
``BASE + SCALE·(q's positions)·S·(E + Ev)``, so fewer heads or a narrower head cost less; a
whole model (a GraphModule) adds ``CONSTANT``. Additive by construction, so tables built from
it must predict it exactly on aligned counts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from fxprune.backends import MeasureConfig, Measurement

BASE = 0.01
SCALE = 1e-6
PENALTY = 1.6
ACT = 0.002
CONSTANT = 0.5
FLOOR = 1e-9  # no call takes no time (a module without layers, e.g. the null call)

_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)


class FakeBackend:
    """Counts its calls; ``calls`` holds the measured modules' layer type names."""

    def __init__(self, period: int = 8, runtime: str = "fake") -> None:
        self.period = period
        self.runtime = runtime
        self.calls: list[list[str]] = []

    def identity(self) -> dict[str, str]:
        return {"runtime": self.runtime, "device": "none", "period": str(self.period)}

    def layer_cost(self, m: nn.Module, out_shape: tuple[int, ...]) -> float:
        if isinstance(m, nn.Linear):
            cin, cout, macs = m.in_features, m.out_features, int(np.prod(out_shape)) * m.in_features
        else:
            cin, cout = m.in_channels, m.out_channels
            per_out = (cin // m.groups) * int(np.prod(m.kernel_size))
            macs = int(np.prod(out_shape)) * per_out
        aligned = cin % self.period == 0 and cout % self.period == 0
        return (BASE + SCALE * macs) * (1.0 if aligned else PENALTY)

    def unit_cost(self, module: nn.Sequential, x: torch.Tensor) -> float:
        """A measured unit (layer, [BN], [activation]) without running it."""
        layer = module[0]
        if isinstance(layer, nn.Linear):
            out = (*x.shape[:-1], layer.out_features)
        else:
            spatial = [
                (n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, p, d, k, s in zip(
                    x.shape[2:],
                    layer.padding,
                    layer.dilation,
                    layer.kernel_size,
                    layer.stride,
                    strict=True,
                )
            ]
            out = (x.shape[0], layer.out_channels, *spatial)
        acts = sum(isinstance(m, _ACTS) for m in module)
        return self.layer_cost(layer, out) + ACT * acts

    def cost(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        """Conv / linear / activation costs, plus every SDPA call's (see the module doc)."""
        extra = [0.0]

        class _Count(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is F.scaled_dot_product_attention:
                    named = dict(zip(("query", "key", "value"), args, strict=False))
                    q, k, v = ({**named, **kwargs}[n] for n in ("query", "key", "value"))
                    positions = int(np.prod(q.shape[:-1]))
                    extra[0] += BASE + SCALE * positions * k.shape[-2] * (q.shape[-1] + v.shape[-1])
                return func(*args, **kwargs)

        with _Count():
            base = self._layers_cost(module, inputs)
        return base + extra[0]

    def _layers_cost(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        if isinstance(module, nn.Sequential) and isinstance(module[0], (nn.Conv2d, nn.Linear)):
            return self.unit_cost(module, inputs[0])
        total = [0.0]
        hooks = []
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(
                    m.register_forward_hook(
                        lambda mod, i, o: total.__setitem__(
                            0, total[0] + self.layer_cost(mod, tuple(o.shape))
                        )
                    )
                )
            elif isinstance(m, _ACTS):
                hooks.append(
                    m.register_forward_hook(lambda *a: total.__setitem__(0, total[0] + ACT))
                )
        try:
            with torch.no_grad():
                module.eval()(*inputs)
        finally:
            for h in hooks:
                h.remove()
        return total[0] + (CONSTANT if isinstance(module, fx.GraphModule) else 0.0)

    def measure(
        self,
        module: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement:
        self.calls.append([type(m).__name__ for m in module.modules()][1:])
        ms = max(self.cost(module, example_inputs), FLOOR)
        return Measurement(ms, ms, ms, 0.0, (ms,), True, f"{self.runtime}#0")


class CallOverhead(FakeBackend):
    """Every call costs ``per_call`` on top of what it runs, once per call (a session run, a
    compiled function's guards): a unit timed alone pays it, and so does a whole model, once."""

    def __init__(self, per_call: float, period: int = 8) -> None:
        super().__init__(period=period, runtime=f"call{per_call}")
        self.per_call = per_call

    def cost(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
        return super().cost(module, inputs) + self.per_call
