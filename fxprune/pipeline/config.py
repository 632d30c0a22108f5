"""``CompileConfig``: every setting of :func:`fxprune.compile`, grouped, frozen and validated.

A config is checked when it is made, so a bad option fails before any tracing or timing, with a
:class:`~fxprune.core.errors.ConfigError` naming the field and the values it takes. The keyword
arguments ``compile`` took before (``solver=``, ``max_rounds=``, ``coupling=``, …) still work
through :func:`config_from_keywords`, with a ``DeprecationWarning`` naming where each one lives
now.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fxprune.analysis.analyze import FRONTENDS
from fxprune.analysis.channel_rules import ATTENTION, DEFAULT_ATTENTION
from fxprune.analysis.importance import IMPORTANCE_METHODS, NORMALIZATIONS
from fxprune.backends import LatencyCache, MeasureConfig
from fxprune.core.errors import ConfigError
from fxprune.latency.tables import LatencyConfig
from fxprune.unconstrained.reads import POLICIES

__all__ = [
    "COUPLINGS",
    "FRONTENDS",
    "SOLVERS",
    "CompileConfig",
    "LoopConfig",
    "ObjectiveConfig",
    "SolveConfig",
    "UnconstrainedConfig",
    "config_from_keywords",
]

#: how compile times whole models by default (per session)
WHOLE_MODEL = MeasureConfig(warmup=5, repeats=30, min_seconds=1.5)
SOLVERS = ("minlp", "knapsack", "uniform")
COUPLINGS = ("constrained", "unconstrained")


def _fail(owner: str, name: str, value: Any, takes: str) -> None:
    raise ConfigError(f"{owner}.{name} must be {takes}, got {value!r}")


def _choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        _fail(owner, name, value, f"one of {', '.join(map(repr, allowed))}")


def _number(owner: str, name: str, value: Any, lo: float, hi: float | None = None) -> None:
    """``value`` is a real number (not a bool) in ``[lo, hi)`` (``hi=None``: no upper end)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not (lo <= value and (hi is None or value < hi)):
        _fail(owner, name, value, f"a number in [{lo:g}, {'∞' if hi is None else f'{hi:g}'})")


def _positive(owner: str, name: str, value: Any) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not value > 0:
        _fail(owner, name, value, "a number > 0")


def _count(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        _fail(owner, name, value, "an integer ≥ 1")


def _optional_count(owner: str, name: str, value: Any) -> None:
    if value is not None and (
        not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1
    ):
        _fail(owner, name, value, "an integer ≥ 1 or None")


def _also(owner: str, value: Any) -> tuple[tuple[Any, Any], ...]:
    """``also`` as a tuple of (backend, Budget) pairs: a backend name or an object with
    ``identity`` and ``measure``, a budget ``Budget.parse`` reads."""
    from fxprune.pipeline.result import Budget

    takes = "a sequence of (backend, latency budget) pairs"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        _fail(owner, "also", value, takes)
    out = []
    for pair in value:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            _fail(owner, "also", value, takes)
        backend, budget = pair
        if not isinstance(backend, str) and not all(
            callable(getattr(backend, a, None)) for a in ("identity", "measure")
        ):
            _fail(owner, "also", value, takes + " (a backend name or a Backend)")
        try:
            out.append((backend, Budget.parse(budget)))
        except (TypeError, ValueError) as exc:
            _fail(owner, "also", value, f"{takes}; {exc}")
    return tuple(out)


def _flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, name, value, "True or False")


def _instance(owner: str, name: str, value: Any, kind: type, optional: bool = False) -> None:
    if not (isinstance(value, kind) or (optional and value is None)):
        article = "an" if kind.__name__[0] in "AEIOU" else "a"
        _fail(owner, name, value, f"{article} {kind.__name__}" + (" or None" if optional else ""))


