"""Layer 3: graph rewrites — apply a plan (pruners per layer kind, removed blocks, consumer
reads), segmented tensors, and the masking oracle every rewrite is checked against.

A rewrite is a pure function of (analysis, plan, export options); choosing among exports by
measurement lives in :mod:`fxprune.measure`.
"""
