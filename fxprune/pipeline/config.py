"""``CompileConfig``: every setting of :func:`fxprune.compile`, grouped, frozen and validated.

A config is checked when it is made, so a bad option fails before any tracing or timing. The
keyword arguments ``compile`` took before (``solver=``, ``max_rounds=``, ``coupling=``, …) still
work through :func:`config_from_keywords`, with a ``DeprecationWarning`` that names the field to
use instead.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fxprune.backends import LatencyCache, MeasureConfig
from fxprune.latency.tables import LatencyConfig
from fxprune.unconstrained.reads import POLICIES

__all__ = [
    "CompileConfig",
    "LoopConfig",
    "SolveConfig",
    "UnconstrainedConfig",
    "config_from_keywords",
]

#: how compile times whole models by default (per session)
WHOLE_MODEL = MeasureConfig(warmup=5, repeats=30, min_seconds=1.5)
SOLVERS = ("minlp", "knapsack", "uniform")
COUPLINGS = ("constrained", "unconstrained")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SolveConfig:
    """How each round's plan is solved.

    Attributes:
        solver: ``"minlp"`` (exact, SCIP), or the baselines ``"knapsack"`` / ``"uniform"``.
        time_limit: SCIP's time limit per solve, in seconds.
        gap: SCIP's relative optimality gap.
        allow_block_removal: let the solver remove residual blocks (MDP); else channels only.
    """

    solver: str = "minlp"
    time_limit: float = 30.0
    gap: float = 1e-3
    allow_block_removal: bool = True

    def __post_init__(self) -> None:
        _check(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}")
        _check(self.time_limit > 0, f"time_limit must be positive, got {self.time_limit}")
        _check(0 <= self.gap < 1, f"gap must be in [0, 1), got {self.gap}")


@dataclass(frozen=True)
class LoopConfig:
    """The measured budget loop: when a round meets the budget and when to re-solve.

    Attributes:
        tolerance: a measured latency up to ``budget·(1 + tolerance)`` meets the budget.
        margin: the solver aims at ``budget·(1 − margin)`` to leave room for noise.
        slack: a plan measured under ``budget·(1 − slack)`` is loosened in a further round.
        max_rounds: solve–measure rounds at most.
    """

    tolerance: float = 0.02
    margin: float = 0.02
    slack: float = 0.05
    max_rounds: int = 4

    def __post_init__(self) -> None:
        _check(self.max_rounds >= 1, f"max_rounds must be at least 1, got {self.max_rounds}")
        for name in ("tolerance", "margin", "slack"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"{name} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class UnconstrainedConfig:
    """Unconstrained pruning (UCPE): each conv/linear keeps its own input channels.

    Attributes:
        reads: how consumers read their inputs — ``"measure"`` (time each consumer's slice /
            gather / zero-padded candidates and whole-model variants on the backend),
            ``"auto"`` (one probed copy and MAC price), ``"exact"``, ``"span"``, ``"full"``.
    """

    reads: str = "measure"

    def __post_init__(self) -> None:
        _check(self.reads in POLICIES, f"reads must be one of {POLICIES}, got {self.reads!r}")


@dataclass(frozen=True)
class CompileConfig:
    """Every setting of :func:`fxprune.compile`.

    Attributes:
        solve, loop: see :class:`SolveConfig`, :class:`LoopConfig`.
        unconstrained: set to prune without coupling constraints (UPSCALE's UCPE); ``None``
            (default) is constrained pruning: coupled tensors keep the same channels.
        latency: how latency tables are built (:class:`~fxprune.LatencyConfig`).
        measure: how whole models are timed, per session; ``sessions``: how many sessions.
        in_model_scales: scale each layer's table to its kernel time inside the profiled dense
            model (backends with a kernel profile only).
        max_batches: batches of ``data`` used for Taylor importance (None: all).
        leaf_modules: module classes or qualified names to keep opaque (their channels freeze).
        cache: latency cache (a :class:`~fxprune.backends.LatencyCache` or a directory);
            None: the default location.
        progress: report progress (logging by default; a rich bar under the CLI).
    """

    solve: SolveConfig = SolveConfig()
    loop: LoopConfig = LoopConfig()
    unconstrained: UnconstrainedConfig | None = None
    latency: LatencyConfig | None = None
    measure: MeasureConfig = WHOLE_MODEL
    sessions: int = 1
    in_model_scales: bool = False
    max_batches: int | None = None
    leaf_modules: tuple[type | str, ...] | None = None
    cache: LatencyCache | str | os.PathLike | None = field(default=None, compare=False)
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.sessions >= 1, f"sessions must be at least 1, got {self.sessions}")
        _check(
            self.max_batches is None or self.max_batches >= 1,
            f"max_batches must be at least 1 or None, got {self.max_batches}",
        )
        if self.leaf_modules is not None and not isinstance(self.leaf_modules, tuple):
            object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))

    @property
    def coupling(self) -> str:
        return "constrained" if self.unconstrained is None else "unconstrained"

    def tables_config(self) -> LatencyConfig:
        """The latency-table settings, with this config's ``progress``."""
        base = self.latency or LatencyConfig()
        return dataclasses.replace(base, progress=self.progress and base.progress)

    def latency_cache(self) -> LatencyCache | None:
        if self.cache is None or isinstance(self.cache, LatencyCache):
            return self.cache
        return LatencyCache(self.cache)


# the keyword arguments compile() took before CompileConfig: where each one lives now
_SOLVE = ("solver", "time_limit", "gap", "allow_block_removal")
_LOOP = ("tolerance", "margin", "slack", "max_rounds")
_TOP = {
    "latency_config": "latency",
    "measure_config": "measure",
    "sessions": "sessions",
    "in_model_scales": "in_model_scales",
    "max_batches": "max_batches",
    "leaf_modules": "leaf_modules",
    "cache": "cache",
    "progress": "progress",
}
LEGACY_KEYWORDS = (*_SOLVE, *_LOOP, *_TOP, "coupling", "reads")


def config_from_keywords(
    config: CompileConfig | None, keywords: Mapping[str, Any], *, stacklevel: int = 3
) -> CompileConfig:
    """``config`` (or the default) updated by the old keyword arguments of ``compile``.

    Raises:
        TypeError: for a keyword ``compile`` never took.
        ValueError: for a bad value, or ``reads`` with constrained coupling (it would be
            ignored).
    """
    unknown = sorted(set(keywords) - set(LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(
            f"compile() got unexpected keyword argument(s) {unknown}; settings go in "
            f"config=CompileConfig(...) (fields: {[f.name for f in dataclasses.fields(CompileConfig)]})"
        )
    config = config or CompileConfig()
    if not keywords:
        return config
    moved = [_where(k) for k in keywords]
    warnings.warn(
        f"compile({', '.join(f'{k}=' for k in keywords)}) is deprecated: pass "
        f"config=CompileConfig({', '.join(moved)})",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    solve = {k: keywords[k] for k in _SOLVE if k in keywords}
    loop = {k: keywords[k] for k in _LOOP if k in keywords}
    top: dict[str, Any] = {_TOP[k]: keywords[k] for k in _TOP if k in keywords}
    if top.get("measure") is None:
        top.pop("measure", None)
    if top.get("leaf_modules") is not None:
        top["leaf_modules"] = tuple(top["leaf_modules"])
    coupling = keywords.get("coupling", config.coupling)
    _check(coupling in COUPLINGS, f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    unconstrained = config.unconstrained
    if coupling == "unconstrained":
        reads = keywords.get("reads", unconstrained.reads if unconstrained else "measure")
        unconstrained = UnconstrainedConfig(reads=reads)
    else:
        _check(
            "reads" not in keywords or keywords["reads"] == "measure",
            "reads= applies to unconstrained coupling only; pass coupling='unconstrained' too",
        )
        unconstrained = None
    return dataclasses.replace(
        config,
        solve=dataclasses.replace(config.solve, **solve),
        loop=dataclasses.replace(config.loop, **loop),
        unconstrained=unconstrained,
        **top,
    )


def _where(keyword: str) -> str:
    if keyword in _SOLVE:
        return f"solve=SolveConfig({keyword}=...)"
    if keyword in _LOOP:
        return f"loop=LoopConfig({keyword}=...)"
    if keyword in ("coupling", "reads"):
        return "unconstrained=UnconstrainedConfig(reads=...)"
    return f"{_TOP[keyword]}=..."
