"""``CompileConfig``: every bad setting fails when made, naming the field and what it takes; the
deprecated keyword arguments of ``compile`` translate to the same config, with a warning."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from fake_backend import FakeBackend
from torch import nn

import fxprune
from fxprune import (
    CompileConfig,
    LoopConfig,
    MeasureConfig,
    ObjectiveConfig,
    SolveConfig,
    UnconstrainedConfig,
)
from fxprune.backends import LatencyCache
from fxprune.core.errors import ConfigError
from fxprune.latency.tables import LatencyConfig
from fxprune.pipeline.config import LEGACY_KEYWORDS, config_from_keywords
from fxprune.pipeline.result import Budget


def test_defaults_are_compiles_defaults():
    """The values compile's keyword arguments defaulted to, now in one place."""
    c = CompileConfig()
    assert c.solve == SolveConfig("minlp", 30.0, 1e-3)
    assert c.loop == LoopConfig(
        tolerance=0.02, margin=0.02, slack=0.05, max_rounds=6, sessions=1, confirm=True
    )
    assert c.unconstrained is None and c.coupling == "constrained"
    assert c.measure == MeasureConfig(warmup=5, repeats=30, min_seconds=1.5)
    assert c.latency is None and c.tables_config() == LatencyConfig(progress=True)
    assert c.allow_block_removal and not c.in_model_scales and c.progress
    assert c.leaf_modules is None and c.cache is None and c.latency_cache() is None
    assert c.frontend == "auto"
    assert c.max_params is None and c.max_macs is None and c.limits() == {}
    assert CompileConfig(max_macs=10, max_params=5).limits() == {"params": 5, "macs": 10}
    both = CompileConfig(max_activation_bytes=7, max_params=5).limits()
    assert list(both.items()) == [("params", 5), ("activation_bytes", 7)]
    assert UnconstrainedConfig().reads == "measure"
    assert CompileConfig(unconstrained=UnconstrainedConfig()).coupling == "unconstrained"


BAD = [
    (lambda: SolveConfig(solver="cplex"), "SolveConfig.solver", "'minlp', 'knapsack', 'uniform'"),
    (lambda: SolveConfig(solver=None), "SolveConfig.solver", "'minlp'"),
    (lambda: SolveConfig(time_limit=0), "SolveConfig.time_limit", "> 0"),
    (lambda: SolveConfig(time_limit="30"), "SolveConfig.time_limit", "> 0"),
    (lambda: SolveConfig(gap=1.0), "SolveConfig.gap", "[0, 1)"),
    (lambda: SolveConfig(gap=-1e-3), "SolveConfig.gap", "[0, 1)"),
    (lambda: LoopConfig(tolerance=-0.01), "LoopConfig.tolerance", "[0, 1)"),
    (lambda: LoopConfig(margin=1.0), "LoopConfig.margin", "[0, 1)"),
    (lambda: LoopConfig(slack="0.05"), "LoopConfig.slack", "[0, 1)"),
    (lambda: LoopConfig(tolerance=True), "LoopConfig.tolerance", "[0, 1)"),
    (lambda: LoopConfig(max_rounds=0), "LoopConfig.max_rounds", "integer ≥ 1"),
    (lambda: LoopConfig(max_rounds=2.5), "LoopConfig.max_rounds", "integer ≥ 1"),
    (lambda: LoopConfig(sessions=0), "LoopConfig.sessions", "integer ≥ 1"),
    (lambda: LoopConfig(confirm=1), "LoopConfig.confirm", "True or False"),
    (lambda: UnconstrainedConfig(reads="fast"), "UnconstrainedConfig.reads", "'measure'"),
    (lambda: CompileConfig(solve="minlp"), "CompileConfig.solve", "a SolveConfig"),
    (lambda: CompileConfig(loop=None), "CompileConfig.loop", "a LoopConfig"),
    (lambda: CompileConfig(unconstrained="yes"), "CompileConfig.unconstrained", "or None"),
    (lambda: CompileConfig(latency={}), "CompileConfig.latency", "a LatencyConfig or None"),
    (lambda: CompileConfig(measure=None), "CompileConfig.measure", "a MeasureConfig"),
    (lambda: CompileConfig(allow_block_removal="no"), "CompileConfig.allow_block_removal", "True"),
    (lambda: CompileConfig(in_model_scales=1), "CompileConfig.in_model_scales", "True or False"),
    (lambda: CompileConfig(progress=None), "CompileConfig.progress", "True or False"),
    (lambda: CompileConfig(leaf_modules="layer1"), "CompileConfig.leaf_modules", "sequence"),
    (lambda: CompileConfig(leaf_modules=[3]), "CompileConfig.leaf_modules", "classes or names"),
    (lambda: CompileConfig(cache=3), "CompileConfig.cache", "a LatencyCache, a directory"),
    (lambda: CompileConfig(frontend="dynamo"), "CompileConfig.frontend", "'fx', 'export', 'auto'"),
    (lambda: ObjectiveConfig(importance="hessian"), "ObjectiveConfig.importance", "'taylor'"),
    (lambda: ObjectiveConfig(normalize="max"), "ObjectiveConfig.normalize", "'mean'"),
    (lambda: ObjectiveConfig(min_keep=1.5), "ObjectiveConfig.min_keep", "[0, 1"),
    (lambda: CompileConfig(objective="taylor"), "CompileConfig.objective", "an ObjectiveConfig"),
    (lambda: CompileConfig(max_params=0), "CompileConfig.max_params", "integer ≥ 1 or None"),
    (lambda: CompileConfig(max_params=1.5e6), "CompileConfig.max_params", "integer ≥ 1"),
    (lambda: CompileConfig(max_params=True), "CompileConfig.max_params", "integer ≥ 1"),
    (lambda: CompileConfig(max_macs=-5), "CompileConfig.max_macs", "integer ≥ 1 or None"),
    (lambda: CompileConfig(max_macs="1G"), "CompileConfig.max_macs", "integer ≥ 1"),
    (
        lambda: CompileConfig(max_activation_bytes=0),
        "CompileConfig.max_activation_bytes",
        "integer ≥ 1 or None",
    ),
    (
        lambda: CompileConfig(max_activation_bytes=2.5e6),
        "CompileConfig.max_activation_bytes",
        "integer ≥ 1",
    ),
    (lambda: CompileConfig(also="torch"), "CompileConfig.also", "(backend, latency budget) pairs"),
    (lambda: CompileConfig(also=[("torch",)]), "CompileConfig.also", "pairs"),
    (lambda: CompileConfig(also=[(3, 0.5)]), "CompileConfig.also", "a backend name or a Backend"),
    (lambda: CompileConfig(also=[("torch", 1.5)]), "CompileConfig.also", "must be in (0, 1]"),
]


