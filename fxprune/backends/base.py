"""The backend protocol, the measurement record, and the one timing loop all backends share.

A latency table is only as good as the figures in it, and figures from two backends are only
comparable if they were taken the same way. So every backend hands a zero-argument callable to
:func:`time_callable`, which owns warm-up, repeats, percentiles and the stability check; the
backend's job is reduced to "build a callable that runs the model once" and "say what could
change the figure" (:meth:`Backend.identity`), which keys the on-disk cache.

Stability: a run is accepted when its relative spread ``(p90 - p10) / median`` is at most
``MeasureConfig.max_rel_spread``. Otherwise the run is repeated, up to ``max_rounds`` times. If
no round is stable we report the quietest round with ``stable=False`` and warn with the numbers:
an unstable figure is never passed off as a good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "Backend",
    "BackendUnavailable",
    "InterleavedMeasurement",
    "KernelMeasurement",
    "KernelProfile",
    "LayoutBlock",
    "MeasureConfig",
    "Measurement",
    "SessionMeasurement",
    "UnstableMeasurementWarning",
    "available_cpus",
    "check_float32_inputs",
    "eval_mode",
    "host_identity",
    "identity_label",
    "layout_block_of",
    "measure_side_by_side",
    "time_callable",
    "time_interleaved",
]

# The clock; a module attribute so tests can script it.
_clock: Callable[[], int] = time.perf_counter_ns

# CPU features that change which kernels a runtime picks (and so the step structure of a
# latency curve). The "model name" alone can be as vague as "AMD EPYC".
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


class BackendUnavailable(RuntimeError):
    """The requested runtime / device is not usable here; the message says how to get it."""


class UnstableMeasurementWarning(RuntimeWarning):
    """A figure stayed noisier than ``max_rel_spread`` after every allowed re-measurement."""


@dataclass(frozen=True)
class MeasureConfig:
    """How to time one model: warm-up runs, timed repeats, and the stability criterion.

    Args:
        warmup: untimed runs before each round (allocators, caches, lazy kernel selection).
        repeats: timed runs per round; the figure is their median.
        max_rel_spread: accept a round when (p90 - p10) / median is at most this.
        max_rounds: re-measure at most this many times before reporting ``stable=False``.
        min_seconds: side-by-side timing (:func:`time_interleaved`) adds repeats until every
            model has run at least this long: a model of a few milliseconds needs hundreds of
            runs before its median settles on a shared host.
    """

    warmup: int = 10
    repeats: int = 30
    max_rel_spread: float = 0.1
    max_rounds: int = 3
    min_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"MeasureConfig.warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise ValueError(f"MeasureConfig.repeats must be >= 1, got {self.repeats}")
        if not self.max_rel_spread > 0:
            raise ValueError(f"MeasureConfig.max_rel_spread must be > 0, got {self.max_rel_spread}")
        if self.max_rounds < 1:
            raise ValueError(f"MeasureConfig.max_rounds must be >= 1, got {self.max_rounds}")


@dataclass(frozen=True)
class Measurement:
    """One latency figure with the evidence behind it.

    ``samples`` are the timed repeats (ms) of the reported round, kept so that a table can be
    audited or re-aggregated later. ``stable`` is False when no round met the spread limit.
    ``round_ms`` is filled by side-by-side timing (:func:`time_interleaved`): the median of
    each alternation round, so that two models' ratio can be taken round by round
    (:func:`relative_latency`).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    rel_spread: float
    samples: tuple[float, ...]
    stable: bool
    backend_id: str
    round_ms: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the latency cache and reports)."""
        d = asdict(self)
        d["samples"] = list(self.samples)
        d["round_ms"] = list(self.round_ms)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        """Inverse of :meth:`to_dict`."""
        return cls(
            median_ms=float(d["median_ms"]),
            p10_ms=float(d["p10_ms"]),
            p90_ms=float(d["p90_ms"]),
            rel_spread=float(d["rel_spread"]),
            samples=tuple(float(s) for s in d["samples"]),
            stable=bool(d["stable"]),
            backend_id=str(d["backend_id"]),
            round_ms=tuple(float(s) for s in d.get("round_ms", ())),
        )


def relative_latency(measurement: Measurement, reference: Measurement) -> float:
    """``measurement``'s latency as a multiple of ``reference``'s, both timed side by side.

    The median of the per-round ratios, not the ratio of the medians: on a shared host the
    speed drifts between alternation rounds (a few tenths of a second apart) by more than the
    models differ from round to round, and a paired ratio cancels that drift, so repeated
    measurements of one ratio spread less. Falls back to the ratio of medians when the two
    were not timed in the same rounds.
    """
    a, b = measurement.round_ms, reference.round_ms
    if a and len(a) == len(b):
        return float(np.median(np.asarray(a) / np.asarray(b)))
    return measurement.median_ms / reference.median_ms


@runtime_checkable
class Backend(Protocol):
    """A runtime that can time a torch module as deployment would run it."""

    def identity(self) -> dict[str, str]:
        """Everything that can change a figure: runtime, version, device, threads, dtype…"""
        ...

    def measure(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement:
        """Time ``module(*example_inputs)`` on this runtime."""
        ...


# ---- optional capabilities ---------------------------------------------------------------
# A backend implements what it can; callers ask with ``isinstance(backend, Capability)``.


@runtime_checkable
class InterleavedMeasurement(Protocol):
    """Times several modules in alternating bursts within one call (honest ratios)."""

    def measure_interleaved(
        self,
        modules: Sequence[torch.nn.Module],
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
        sessions: int = 3,
    ) -> list[Measurement]: ...


@runtime_checkable
class SessionMeasurement(Protocol):
    """Times one module over several fresh sessions (a session's own placement cancels)."""

    def measure_sessions(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
        sessions: int = 3,
    ) -> Measurement: ...


@runtime_checkable
class LayoutBlock(Protocol):
    """Reports the channel block the runtime's blocked layout uses (1 when it has none)."""

    def layout_block(self) -> int: ...


@runtime_checkable
class KernelMeasurement(Protocol):
    """Times a module by the runtime's own per-kernel profile (no session overhead)."""

    def measure_kernels(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement: ...


@runtime_checkable
class UnitMeasurement(Protocol):
    """Times many small units (a layer with its BN and activation) that differ only in their
    channel counts more cheaply than one :meth:`Backend.measure` each, e.g. by compiling one
    shape-generic artefact per kind of unit (:meth:`InductorBackend.measure_unit`). Figures are
    a surrogate of a static compile, so callers key them apart (``unit_timing``)."""

    def measure_unit(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> Measurement: ...


@runtime_checkable
class KernelProfile(Protocol):
    """Lists a module's kernels with their shapes and median times (what a layer costs inside
    the whole model)."""

    def profile_kernels(
        self,
        module: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        config: MeasureConfig | None = None,
    ) -> list[dict[str, Any]]: ...


def layout_block_of(backend: Backend) -> int:
    """The backend's channel block (:class:`LayoutBlock`), else 1."""
    return int(backend.layout_block()) if isinstance(backend, LayoutBlock) else 1


def identity_label(identity: Mapping[str, str]) -> str:
    """A short, stable label for an identity: readable prefix plus a hash of every field."""
    canonical = json.dumps(dict(identity), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return f"{identity.get('runtime', '?')}-{identity.get('device', '?')}#{digest}"


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware, unlike ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@cache
def _cpu_info() -> tuple[str, str]:
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name" and not model:
                model = value.strip()
            elif name == "flags" and not flags:
                flags = set(value.split())
    model = model or platform.processor() or platform.machine() or "unknown"
    isa = ",".join(f for f in _ISA_FLAGS if f in flags) or "unknown"
    return model, isa


def host_identity() -> dict[str, str]:
    """The host facts that change CPU figures: CPU model, vector ISA, usable CPUs, OS."""
    model, isa = _cpu_info()
    return {
        "cpu_model": model,
        "cpu_isa": isa,
        "cpu_count": str(available_cpus()),
        "machine": platform.machine(),
        "os": platform.system(),
    }


def check_float32_inputs(example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Refuse inputs the identity would misdescribe: backends measure in float32 only."""
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}; "
            "wrap a single tensor as (x,)"
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] is {type(x).__name__}, expected a torch.Tensor")
        if x.is_floating_point() and x.dtype != torch.float32:
            raise ValueError(
                f"example_inputs[{i}] has dtype {x.dtype}; backends measure float32 only "
                "(the dtype is part of the cache key). Cast the module and inputs to float32."
            )


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``module`` in eval mode and restore every submodule's own training flag after.

    Deployment runs eval mode (BN uses running statistics and folds into the conv); the
    caller's module must come back exactly as it was. A module that cannot change mode
    (``ExportedProgram.module()`` refuses ``eval()``) runs in the mode it was exported in.
    """
    flags = [(m, m.training) for m in module.modules()]
    with contextlib.suppress(NotImplementedError):  # ExportedProgram.module(): as exported
        module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def _one_run_s(fn: Callable[[], object], sync: Callable[[], None] | None) -> float:
    """One timed run (s); with ``sync``, asynchronous work is inside the timed region."""
    if sync is not None:
        sync()
    start = _clock()
    fn()
    if sync is not None:
        sync()
    return (_clock() - start) / 1e9


def _one_round(
    fn: Callable[[], object], config: MeasureConfig, sync: Callable[[], None] | None
) -> np.ndarray:
    for _ in range(config.warmup):
        fn()
    if sync is not None:
        sync()
    samples = np.empty(config.repeats, dtype=np.float64)
    for i in range(config.repeats):
        start = _clock()
        fn()
        if sync is not None:  # asynchronous devices: time the work, not the launch
            sync()
        samples[i] = (_clock() - start) / 1e6
    return samples


def _summarise(samples: np.ndarray) -> tuple[float, float, float, float]:
    p10, median, p90 = (float(v) for v in np.percentile(samples, [10, 50, 90]))
    spread = (p90 - p10) / median if median > 0 else float("inf")
    return median, p10, p90, spread


def time_interleaved(
    fns: Sequence[Sequence[Callable[[], object]]],
    config: MeasureConfig | None = None,
    *,
    backend_id: str,
    sync: Callable[[], None] | None = None,
    burst: int = 5,
) -> list[Measurement]:
    """Time several models in short alternating bursts: ``fns[m][s]`` runs model ``m`` in
    session ``s``.

    Each round visits every session of every model: one untimed run (its caches warm again
    after the previous model evicted them), then ``burst`` timed runs. Rounds are short (a
    fraction of a second), so a burst of interference on a shared host lands on all models
    alike and their ratio stays honest; several sessions average out session placement. Per
    model, the figure is the median of all its timed runs (about ``repeats × sessions``, more
    when ``config.min_seconds`` asks for it).
    """
    config = config or MeasureConfig()
    for per_model in fns:
        for fn in per_model:
            for _ in range(config.warmup):
                fn()
    burst = max(1, min(burst, config.repeats))
    rounds = -(-config.repeats // burst)
    if config.min_seconds > 0:  # enough rounds for the fastest model to run min_seconds
        fastest = min(_one_run_s(fn, sync) for per_model in fns for fn in per_model[:1])
        rounds = max(rounds, int(np.ceil(config.min_seconds / (burst * max(fastest, 1e-6)))))
    samples: list[list[float]] = [[] for _ in fns]
    per_round: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for m, per_model in enumerate(fns):
            start = len(samples[m])
            for fn in per_model:
                fn()  # untimed: back to this model's caches
                samples[m].extend(_one_run_s(fn, sync) * 1e3 for _ in range(burst))
            per_round[m].append(float(np.median(samples[m][start:])))
    out = []
    for per, round_ms in zip(samples, per_round, strict=True):
        median, p10, p90, spread = _summarise(np.asarray(per))
        out.append(
            Measurement(
                median_ms=median,
                p10_ms=p10,
                p90_ms=p90,
                rel_spread=spread,
                samples=tuple(per),
                stable=spread <= config.max_rel_spread,
                backend_id=backend_id,
                round_ms=tuple(round_ms),
            )
        )
    return out


def time_callable(
    fn: Callable[[], object],
    config: MeasureConfig | None = None,
    *,
    backend_id: str,
    sync: Callable[[], None] | None = None,
    label: str = "",
) -> Measurement:
    """Time ``fn`` with warm-up and repeats; re-measure while the spread is too wide.

    Args:
        fn: runs the model once.
        config: warm-up / repeats / stability policy (defaults to ``MeasureConfig()``).
        backend_id: recorded in the result, so a figure always says where it came from.
        sync: called before the clock starts and before it stops (e.g.
            ``torch.cuda.synchronize``), so asynchronous work is inside the timed region.
        label: names the measured thing in the instability warning.

    Returns:
        The first round that met ``max_rel_spread``; failing that, the quietest round with
        ``stable=False`` (and an :class:`UnstableMeasurementWarning`).
    """
    config = config or MeasureConfig()
    best: tuple[float, np.ndarray] | None = None
    spreads: list[float] = []
    for _ in range(config.max_rounds):
        samples = _one_round(fn, config, sync)
        spread = _summarise(samples)[3]
        spreads.append(spread)
        if best is None or spread < best[0]:
            best = (spread, samples)
        if spread <= config.max_rel_spread:
            break
    assert best is not None  # max_rounds >= 1
    samples = best[1]
    median, p10, p90, spread = _summarise(samples)
    stable = spread <= config.max_rel_spread
    if not stable:
        what = f" of {label}" if label else ""
        warnings.warn(
            f"latency{what} on {backend_id} is unstable: relative spread (p90-p10)/median "
            f"stayed above {config.max_rel_spread:.3g} in all {config.max_rounds} rounds "
            f"(spreads {', '.join(f'{s:.3g}' for s in spreads)}); reporting median "
            f"{median:.4g} ms [p10 {p10:.4g}, p90 {p90:.4g}] with stable=False. "
            "Quiet the machine, pin threads, or raise repeats.",
            UnstableMeasurementWarning,
            stacklevel=2,
        )
    return Measurement(
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        rel_spread=spread,
        samples=tuple(float(s) for s in samples),
        stable=stable,
        backend_id=backend_id,
    )


def measure_side_by_side(
    backend: Backend,
    modules: Sequence[torch.nn.Module],
    example_inputs: tuple[torch.Tensor, ...],
    config: MeasureConfig | None = None,
    sessions: int = 3,
) -> list[Measurement]:
    """Measure ``modules`` alternately, so host drift is common to all (ratios are honest).

    Uses the backend's ``measure_interleaved`` when it has one (ONNX Runtime: one export per
    module, runs going round every session of every module); otherwise alternates :meth:`Backend.measure` calls and
    reports, per module, the median-figure round.
    """
    if isinstance(backend, InterleavedMeasurement):
        return backend.measure_interleaved(modules, example_inputs, config, sessions)
    runs: list[list[Measurement]] = [[] for _ in modules]
    for _ in range(max(1, sessions)):
        for i, m in enumerate(modules):
            runs[i].append(backend.measure(m, example_inputs, config))
    out = []
    for per in runs:
        per.sort(key=lambda m: m.median_ms)
        out.append(per[len(per) // 2])
    return out
