"""Typed errors. Every message says what went wrong *and* what the user can do next."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FxpruneError",
    "NonFiniteError",
    "PlanError",
    "ShapeError",
    "TraceError",
]


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError):
    """The model could not be turned into an fx graph (or its shapes could not be propagated)."""


class ShapeError(TraceError):
    """The graph was captured, but running it on the example inputs failed (wrong inputs).

    Another capture front end would run the same ops on the same inputs, so ``analyze`` does
    not try one after this error.
    """


class PlanError(FxpruneError):
    """A Plan does not fit the analysed model (wrong architecture, bad indices, emptied group)."""


class NonFiniteError(FxpruneError):
    """A weight, gradient or importance score is NaN or infinite, so channels cannot be ranked."""


class ConfigError(FxpruneError, ValueError):
    """A setting fxprune does not accept; the message names the field and the values it takes."""