@pytest.mark.parametrize(
    ("make", "field", "takes"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)]
)
def test_every_bad_field_is_a_config_error_naming_it(make, field, takes):
    with pytest.raises(ConfigError) as info:
        make()
    msg = str(info.value)
    assert msg.startswith(f"{field} must be") and takes in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, fxprune.FxpruneError)


def test_good_values_are_kept_and_the_config_is_frozen(tmp_path):
    c = CompileConfig(
        leaf_modules=[nn.MultiheadAttention, "layer1.0"], cache=tmp_path, frontend="fx"
    )
    assert c.leaf_modules == (nn.MultiheadAttention, "layer1.0")  # a list becomes a tuple
    also = CompileConfig(also=[["torch", "25ms"], ("inductor", 0.5)]).also
    assert also == (("torch", Budget.ms(25.0)), ("inductor", Budget.of_dense(0.5)))
    assert isinstance(c.latency_cache(), LatencyCache)
    assert LoopConfig(tolerance=0, margin=0, slack=0).tolerance == 0  # 0 is allowed
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.progress = False  # type: ignore[misc]


QUIET = LatencyConfig(progress=False)
MEASURE = MeasureConfig(warmup=1, repeats=3)


@pytest.mark.parametrize(
    ("keywords", "config", "places"),
    [
        (
            {"solver": "knapsack", "time_limit": 5.0, "gap": 0.01},
            CompileConfig(solve=SolveConfig("knapsack", 5.0, 0.01)),
            ["solver → solve=SolveConfig(solver=...)", "gap → solve=SolveConfig(gap=...)"],
        ),
        (
            {"tolerance": 0.05, "margin": 0.0, "slack": 0.1, "max_rounds": 2, "sessions": 3},
            CompileConfig(loop=LoopConfig(0.05, 0.0, 0.1, 2, 3)),
            ["max_rounds → loop=LoopConfig(max_rounds=...)", "sessions → loop=LoopConfig("],
        ),
        (
            {"coupling": "unconstrained", "reads": "auto"},
            CompileConfig(unconstrained=UnconstrainedConfig(reads="auto")),
            ["unconstrained=UnconstrainedConfig()", "reads → unconstrained=UnconstrainedConfig("],
        ),
        (
            {"coupling": "unconstrained"},
            CompileConfig(unconstrained=UnconstrainedConfig()),
            ["coupling='unconstrained' → unconstrained=UnconstrainedConfig()"],
        ),
        ({"coupling": "constrained"}, CompileConfig(), ["coupling"]),
        (
            {"latency_config": QUIET, "measure_config": MEASURE, "progress": False},
            CompileConfig(latency=QUIET, measure=MEASURE, progress=False),
            ["latency_config → latency=...", "measure_config → measure=..."],
        ),
        ({"measure_config": None, "latency_config": None}, CompileConfig(), ["measure=..."]),
        (
            {"allow_block_removal": False, "in_model_scales": True, "leaf_modules": ["fc"]},
            CompileConfig(allow_block_removal=False, in_model_scales=True, leaf_modules=("fc",)),
            ["allow_block_removal → allow_block_removal=...", "leaf_modules → leaf_modules=..."],
        ),
    ],
)
def test_deprecated_keywords_translate_with_a_warning_naming_their_place(keywords, config, places):
    with pytest.warns(DeprecationWarning, match="is deprecated") as record:
        got = config_from_keywords(None, keywords)
    assert got == config
    msg = str(record[0].message)
    assert all(f"{k}=" in msg for k in keywords) and all(p in msg for p in places)
    assert "CompileConfig(" in msg


