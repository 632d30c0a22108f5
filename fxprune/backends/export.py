"""ONNX export with a numerical check against ONNX Runtime.

The export itself is the latency backend's (``fxprune.backends.onnxruntime.export_to_bytes``):
the file a user deploys is the same graph fxprune measured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fxprune.analysis.trace import as_input_tuple
from fxprune.core.errors import FxpruneError
from fxprune.core.io import atomic_write

__all__ = ["export_onnx"]


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Path:
    """Export ``module`` to ONNX at ``path`` (atomically) and check ORT's outputs against torch.

    The module's training flags are left as they were.

    Raises:
        FxpruneError: if ONNX Runtime's outputs differ from torch's beyond the tolerance
            (nothing is written then).
    """
    from fxprune.backends.onnxruntime import OnnxRuntimeBackend, export_to_bytes

    inputs = as_input_tuple(example_inputs)
    data = export_to_bytes(module, inputs)
    if check:
        got = OnnxRuntimeBackend(provider="cpu").run(data, inputs)
        was_training = module.training
        try:
            with torch.no_grad():
                want = module.eval()(*inputs)
        finally:
            module.train(was_training)
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        for g, w in zip(got, want, strict=True):
            w = w.detach().cpu().numpy()
            if g.shape != w.shape or not np.allclose(g, w, rtol=rtol, atol=atol):
                err = float(np.abs(g - w).max()) if g.shape == w.shape else float("nan")
                raise FxpruneError(
                    f"ONNX Runtime's output differs from torch's (max abs error {err:.3g}, "
                    f"shapes {g.shape} vs {w.shape}); nothing was written. Please report this model."
                )
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
