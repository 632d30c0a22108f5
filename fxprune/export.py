"""ONNX export with a numerical check against ONNX Runtime."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fxprune.errors import FxpruneError
from fxprune.io import atomic_write
from fxprune.passes.trace import as_input_tuple

__all__ = ["export_onnx"]


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    opset: int = 17,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Path:
    """Export ``module`` to ONNX at ``path`` (atomically) and check ORT's outputs against torch.

    Raises:
        FxpruneError: if ONNX Runtime's outputs differ from torch's beyond the tolerance.
    """
    inputs = as_input_tuple(example_inputs)
    was_training = module.training

    def write(tmp: str) -> None:
        module.eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, inputs, tmp, dynamo=False, opset_version=opset,
                input_names=[f"input_{i}" for i in range(len(inputs))],
            )
        if check:
            _check(module, tmp, inputs, rtol, atol)

    try:
        return atomic_write(path, write)
    finally:
        module.train(was_training)


def _check(module: nn.Module, onnx_path: str, inputs, rtol: float, atol: float) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = module(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    for g, w in zip(got, want):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape or not np.allclose(g, w, rtol=rtol, atol=atol):
            err = float(np.abs(g - w).max()) if g.shape == w.shape else float("nan")
            raise FxpruneError(
                f"ONNX Runtime's output differs from torch's (max abs error {err:.3g}, shapes "
                f"{g.shape} vs {w.shape}); the ONNX file was not written. Please report this model."
            )
