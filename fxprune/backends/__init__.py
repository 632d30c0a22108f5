"""Latency measurement on deployment runtimes, behind one small protocol, plus a disk cache.

Adding a runtime means adding one module with a class that satisfies :class:`Backend` and one
entry in :func:`get_backend`.
"""

from __future__ import annotations

from typing import Any

from fxprune.backends.base import (
    Backend,
    BackendUnavailable,
    MeasureConfig,
    Measurement,
    UnstableMeasurementWarning,
    identity_label,
    measure_side_by_side,
    relative_latency,
    time_callable,
)
from fxprune.backends.cache import LatencyCache, default_cache_dir, key_digest
from fxprune.backends.onnxruntime import OnnxRuntimeBackend, export_to_bytes
from fxprune.backends.torch_eager import TorchEagerBackend

__all__ = [
    "Backend",
    "BackendUnavailable",
    "LatencyCache",
    "MeasureConfig",
    "Measurement",
    "OnnxRuntimeBackend",
    "TorchEagerBackend",
    "UnstableMeasurementWarning",
    "default_cache_dir",
    "export_to_bytes",
    "get_backend",
    "identity_label",
    "key_digest",
    "measure_side_by_side",
    "relative_latency",
    "time_callable",
]

_BACKENDS: dict[str, type] = {
    "onnxruntime": OnnxRuntimeBackend,
    "ort": OnnxRuntimeBackend,
    "torch": TorchEagerBackend,
}


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name`` ("onnxruntime" | "ort" | "torch"), built with ``options``.

    Example: ``get_backend("ort", provider="cpu", threads=2)``.
    """
    try:
        cls = _BACKENDS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(_BACKENDS))}"
        ) from None
    return cls(**options)
