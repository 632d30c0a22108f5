"""Latency measurement on deployment runtimes, behind one small protocol, plus a disk cache.

Adding a runtime means adding one module with a class that satisfies :class:`Backend` and one
entry in :func:`get_backend`. What a backend can do beyond :meth:`Backend.measure` is declared by
the optional capability protocols (:class:`InterleavedMeasurement`, :class:`SessionMeasurement`,
:class:`LayoutBlock`, :class:`KernelMeasurement`, :class:`KernelProfile`,
:class:`UnitMeasurement`); callers test for them
with ``isinstance``.
"""

from __future__ import annotations

from typing import Any

from fxprune.backends.base import (
    Backend,
    BackendUnavailable,
    InterleavedMeasurement,
    KernelMeasurement,
    KernelProfile,
    LayoutBlock,
    MeasureConfig,
    Measurement,
    SessionMeasurement,
    UnitMeasurement,
    UnstableMeasurementWarning,
    identity_label,
    layout_block_of,
    measure_side_by_side,
    relative_latency,
    time_callable,
)
from fxprune.backends.cache import LatencyCache, default_cache_dir, key_digest
from fxprune.backends.inductor import InductorBackend, inductor_available
from fxprune.backends.onnxruntime import OnnxRuntimeBackend, export_to_bytes
from fxprune.backends.torch_eager import TorchEagerBackend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "InductorBackend",
    "InterleavedMeasurement",
    "KernelMeasurement",
    "KernelProfile",
    "LatencyCache",
    "LayoutBlock",
    "MeasureConfig",
    "Measurement",
    "OnnxRuntimeBackend",
    "SessionMeasurement",
    "TorchEagerBackend",
    "UnitMeasurement",
    "UnstableMeasurementWarning",
    "default_cache_dir",
    "export_to_bytes",
    "get_backend",
    "identity_label",
    "inductor_available",
    "key_digest",
    "layout_block_of",
    "measure_side_by_side",
    "relative_latency",
    "time_callable",
]

_BACKENDS: dict[str, type] = {
    "onnxruntime": OnnxRuntimeBackend,
    "ort": OnnxRuntimeBackend,
    "torch": TorchEagerBackend,
    "inductor": InductorBackend,
}


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name`` ("onnxruntime" | "ort" | "torch" | "inductor"), built with
    ``options``.

    Example: ``get_backend("ort", provider="cpu", threads=2)``.
    """
    try:
        cls = _BACKENDS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(_BACKENDS))}"
        ) from None
    return cls(**options)