def test_cache_keyword_translates(tmp_path):
    with pytest.warns(DeprecationWarning, match="cache → cache="):
        got = config_from_keywords(None, {"cache": tmp_path})
    assert got.cache == tmp_path


def test_no_keywords_no_warning():
    config = CompileConfig(loop=LoopConfig(max_rounds=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_keywords(None, {}) == CompileConfig()
        assert config_from_keywords(config, {}) is config


def test_config_and_a_deprecated_keyword_is_an_error():
    config = CompileConfig(solve=SolveConfig(solver="knapsack"))
    with pytest.raises(ConfigError, match=r"config= and the deprecated .*solver") as info:
        config_from_keywords(config, {"solver": "uniform"})
    assert "solve=SolveConfig(solver=...)" in str(info.value)  # where to put it instead
    with pytest.raises(ConfigError, match="max_rounds"):
        config_from_keywords(CompileConfig(), {"max_rounds": 2})


def test_unknown_keyword_is_a_type_error_listing_the_allowed_names():
    with pytest.raises(TypeError, match="max_round") as info:
        config_from_keywords(None, {"max_round": 3})
    msg = str(info.value)
    assert all(name in msg for name in ("example_inputs", "config", *LEGACY_KEYWORDS))


@pytest.mark.parametrize(
    "keywords", [{"reads": "auto"}, {"coupling": "constrained", "reads": "full"}]
)
def test_reads_without_unconstrained_coupling_is_an_error(keywords):
    """It used to be ignored silently."""
    with pytest.raises(ConfigError, match=r"reads=.*unconstrained coupling only"):
        config_from_keywords(None, keywords)


@pytest.mark.parametrize(
    ("keywords", "field"),
    [
        ({"coupling": "loose"}, "coupling"),
        ({"coupling": "unconstrained", "reads": "fast"}, "UnconstrainedConfig.reads"),
        ({"max_rounds": 0}, "LoopConfig.max_rounds"),
        ({"solver": "cplex"}, "SolveConfig.solver"),
    ],
)
def test_deprecated_keywords_are_validated_too(keywords, field):
    with pytest.raises(ConfigError, match=field):
        config_from_keywords(None, keywords)


def test_not_a_config_is_an_error():
    with pytest.raises(ConfigError, match="CompileConfig"):
        config_from_keywords({"solver": "minlp"}, {})  # type: ignore[arg-type]


class Untraceable(nn.Module):
    """Any attempt to trace or run it fails loudly: proof that compile did no work."""

    def forward(self, x):
        raise AssertionError("compile ran the model before checking its settings")


@pytest.mark.parametrize(
    "settings",
    [
        {"config": CompileConfig(), "solver": "minlp"},
        {"max_rounds": 0},
        {"coupling": "constrained", "reads": "auto"},
        {"tolerence": 0.1},
        {"max_batches": 0},
        {"max_batches": "all"},
    ],
)
def test_compile_checks_settings_before_any_work(settings):
    backend = FakeBackend()
    with pytest.raises((ConfigError, TypeError)):
        fxprune.compile(
            Untraceable(), 0.5, example_inputs=torch.randn(1, 3), backend=backend, **settings
        )
    assert backend.calls == []


def test_compile_with_deprecated_keywords_warns_at_the_callers_line(tmp_path):
    """The deprecated path still compiles (the dense model meets this budget: one
    measurement), and the warning points at the call, not into fxprune."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.warns(DeprecationWarning, match=r"compile\(cache=, progress=\)") as record:
        result = fxprune.compile(
            model,
            "1000ms",
            example_inputs=torch.randn(1, 3, 8, 8),
            backend=FakeBackend(),
            cache=tmp_path,
            progress=False,
        )
    assert result.dense_meets_budget
    assert record[0].filename == __file__
