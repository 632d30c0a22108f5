"""Torch eager backend: time ``module(*inputs)`` under ``torch.inference_mode``.

For users who deploy the PyTorch model itself. On CUDA the device is synchronised before the
clock starts and before it stops, because kernel launches return before the work is done.
The thread count is set for the duration of a measurement only (torch's setting is global) and
is part of the identity.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from fxprune.backends.base import (
    BackendUnavailable,
    MeasureConfig,
    Measurement,
    check_float32_inputs,
    eval_mode,
    host_identity,
    identity_label,
    time_callable,
)

__all__ = ["TorchEagerBackend", "torch_device"]


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_device(device: str, runtime: str) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:N") as a torch device with an index on CUDA; a clear
    :class:`BackendUnavailable` naming ``runtime`` where torch sees no CUDA device."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"{runtime} on CUDA requested but torch sees no CUDA device "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "Run on a machine with an NVIDIA GPU and a CUDA build of torch, "
                "or use device='cpu'."
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class TorchEagerBackend:
    """Times a module in PyTorch eager mode on CPU or one CUDA device.

    Args:
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"`` (raises :class:`BackendUnavailable`
            where there is no CUDA device).
        threads: CPU threads for intra-op parallelism; ``None`` records torch's current
            setting at construction, so the identity is explicit either way.
    """

    def __init__(self, device: str = "cpu", threads: int | None = None) -> None:
        dev = torch_device(device, "torch eager")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.device = dev
        self.threads = threads if threads is not None else torch.get_num_threads()

    def __repr__(self) -> str:
        return f"TorchEagerBackend(device={str(self.device)!r}, threads={self.threads})"

    def identity(self) -> dict[str, str]:
        """torch version and build, device, threads, dtype and host: all change figures."""
        ident = {
            "runtime": "torch-eager",
            "runtime_version": torch.__version__,
            "threads": str(self.threads),
            "dtype": "float32",
            "mkldnn": str(torch.backends.mkldnn.is_available()),
            **host_identity(),
        }
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU
            ident["device"] = f"cuda:{torch.cuda.get_device_name(self.device)}"
            ident["cuda_version"] = str(torch.version.cuda)
            ident["cudnn_version"] = str(torch.backends.cudnn.version())
            ident["cudnn_benchmark"] = str(torch.backends.cudnn.benchmark)
        else:
            ident["device"] = f"cpu:{ident['cpu_model']}"
        return ident

    def measure(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement:
        """Time ``module(*example_inputs)`` in eval and inference mode on this device."""
        check_float32_inputs(example_inputs)
        label = identity_label(self.identity())
        what = type(module).__name__
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU
            # A copy: moving the caller's module to the GPU would mutate it.
            module = copy.deepcopy(module).to(self.device)
            inputs = tuple(x.to(self.device) for x in example_inputs)
            device = self.device

            def sync() -> None:
                torch.cuda.synchronize(device)

        else:
            inputs = example_inputs
            sync = None
        with eval_mode(module), torch.inference_mode(), _num_threads(self.threads):
            return time_callable(
                lambda: module(*inputs), config, backend_id=label, sync=sync, label=what
            )
