"""Latency curves and tables: denoising measured figures, choosing candidate channel counts."""

from __future__ import annotations

from fxprune.latency.denoise import (
    PERIODS,
    Alignment,
    DenoisedCurve,
    DenoisedGrid,
    alignment_classes,
    candidate_counts,
    class_of,
    denoise,
    denoise_2d,
    interpolate,
)

__all__ = [
    "PERIODS",
    "Alignment",
    "DenoisedCurve",
    "DenoisedGrid",
    "alignment_classes",
    "candidate_counts",
    "class_of",
    "denoise",
    "denoise_2d",
    "interpolate",
]
