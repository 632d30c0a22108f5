"""Layer 0: data and helpers every other layer uses — errors, plan data and its JSON, the
``node.meta`` keys, channel-unit index helpers, count rounding, atomic file writes.

Imports nothing from fxprune outside ``fxprune.core``.
"""