@dataclass(frozen=True)
class SolveConfig:
    """How each round's plan is solved.

    Attributes:
        solver: ``"minlp"`` (exact, SCIP), or the baselines ``"knapsack"`` / ``"uniform"``.
        time_limit: the solver's time limit per solve, in seconds (``minlp`` and ``knapsack``).
        gap: SCIP's relative optimality gap (``minlp``).
    """

    solver: str = "minlp"
    time_limit: float = 30.0
    gap: float = 1e-3

    def __post_init__(self) -> None:
        _choice("SolveConfig", "solver", self.solver, SOLVERS)
        _positive("SolveConfig", "time_limit", self.time_limit)
        _number("SolveConfig", "gap", self.gap, 0.0, 1.0)


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the solver maximises, and which widths it may choose.

    Attributes:
        importance: ``"auto"`` (first-order Taylor when ``compile`` has ``data`` and
            ``loss_fn``, else L2 magnitude), ``"taylor"`` or ``"magnitude"`` (data, if given,
            then only re-estimates the norms).
        normalize: ``"none"`` (a group is worth its summed scores) or ``"mean"`` (every group's
            scores divided by their mean: a group is worth its channel count, and scores rank
            channels within it); see :func:`~fxprune.analysis.importance.normalize_scores`.
        min_keep: the smallest fraction of its channels a group may keep (a removed block's
            groups excepted); 0 lets the solver go down to the latency grid's smallest count.
    """

    importance: str = "auto"
    normalize: str = "none"
    min_keep: float = 0.0

    def __post_init__(self) -> None:
        _choice("ObjectiveConfig", "importance", self.importance, IMPORTANCE_METHODS)
        _choice("ObjectiveConfig", "normalize", self.normalize, NORMALIZATIONS)
        _number("ObjectiveConfig", "min_keep", self.min_keep, 0.0, 1.0)


@dataclass(frozen=True)
class LoopConfig:
    """The measured budget loop: when a round meets the budget and when to solve again.

    Attributes:
        tolerance: a measured latency up to ``budget·(1 + tolerance)`` meets the budget.
        margin: the solver aims at ``budget·(1 − margin)`` to leave room for noise.
        slack: a plan measured under ``budget·(1 − slack)`` is loosened in a further round.
        max_rounds: solve–measure rounds at most. A latency model fitted on one or two measured
            plans often lands the next plan far on the other side of the budget; the secant
            between the bracketing plans then needs a few more rounds to close in.
        sessions: how many runtime sessions each round's pruned and dense models are timed in
            (side by side, per session as :class:`~fxprune.MeasureConfig` says).
        confirm: a plan measured over the budget but within the tolerance is measured once
            more, side by side again, and judged on the mean of the two paired ratios. The loop
            accepts a plan on its measurement, so without it a plan a little over the budget
            passes whenever one noisy draw comes out low.
    """

    tolerance: float = 0.02
    margin: float = 0.02
    slack: float = 0.05
    max_rounds: int = 6
    sessions: int = 1
    confirm: bool = True

    def __post_init__(self) -> None:
        for name in ("tolerance", "margin", "slack"):
            _number("LoopConfig", name, getattr(self, name), 0.0, 1.0)
        _count("LoopConfig", "max_rounds", self.max_rounds)
        _count("LoopConfig", "sessions", self.sessions)
        _flag("LoopConfig", "confirm", self.confirm)


@dataclass(frozen=True)
class UnconstrainedConfig:
    """Unconstrained coupling (UCPE): each conv/linear keeps its own best input channels.

    Each consumer keeps as many inputs as the solved plan gives it; shared tensors keep the
    union, channels are reordered, and the budget is met by the measured exported model,
    copies included.

    Attributes:
        reads: how consumers read their inputs: ``"measure"`` (time each consumer's slice /
            gather / zero-padded candidates and whole-model variants on the backend, keep the
            fastest), ``"auto"`` (one probed copy and MAC price), ``"exact"``, ``"span"``,
            ``"full"``; see :mod:`fxprune.unconstrained.reads`.
    """

    reads: str = "measure"

    def __post_init__(self) -> None:
        _choice("UnconstrainedConfig", "reads", self.reads, POLICIES)


@dataclass(frozen=True)
class CompileConfig:
    """Every setting of :func:`fxprune.compile` (the model, budget, inputs, data and backend
    are its arguments).

    Attributes:
        solve: how each round is solved (:class:`SolveConfig`).
        objective: importance, its normalisation and the narrowest widths allowed
            (:class:`ObjectiveConfig`).
        loop: the measured budget loop (:class:`LoopConfig`).
        unconstrained: prune without coupling constraints (:class:`UnconstrainedConfig`);
            ``None`` (the default) is constrained pruning: coupled tensors keep the same
            channels.
        latency: how latency tables are built (:class:`~fxprune.LatencyConfig`); ``None``: the
            defaults, with this config's ``progress``.
        measure: how whole models are timed, per session (:class:`~fxprune.MeasureConfig`).
        allow_block_removal: let the solver remove residual blocks (MDP); else channels only.
        in_model_scales: scale each layer's table to its kernel time inside the profiled dense
            model (:mod:`fxprune.latency.in_model`; ONNX Runtime only).
        leaf_modules: module classes or qualified names to keep opaque (their channels freeze).
        cache: latency cache (a :class:`~fxprune.backends.LatencyCache` or a directory);
            ``None``: the default location.
        progress: log stages and progress (logger ``fxprune``; the CLI shows it with rich).
        recalibrate: when ``compile`` has ``data``, re-estimate the pruned model's BatchNorm
            statistics on it (the ``max_batches`` importance uses) before returning it
            (:func:`~fxprune.recalibrate_norms`); a trained model pruned without it often
            predicts at chance.
        frontend: selects the capture front end that turns the model into a graph: ``"fx"``
            (symbolic tracing), ``"export"`` (``torch.export``) or ``"auto"`` (the first that
            works).
        attention: what a multi-head split offers the plan: ``"head_dim"`` (positions
            within every head), ``"heads"`` (whole heads, as MDP prunes DeiT) or ``"auto"``
            (the default: positions, and whole heads at the splits whose positions cannot be
            pruned, e.g. under an interleaved rotary embedding); see :func:`fxprune.analyze`.
            Recorded in the plan's notes (``Plan.attention``); ``rebuild`` reads it.
        max_params, max_macs: limits on the pruned model's parameters and conv/linear
            multiply-accumulates, besides the latency budget: each is one more linear row in
            the solver (exact in the kept counts), checked again on the pruned model; None:
            no limit. A limit no plan meets raises :class:`~fxprune.solver.InfeasibleLimit`.
        max_activation_bytes: a limit on the pruned model's peak activation memory in bytes:
            the largest total of activations alive at one node of the graph's execution order
            (a tensor lives from the node making it to its last user), at the example inputs'
            batch and dtypes (:mod:`fxprune.analysis.liveness`). One exact row per live set
            in the solver (:mod:`fxprune.pipeline.memory`), checked again on the pruned model.
        also: latency budgets on further backends, ``((backend, budget), ...)``: a backend
            as ``compile``'s ``backend`` takes it (a name or a Backend), a budget as its
            ``latency_budget`` (a fraction of the dense model's latency *on that backend*, or
            a time). Each backend gets its own tables and calibrated latency model, one more
            row in the solver, and its own measurement of every round (side by side with the
            dense model, on it); the result reports each under ``limits["latency@<runtime>"]``
            as measured there. With ``also``, the dense model is never returned unpruned
            without a solve.
    """

    solve: SolveConfig = SolveConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    loop: LoopConfig = LoopConfig()
    unconstrained: UnconstrainedConfig | None = None
    latency: LatencyConfig | None = None
    measure: MeasureConfig = WHOLE_MODEL
    allow_block_removal: bool = True
    in_model_scales: bool = False
    leaf_modules: tuple[type | str, ...] | None = None
    cache: LatencyCache | str | os.PathLike | None = field(default=None, compare=False)
    progress: bool = True
    recalibrate: bool = True
    frontend: str = "auto"
    attention: str = DEFAULT_ATTENTION
    max_params: int | None = None
    max_macs: int | None = None
    max_activation_bytes: int | None = None
    also: tuple[tuple[Any, Any], ...] = ()

    def __post_init__(self) -> None:
        owner = "CompileConfig"
        _instance(owner, "solve", self.solve, SolveConfig)
        _instance(owner, "objective", self.objective, ObjectiveConfig)
        _instance(owner, "loop", self.loop, LoopConfig)
        _instance(owner, "unconstrained", self.unconstrained, UnconstrainedConfig, True)
        _instance(owner, "latency", self.latency, LatencyConfig, True)
        _instance(owner, "measure", self.measure, MeasureConfig)
        for name in ("allow_block_removal", "in_model_scales", "progress", "recalibrate"):
            _flag(owner, name, getattr(self, name))
        if self.leaf_modules is not None:
            leaves = self.leaf_modules
            if isinstance(leaves, (str, type)) or not isinstance(leaves, Iterable):
                _fail(owner, "leaf_modules", leaves, "a sequence of module classes or names")
            leaves = tuple(leaves)
            if not all(isinstance(m, (str, type)) for m in leaves):
                _fail(owner, "leaf_modules", leaves, "a sequence of module classes or names")
            object.__setattr__(self, "leaf_modules", leaves)
        if not (self.cache is None or isinstance(self.cache, (LatencyCache, str, os.PathLike))):
            _fail(owner, "cache", self.cache, "a LatencyCache, a directory or None")
        _choice(owner, "frontend", self.frontend, FRONTENDS)
        _choice(owner, "attention", self.attention, ATTENTION)
        _optional_count(owner, "max_params", self.max_params)
        _optional_count(owner, "max_macs", self.max_macs)
        _optional_count(owner, "max_activation_bytes", self.max_activation_bytes)
        object.__setattr__(self, "also", _also(owner, self.also))

    def limits(self) -> dict[str, int]:
        """The resource limits set (``"params"``, ``"macs"``, ``"activation_bytes"`` →
        limit), in that order."""
        given = {
            "params": self.max_params,
            "macs": self.max_macs,
            "activation_bytes": self.max_activation_bytes,
        }
        return {name: int(v) for name, v in given.items() if v is not None}

    @property
    def coupling(self) -> str:
        """``"constrained"`` or ``"unconstrained"`` (recorded in the plan's notes)."""
        return "constrained" if self.unconstrained is None else "unconstrained"

    def tables_config(self) -> LatencyConfig:
        """The latency-table settings: ``latency`` as given, else the defaults with ``progress``."""
        return self.latency or LatencyConfig(progress=self.progress)

    def latency_cache(self) -> LatencyCache | None:
        """``cache`` as a :class:`LatencyCache` (a directory is opened here, not when made)."""
        if self.cache is None or isinstance(self.cache, LatencyCache):
            return self.cache
        return LatencyCache(self.cache)


# The keyword arguments compile() took before CompileConfig, and where each one lives now.
_SOLVE = ("solver", "time_limit", "gap")
_LOOP = ("tolerance", "margin", "slack", "max_rounds", "sessions")
_UNCONSTRAINED = ("coupling", "reads")
_TOP = {
    "allow_block_removal": "allow_block_removal",
    "in_model_scales": "in_model_scales",
    "latency_config": "latency",
    "measure_config": "measure",
    "leaf_modules": "leaf_modules",
    "cache": "cache",
    "progress": "progress",
}
#: every keyword :func:`config_from_keywords` translates
LEGACY_KEYWORDS = (*_SOLVE, *_LOOP, *_UNCONSTRAINED, *_TOP)
#: the arguments ``compile`` takes itself
COMPILE_ARGUMENTS = (
    "example_inputs",
    "data",
    "loss_fn",
    "max_batches",
    "backend",
    "config",
)


def config_from_keywords(
    config: CompileConfig | None, keywords: Mapping[str, Any], *, stacklevel: int = 3
) -> CompileConfig:
    """The :class:`CompileConfig` for ``compile(config=..., **keywords)``, validated.

    ``keywords`` are the deprecated keyword arguments (``solver=``, ``max_rounds=``,
    ``coupling=``, …); each is put where it lives now, with one ``DeprecationWarning`` that
    names those places. ``stacklevel`` points the warning at ``compile``'s caller.

    Raises:
        TypeError: for a keyword ``compile`` does not take (the message lists those it does).
        ConfigError: for a bad value; for ``reads`` without ``coupling="unconstrained"`` (it
            would be ignored); for deprecated keywords together with ``config`` (say each
            setting once: in the config).
    """
    unknown = sorted(set(keywords) - set(LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(
            f"compile() got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
            f"{', '.join(COMPILE_ARGUMENTS)} and, deprecated, {', '.join(LEGACY_KEYWORDS)} "
            "(settings go in config=CompileConfig(...))"
        )
    if config is not None and not isinstance(config, CompileConfig):
        raise ConfigError(f"compile(config=) must be a CompileConfig, got {config!r}")
    if not keywords:
        return config or CompileConfig()
    places = [_where(k) for k in keywords]
    if config is not None:
        raise ConfigError(
            f"compile() got config= and the deprecated keyword argument(s) "
            f"{', '.join(keywords)}: give each setting once, in the config ({'; '.join(places)})"
        )
    warnings.warn(
        f"compile({', '.join(f'{k}=' for k in keywords)}) is deprecated: pass "
        f"config=CompileConfig(...) with {'; '.join(places)}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return _translate(keywords)


def _translate(keywords: Mapping[str, Any]) -> CompileConfig:
    """The deprecated keywords, each in its place in a new config."""
    solve = SolveConfig(**{k: keywords[k] for k in _SOLVE if k in keywords})
    loop = LoopConfig(**{k: keywords[k] for k in _LOOP if k in keywords})
    top = {_TOP[k]: keywords[k] for k in _TOP if k in keywords}
    if top.get("measure", WHOLE_MODEL) is None:  # None always meant "compile's default"
        del top["measure"]
    coupling = keywords.get("coupling", "constrained")
    _choice("compile(coupling=)", "coupling", coupling, COUPLINGS)
    unconstrained = None
    if coupling == "unconstrained":
        reads = {"reads": keywords["reads"]} if "reads" in keywords else {}
        unconstrained = UnconstrainedConfig(**reads)
    elif "reads" in keywords:
        raise ConfigError(
            f"compile(reads={keywords['reads']!r}) applies to unconstrained coupling only and "
            "would be ignored: pass coupling='unconstrained' too (or "
            "config=CompileConfig(unconstrained=UnconstrainedConfig(reads=...)))"
        )
    return CompileConfig(solve=solve, loop=loop, unconstrained=unconstrained, **top)


def _where(keyword: str) -> str:
    """Where a deprecated keyword of ``compile`` lives in :class:`CompileConfig`."""
    if keyword in _SOLVE:
        return f"{keyword} → solve=SolveConfig({keyword}=...)"
    if keyword in _LOOP:
        return f"{keyword} → loop=LoopConfig({keyword}=...)"
    if keyword == "coupling":
        return "coupling='unconstrained' → unconstrained=UnconstrainedConfig()"
    if keyword == "reads":
        return "reads → unconstrained=UnconstrainedConfig(reads=...)"
    return f"{keyword} → {_TOP[keyword]}=..."
