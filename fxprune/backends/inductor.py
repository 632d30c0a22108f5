"""Inductor backend: time a module compiled with ``torch.compile(backend="inductor")``.

For users who deploy with ``torch.compile``: a budget met on ONNX Runtime says little about
inductor's kernels (it fuses BatchNorm and activations into its own generated code and picks
its own convolution layouts), so the tables and the budget loop can be measured here instead.

Compiling is the expensive part (seconds per module on a CPU, far more than the timing), so
each module is compiled once per measurement, warmed up (the first calls compile and
autotune), then timed with the shared loop. Dynamo's cache is reset before each
measurement, so earlier graphs neither count against the recompile limit nor leak guards. :meth:`measure_interleaved` compiles every module first, then times them in
alternating bursts, like ONNX Runtime's. Everything that changes the generated code (torch
version, mode, threads, device, the CPU's vector ISA) is part of the identity, so the disk
cache keeps inductor figures apart from every other runtime's.

:meth:`measure_unit` times latency-table units through one shape-generic compile per kind of
unit (:mod:`fxprune.backends.inductor_units`) instead of one compile per channel count.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import torch

from fxprune.backends.base import (
    MeasureConfig,
    Measurement,
    check_float32_inputs,
    eval_mode,
    host_identity,
    identity_label,
    time_callable,
    time_interleaved,
)
from fxprune.backends.inductor_units import (
    family_key,
    mark_input,
    supported,
    unit_function,
    unit_state,
)
from fxprune.backends.torch_eager import _num_threads, torch_device

__all__ = ["MODES", "InductorBackend", "inductor_available"]

#: ``torch.compile`` modes this backend accepts (``None``: inductor's default)
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@functools.cache
def inductor_available() -> str | None:
    """``None`` when inductor compiles and runs a tiny CPU graph here, else why not (no C++
    compiler, a broken toolchain): what a test or a user needs to know before waiting on it."""
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda t: torch.relu(t) + 1, backend="inductor", fullgraph=True)
        fn(torch.randn(4))
    except Exception as exc:  # the toolchain fails in many ways
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        torch._dynamo.reset()
    return None


class InductorBackend:
    """Times a module compiled by inductor, on CPU or one CUDA device.

    Args:
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        threads: CPU threads (``None``: torch's current setting, recorded at construction).
        mode: the ``torch.compile`` mode (:data:`MODES`).
    """

    def __init__(self, device: str = "cpu", threads: int | None = None, mode: str | None = None):
        dev = torch_device(device, "inductor")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device = dev
        self.threads = threads if threads is not None else torch.get_num_threads()
        self.mode = mode
        self._units: dict[str, Callable[..., object]] = {}
        #: dynamo compiles (graphs captured) that :meth:`measure_unit` caused so far
        self.unit_compiles = 0

    def __repr__(self) -> str:
        return (
            f"InductorBackend(device={str(self.device)!r}, threads={self.threads}, "
            f"mode={self.mode!r})"
        )

    def identity(self) -> dict[str, str]:
        """torch version, mode, threads, device and host: all change the generated code."""
        ident = {
            "runtime": "torch-inductor",
            "runtime_version": torch.__version__,
            "mode": str(self.mode or "default"),
            "threads": str(self.threads),
            "dtype": "float32",
            **host_identity(),
        }
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU
            ident["device"] = f"cuda:{torch.cuda.get_device_name(self.device)}"
            ident["cuda_version"] = str(torch.version.cuda)
        else:
            ident["device"] = f"cpu:{ident['cpu_model']}"
        return ident

    def _compiled(
        self, module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]
    ) -> tuple[Callable[[], object], Callable[[], None] | None]:
        """A zero-argument runner of the compiled module (compiled by its first call), and
        the device sync to time it with. The module is copied: compiling never touches the
        caller's."""
        module = copy.deepcopy(module).eval().to(self.device)
        inputs = tuple(x.to(self.device) for x in example_inputs)
        compiled = torch.compile(module, backend="inductor", mode=self.mode, dynamic=False)

        def run() -> object:
            with torch.inference_mode():
                return compiled(*inputs)

        with _num_threads(self.threads):
            run()  # compile (and autotune) outside the timed loop
        return run, self._sync()

    def _sync(self) -> Callable[[], None] | None:
        """The device sync to time with (None on CPU)."""
        if self.device.type != "cuda":
            return None
        device = self.device
        return lambda: torch.cuda.synchronize(device)  # pragma: no cover - needs a GPU

    def measure(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement:
        """Compile ``module`` with inductor, then time its compiled calls."""
        check_float32_inputs(example_inputs)
        label = identity_label(self.identity())
        torch._dynamo.reset()
        with eval_mode(module), _num_threads(self.threads):
            run, sync = self._compiled(module, example_inputs)
            return time_callable(
                run, config, backend_id=label, sync=sync, label=type(module).__name__
            )

    def measure_interleaved(
        self,
        modules: Sequence[torch.nn.Module],
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
        sessions: int = 3,
    ) -> list[Measurement]:
        """Compile every module once, then time them in alternating bursts. A compiled
        module has no per-session placement to average out, so every "session" of a module
        runs the same compiled code."""
        check_float32_inputs(example_inputs)
        label = identity_label(self.identity())
        torch._dynamo.reset()
        with _num_threads(self.threads):
            compiled = [self._compiled(m, example_inputs) for m in modules]
            runners = [[run] * max(1, sessions) for run, _ in compiled]
            return time_interleaved(runners, config, backend_id=label, sync=compiled[0][1])

    def measure_unit(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement:
        """Time a unit (``Sequential(conv or linear, [BN], [activation])``) through the one
        compiled artefact of its kind, whatever its channel counts; anything else is compiled
        on its own (:meth:`measure`)."""
        check_float32_inputs(example_inputs)
        if len(example_inputs) != 1 or not supported(module):
            return self.measure(module, example_inputs, config)
        label = identity_label(self.identity())
        module = copy.deepcopy(module).eval().to(self.device)
        key = family_key(module)
        if key not in self._units:
            fn = unit_function(module, f"fxprune_unit_{len(self._units)}")
            self._units[key] = torch.compile(fn, backend="inductor", mode=self.mode)
        compiled = self._units[key]
        state = unit_state(module)
        x = mark_input(module, example_inputs[0].to(self.device))

        def run() -> object:
            with torch.inference_mode():
                return compiled(state, x)

        before = _graphs_compiled()
        with _num_threads(self.threads):
            run()  # compiles only when this kind of unit is new (or a guard fails)
            self.unit_compiles += _graphs_compiled() - before
            return time_callable(
                run, config, backend_id=label, sync=self._sync(), label=type(module).__name__
            )


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
