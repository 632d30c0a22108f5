"""Latency curves and tables: step detection, denoising, candidate counts, end-to-end prediction.

The tables themselves are built by the annotation pass, :mod:`fxprune.latency.tables`.
"""

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
from fxprune.latency.predictor import Calibration, LatencyModel, MacsModel
from fxprune.latency.sampling import random_aligned_plan
from fxprune.latency.steps import detect_period, refine_period, staircase_period

__all__ = [
    "PERIODS",
    "Alignment",
    "Calibration",
    "DenoisedCurve",
    "DenoisedGrid",
    "LatencyModel",
    "MacsModel",
    "alignment_classes",
    "candidate_counts",
    "class_of",
    "denoise",
    "denoise_2d",
    "detect_period",
    "interpolate",
    "random_aligned_plan",
    "refine_period",
    "staircase_period",
]
