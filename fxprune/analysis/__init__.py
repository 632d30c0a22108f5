"""Layer 1: what a model's graph allows — tracing, the op table, channel rules and coupling
groups, removable blocks, consumers, importance, plan validation and simple plans.

Reads the user's model (through a copy) and writes ``node.meta``; never rewrites or measures.
"""

from fxprune.analysis.analyze import Analysis, analyze

__all__ = ["Analysis", "analyze"]
