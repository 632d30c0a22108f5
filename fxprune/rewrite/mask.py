"""The correctness oracle: run the *original* graph with pruned channels zeroed.

For any plan, the pruned model must equal this interpreter's output (up to float summation
order) wherever the pruned groups are exact (DESIGN.md §2): every tensor that carries a pruned
unit has those positions set to zero right after it is computed, and the output of a removed
block's branch is zeroed. In an unconstrained plan, each consumer with its own kept inputs also
sees its dropped input positions zeroed (in its copy of the input only). ``torch.where`` is used
rather than a multiply so that NaN/inf produced at pruned positions (e.g. by a division) are
cleared too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx

from fxprune.core.channel_units import varying_dims
from fxprune.core.meta import CHANNELS

if TYPE_CHECKING:
    from fxprune.analysis import Analysis
    from fxprune.core.plan import Plan

__all__ = ["MaskingInterpreter", "masked_forward"]


class MaskingInterpreter(fx.Interpreter):
    """Interprets the analysed graph, zeroing pruned channels and removed branches."""

    def __init__(self, analysis: Analysis, plan: Plan) -> None:
        super().__init__(analysis.gm)
        plan.validate(analysis)
        self.keep_unit = analysis.spaces.keep_units(plan.kept)
        self.zeroed = {analysis.block(b).branch for b in plan.removed_blocks}
        self.own_inputs: dict[str, np.ndarray] = {}  # consumer -> keep mask shaped for its input
        if plan.consumers:
            table = analysis.consumers
            for name, idx in plan.consumers.items():
                shape = [1] * len(table[name].in_shape)
                shape[table[name].dim] = table[name].n_in
                keep = np.zeros(table[name].n_in, dtype=bool)
                keep[list(idx)] = True
                self.own_inputs[name] = keep.reshape(shape)

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.own_inputs:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = (_zero_dropped(args[0], self.own_inputs[n.name]), *args[1:])
            result = getattr(self, n.op)(n.target, args, kwargs)
        else:
            result = super().run_node(n)
        if n.name in self.zeroed:
            return torch.zeros_like(result)
        return self._mask(result, n.meta.get(CHANNELS))

    def _mask(self, value: Any, u: Any) -> Any:
        if isinstance(value, (tuple, list)) and isinstance(u, tuple):
            return type(value)(self._mask(v, m) for v, m in zip(value, u, strict=False))
        if not isinstance(value, torch.Tensor) or not isinstance(u, np.ndarray):
            return value
        if not varying_dims(u):
            return value
        keep = self.keep_unit[u]
        if keep.all():
            return value
        return _zero_dropped(value, keep)


def _zero_dropped(value: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """``value`` with the positions where ``keep`` (broadcast from the right) is False zeroed."""
    mask = torch.from_numpy(keep.reshape((1,) * (value.ndim - keep.ndim) + keep.shape))
    return torch.where(
        mask.to(value.device), value, torch.zeros((), dtype=value.dtype, device=value.device)
    )


def masked_forward(analysis: Analysis, plan: Plan, *inputs: torch.Tensor) -> Any:
    """The oracle's output for ``plan`` on ``inputs``, in the containers the model returns
    (plain dicts and lists, not fx's immutable ones)."""
    return _plain(MaskingInterpreter(analysis, plan).run(*inputs))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_plain(v) for v in value)
    return value
