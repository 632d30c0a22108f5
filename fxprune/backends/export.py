"""ONNX export with a numerical check against ONNX Runtime; ``torch.export`` of a pruned model.

The export itself is the latency backend's (``fxprune.backends.onnxruntime.export_to_bytes``):
the file a user deploys is the graph fxprune measured, except that its batch axis is symbolic
by default (the tables are timed at the example's batch size). A symbolic batch is only
useful if the graph does not fix the batch somewhere inside (a reshape to a constant size), so
the check runs at a second batch size too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fxprune.analysis.trace import ExampleInputs, bind_inputs
from fxprune.core.errors import FxpruneError
from fxprune.core.io import atomic_write

__all__ = ["export_onnx", "export_program"]

logger = logging.getLogger("fxprune")


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: ExampleInputs,
    *,
    check: bool = True,
    dynamic_batch: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Path:
    """Export ``module`` to ONNX at ``path`` (atomically) and check ORT's outputs against torch.

    Outputs may be a tensor or dicts, tuples and lists of tensors; they are flattened and
    named (``output``; ``output_0``, ``output_1``, …; dict keys; see
    :func:`fxprune.backends.onnxruntime.flatten_outputs`) and every one is checked. The
    module's training flags are left as they were.

    Args:
        check: compare ONNX Runtime's outputs with torch's before writing anything.
        dynamic_batch: dim 0 of the inputs and outputs is a symbolic ``batch`` axis, so the
            file runs at any batch size; the check then also runs at a second batch size (1,
            or 2 when the example has batch 1). ``False`` fixes the example's batch size.
        rtol, atol: tolerance of the check.

    Raises:
        FxpruneError: if ONNX Runtime's outputs differ from torch's beyond the tolerance, or
            cannot be computed at the second batch size (nothing is written then).
    """
    from fxprune.backends.onnxruntime import batch_size, export_to_bytes

    inputs = bind_inputs(module, example_inputs).tensors
    data = export_to_bytes(module, inputs, named_outputs=True, dynamic_batch=dynamic_batch)
    if check:
        _check(module, data, inputs, rtol, atol, other_batch=False)
        if dynamic_batch and batch_size(inputs) is not None:
            _check(module, data, _resized_batch(inputs), rtol, atol, other_batch=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _resized_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs at another batch size: the first sample, or two samples for a batch of 1.

    Only inputs whose dim 0 has the batch size change (as in the export's batch axes).
    """
    from fxprune.backends.onnxruntime import batch_size

    batch = batch_size(inputs)

    def resize(t: torch.Tensor) -> torch.Tensor:
        if not t.ndim or len(t) != batch:
            return t
        return t[:1] if batch > 1 else torch.cat([t, t.flip(-1)])

    return tuple(resize(t) for t in inputs)


def _check(
    module: nn.Module,
    data: bytes,
    inputs: tuple[torch.Tensor, ...],
    rtol: float,
    atol: float,
    *,
    other_batch: bool,
) -> None:
    """Raise unless ONNX Runtime's outputs of ``data`` match the module's on ``inputs``."""
    from fxprune.backends.base import eval_mode
    from fxprune.backends.onnxruntime import OnnxRuntimeBackend, batch_size, flatten_outputs

    where = "on the example inputs"
    hint = "Please report this model."
    if other_batch:
        where = f"at batch size {batch_size(inputs)} (the file has a dynamic batch axis)"
        hint = (
            "The graph probably fixes the batch size (e.g. a reshape to a constant size); "
            "export with dynamic_batch=False for a file with the example's batch size."
        )
    try:
        with eval_mode(module), torch.no_grad():
            want = flatten_outputs(module(*inputs))
    except Exception as exc:
        if not other_batch:
            raise
        raise FxpruneError(
            f"The model itself does not run {where}: {exc}; nothing was written. Export with "
            "dynamic_batch=False for a file with the example's batch size."
        ) from exc
    try:
        got = OnnxRuntimeBackend(provider="cpu").run(data, inputs)
    except Exception as exc:  # ORT raises its own Fail / InvalidArgument types
        raise FxpruneError(
            f"ONNX Runtime could not run the exported model {where}: {exc}; nothing was "
            f"written. {hint}"
        ) from exc
    if len(got) != len(want):
        raise FxpruneError(
            f"ONNX Runtime returned {len(got)} output(s) {where}, torch {len(want)} "
            f"({', '.join(n for n, _ in want)}); nothing was written. {hint}"
        )
    for g, (name, w) in zip(got, want, strict=True):
        w = w.detach().cpu().numpy()
        if not np.isfinite(w).all():
            raise FxpruneError(
                f"torch's output {name!r} is not finite (NaN or inf) {where}, so the ONNX file "
                "cannot be checked; nothing was written. Look for non-finite weights or inputs."
            )
        if g.shape != w.shape or not np.allclose(g, w, rtol=rtol, atol=atol):
            err = float(np.abs(g - w).max()) if g.shape == w.shape else float("nan")
            raise FxpruneError(
                f"ONNX Runtime's output {name!r} differs from torch's {where} (max abs error "
                f"{err:.3g}, shapes {g.shape} vs {w.shape}); nothing was written. {hint}"
            )


def export_program(
    module: nn.Module,
    example_inputs: ExampleInputs,
    *,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """``module`` as a ``torch.export.ExportedProgram`` (eval mode), the PT2 deployment form.

    The program saves with ``torch.export.save``, and lowers with AOTInductor
    (``torch._inductor.aoti_compile_and_package``). With ``dynamic_batch``, dim 0 of every input
    that has the batch size is dynamic; export specialises a size of 1, so a batch-1 example is
    traced at batch 2 (the program then runs at any batch size, 1 included). A graph that fixes
    its batch inside (a reshape to a constant size) cannot be dynamic: it is exported at the
    example's batch size instead, and the log says so. The module's training flags are left
    as they were.
    """
    from fxprune.backends.base import eval_mode
    from fxprune.backends.onnxruntime import batch_size

    inputs = bind_inputs(module, example_inputs).tensors
    batch = batch_size(inputs)
    with eval_mode(module), torch.no_grad():
        if dynamic_batch and batch is not None:
            traced = _resized_batch(inputs) if batch == 1 else inputs
            dim = torch.export.Dim.DYNAMIC
            shapes = tuple({0: dim} if t.ndim and len(t) == batch else None for t in inputs)
            try:
                return torch.export.export(module, traced, dynamic_shapes=shapes)
            except Exception as exc:  # the graph fixes the batch: fall back to static
                logger.info("torch.export with a dynamic batch failed (%s); exporting static", exc)
        return torch.export.export(module, inputs)
