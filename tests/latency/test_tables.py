"""The latency annotation pass: units, periods, grids, sharing, multi-group inputs.

All figures come from the deterministic FakeBackend (tests/fake_backend.py); nothing here
depends on how fast anything runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_backend import CallOverhead, FakeBackend
from torch import nn

import fxprune
from fxprune.backends import LatencyCache, Measurement
from fxprune.latency.tables import (
    LATENCY,
    LatencyConfig,
    LayerLatency,
    annotate_latency,
    interp_weights,
)
from fxprune.latency.unit_specs import build_unit, unit_spec

QUIET = LatencyConfig(progress=False)


class Block(nn.Module):
    def __init__(self, c: int, mid: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Tiny(nn.Module):
    """Stem (fixed RGB input), ReLU6 unit, depthwise, two identical residual blocks, classifier."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.act0 = nn.ReLU6()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn_dw = nn.BatchNorm2d(32)
        self.act_dw = nn.ReLU()
        self.proj = nn.Conv2d(32, 48, 1)
        self.blocks = nn.Sequential(*[Block(48, 32) for _ in range(blocks)])
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_dw(self.bn_dw(self.dw(self.act0(self.bn0(self.stem(x))))))
        x = self.blocks(self.proj(x))
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    """Two groups concatenated into one conv (the DenseNet case)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(3, 32, 3, padding=1)
        self.c = nn.Conv2d(64, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1))


def build(model: nn.Module, cache_dir, backend: FakeBackend | None = None, size: int = 8):
    analysis = fxprune.analyze(model.eval(), torch.randn(1, 3, size, size))
    backend = backend or FakeBackend()
    tables = annotate_latency(analysis, backend, cache=LatencyCache(cache_dir), config=QUIET)
    return analysis, tables, backend


def nodes(analysis) -> dict:
    return {n.name: n for n in analysis.gm.graph.nodes}


# --------------------------------------------------------------------------- annotation


def test_every_conv_and_linear_gets_a_table(tmp_path):
    analysis, tables, _ = build(Tiny(), tmp_path)
    layers = [r for r in analysis.spaces.layers if r.kind in ("conv", "linear")]
    by_name = nodes(analysis)
    assert set(tables.layers) == {r.node for r in layers}
    for rec in layers:
        lat = by_name[rec.node].meta[LATENCY]
        assert isinstance(lat, LayerLatency) and lat is tables.layers[rec.node]
        assert np.asarray(lat.table).shape == (len(lat.in_grid), len(lat.out_grid))
        assert np.all(np.asarray(lat.table) > 0)
    for rec in analysis.spaces.layers:
        if rec.kind == "norm":
            assert LATENCY not in by_name[rec.node].meta


def test_table_shapes_follow_the_prunable_spaces(tmp_path):
    _, tables, _ = build(Tiny(), tmp_path)
    t = tables.layers
    assert t["stem"].axes == "out" and t["stem"].in_grid == (3,)  # RGB input is fixed
    assert t["dw"].axes == "channel"  # depthwise: one space, groups = c
    assert t["proj"].axes == "in,out"
    assert t["fc"].axes == "in" and t["fc"].out_grid == (10,)  # model output is frozen
    assert t["blocks_0_conv1"].axes == "in,out"


def test_period_found_and_grid_aligned(tmp_path):
    analysis, tables, _ = build(Tiny(), tmp_path, FakeBackend(period=8))
    for g in analysis.groups:
        if g.frozen:
            assert g.name not in tables.group_grids
            continue
        assert tables.group_periods[g.name] == 8
        grid = tables.group_grids[g.name]
        assert grid[-1] == g.size and all(c % 8 == 0 for c in grid)


class BlockedBackend(FakeBackend):
    """A runtime with a 16-channel blocked layout (as ONNX Runtime with AVX-512)."""

    def layout_block(self) -> int:
        return 16


@pytest.mark.parametrize("floor", [True, False])
def test_no_count_below_the_layout_block(tmp_path, floor):
    model = Tiny()
    analysis = fxprune.analyze(model.eval(), torch.randn(1, 3, 8, 8))
    config = LatencyConfig(progress=False, layout_floor=floor)
    tables = annotate_latency(
        analysis, BlockedBackend(period=4), cache=LatencyCache(tmp_path), config=config
    )
    assert tables.notes["layout_block"] == (16 if floor else 1)
    for name, grid in tables.group_grids.items():
        assert grid[-1] == next(g.size for g in analysis.groups if g.name == name)
        below = [c for c in grid if c < 16]
        assert (not below) if floor else below, (name, grid)
        if floor:
            assert 16 in grid  # the block itself stays a candidate
    for lat in tables.layers.values():  # the tables cover exactly the offered counts
        if "out" in lat.axes and floor:
            assert min(lat.out_grid) >= 16


def test_interpolated_entries_match_the_backend(tmp_path):
    """Aligned counts between measured ones are interpolated exactly for a bilinear cost."""
    analysis, tables, backend = build(Tiny(), tmp_path, FakeBackend(period=8), size=16)
    assert_cells_cost(analysis, tables, backend)


def assert_cells_cost(analysis, tables, backend: FakeBackend) -> None:
    """Every table entry equals what ``backend`` charges for the unit at those counts."""
    by_name = nodes(analysis)
    for name, lat in tables.layers.items():
        spec, act = unit_spec(by_name[name], analysis.gm)
        for ci in lat.in_grid:
            for co in lat.out_grid:
                cin = co if lat.axes == "channel" else ci
                module, inputs = build_unit(spec, cin, co, act)
                assert lat.cost(cin, co) == pytest.approx(backend.cost(module, inputs), rel=1e-4)


def test_identical_layers_share_measurements(tmp_path):
    _, _, b1 = build(Tiny(blocks=1), tmp_path / "one")
    _, two, b2 = build(Tiny(blocks=2), tmp_path / "two")
    # the second block is identical to the first: it adds no unit measurement (only the
    # whole-model figure differs)
    assert len(b2.calls) == len(b1.calls)
    a, b = two.layers["blocks_0_conv2"], two.layers["blocks_1_conv2"]
    assert a.table == b.table and a.raw == b.raw


def test_warm_cache_measures_nothing_and_gives_the_same_tables(tmp_path):
    _, cold, _ = build(Tiny(), tmp_path)
    _, warm, backend = build(Tiny(), tmp_path)
    assert backend.calls == [] and warm.measured == 0
    assert {n: t.table for n, t in warm.layers.items()} == {
        n: t.table for n, t in cold.layers.items()
    }
    assert warm.dense_ms == cold.dense_ms


def test_damaged_cache_figures_are_measured_again(tmp_path):
    """Entries with a valid checksum but a missing field or an absurd figure are misses."""
    _, cold, first = build(Tiny(), tmp_path)
    cache = LatencyCache(tmp_path)
    entries = sorted(tmp_path.glob("*.json"))
    for i, path in enumerate(entries):
        record = json.loads(path.read_text())
        value = record["value"]
        if i % 2:
            del value["median_ms"]
        else:
            value.update(median_ms=-5.0, p10_ms=-5.0, p90_ms=-5.0)
        cache.put(record["key"], value)  # re-checksummed: only the schema can tell
    _, warm, backend = build(Tiny(), tmp_path)
    assert len(backend.calls) == len(first.calls) == len(entries)
    assert {n: t.table for n, t in warm.layers.items()} == {
        n: t.table for n, t in cold.layers.items()
    }
    assert warm.dense_ms == cold.dense_ms


def test_backend_identity_separates_cache_entries(tmp_path):
    build(Tiny(), tmp_path, FakeBackend(runtime="a"))
    _, _, other = build(Tiny(), tmp_path, FakeBackend(runtime="b"))
    assert other.calls  # nothing reused across runtimes


def test_full_width_sum_plus_constant_is_the_dense_figure(tmp_path):
    analysis, tables, backend = build(Tiny(), tmp_path)
    dense = backend.cost(analysis.gm, analysis.example_inputs)
    assert tables.dense_ms == pytest.approx(dense)
    assert tables.full_sum() + tables.constant_ms == pytest.approx(dense)


@pytest.mark.parametrize("per_call", [0.0, 0.004, 0.03])
def test_the_per_call_overhead_is_taken_out_of_every_cell(tmp_path, per_call):
    """A model pays one call, not one per layer: cells hold the layer's own cost only, and the
    overhead sits once in the constant."""
    analysis, tables, _ = build(Tiny(blocks=2), tmp_path, CallOverhead(per_call), size=16)
    plain = FakeBackend(period=8)
    assert tables.notes["call_overhead_ms"] == pytest.approx(per_call, abs=1e-8)
    assert_cells_cost(analysis, tables, plain)
    dense = plain.cost(analysis.gm, analysis.example_inputs)
    assert tables.constant_ms == pytest.approx(dense + per_call - tables.full_sum())


def test_a_cell_under_the_overhead_keeps_a_share_of_its_figure(tmp_path):
    """Noise can put a tiny unit under the measured overhead; its cell stays positive and the
    table stays ordered."""
    _, tables, _ = build(Tiny(), tmp_path, CallOverhead(10.0), size=16)
    for lat in tables.layers.values():
        table = np.array(lat.table)
        assert (table > 0).all()
        assert (np.diff(table, axis=-1) >= -1e-12).all()


class KernelBackend(CallOverhead):
    """Offers a per-kernel profile (as ONNX Runtime does), which pays no call overhead."""

    def __init__(self) -> None:
        super().__init__(per_call=0.03)
        self.kernel_calls = 0

    def measure_kernels(self, module, example_inputs, config=None):
        self.kernel_calls += 1
        ms = FakeBackend.cost(self, module, example_inputs)
        return Measurement(ms, ms, ms, 0.0, (ms,), True, "kernels#0")


def test_kernel_profiles_carry_no_call_overhead(tmp_path):
    analysis = fxprune.analyze(Tiny().eval(), torch.randn(1, 3, 8, 8))
    backend = KernelBackend()
    tables = annotate_latency(analysis, backend, cache=LatencyCache(tmp_path), config=QUIET)
    assert tables.notes["unit_timing"] == "kernels"
    assert tables.notes["call_overhead_ms"] == 0.0
    assert backend.kernel_calls > 0 and len(backend.calls) == 1  # the dense model; no null call


# --------------------------------------------------------------------------------- units


class Units(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6()
        self.c2, self.b2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1, bias=False)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.c5, self.b5, self.a5 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a1(self.b1(self.c1(x)))  # conv → BN → ReLU6
        x = x + self.b2(self.c2(x))  # conv → BN → add: no activation in the unit
        x = F.relu(self.c3(x))  # conv → functional ReLU, no BN
        y = self.c4(x)  # two users: nothing folds
        x = y + torch.sigmoid(y)
        return self.a5(self.b5(self.c5(x)))


@pytest.mark.parametrize(
    ("node", "bn", "activation", "bias"),
    [
        ("c1", True, "ReLU6()", True),
        ("c2", True, "", True),
        ("c3", False, "ReLU()", False),
        ("c4", False, "", True),
        ("c5", True, "Hardswish()", True),
    ],
)
def test_unit_folds_the_following_bn_and_activation(node, bn, activation, bias):
    analysis = fxprune.analyze(Units().eval(), torch.randn(1, 3, 10, 10))
    spec, act = unit_spec(nodes(analysis)[node], analysis.gm)
    assert (spec.bn, spec.activation, spec.bias) == (bn, activation, bias)
    n, _, *spatial = nodes(analysis)[node].args[0].meta["tensor_meta"].shape
    assert spec.input_shape == (n, 0, *spatial)
    assert (act is None) == (activation == "")


def test_measured_module_is_the_unit(tmp_path):
    backend = FakeBackend()
    analysis = fxprune.analyze(Units().eval(), torch.randn(1, 3, 10, 10))
    annotate_latency(analysis, backend, cache=LatencyCache(tmp_path), config=QUIET)
    kinds = {tuple(c) for c in backend.calls}
    assert ("Conv2d", "BatchNorm2d", "ReLU6") in kinds
    assert ("Conv2d", "BatchNorm2d", "Hardswish") in kinds
    assert ("Conv2d", "ReLU") in kinds
    assert ("Conv2d", "BatchNorm2d") in kinds


class UnitBackend(FakeBackend):
    """Offers ``measure_unit`` (as inductor does): units go there, the whole model does not."""

    def __init__(self) -> None:
        super().__init__()
        self.unit_calls = 0

    def measure_unit(self, module, example_inputs, config=None):
        self.unit_calls += 1
        return self.measure(module, example_inputs, config)


@pytest.mark.parametrize(("timing", "generic"), [("kernels", True), ("wall", False)])
def test_units_go_to_measure_unit_and_are_keyed_apart(tmp_path, timing, generic):
    analysis = fxprune.analyze(Tiny().eval(), torch.randn(1, 3, 8, 8))
    config = LatencyConfig(progress=False, unit_timing=timing)
    backend = UnitBackend()
    tables = annotate_latency(analysis, backend, cache=LatencyCache(tmp_path), config=config)
    assert tables.notes["unit_timing"] == ("generic" if generic else "wall")
    # -2: the dense model and the null call (the overhead), both through measure()
    assert backend.unit_calls == (len(backend.calls) - 2 if generic else 0)
    # figures of a shape-generic compile never stand in for static ones, nor the reverse
    other = UnitBackend()
    other_config = LatencyConfig(progress=False, unit_timing="wall" if generic else "kernels")
    annotate_latency(analysis, other, cache=LatencyCache(tmp_path), config=other_config)
    assert len(other.calls) == len(backend.calls) - 1  # all units again; the dense model cached


# --------------------------------------------------------------------------- multi-group


def test_concatenated_groups_use_the_total_input_count(tmp_path):
    analysis, tables, backend = build(Concat(), tmp_path, FakeBackend(period=8), size=8)
    lat = tables.layers["c"]
    assert lat.in_grid[-1] == 64 and all(c % 8 == 0 for c in lat.in_grid)
    plan = fxprune.Plan({"a": tuple(range(8)), "b": tuple(range(16))}, (), analysis.signature)
    from fxprune.latency.predictor import LatencyModel

    model = LatencyModel(analysis, tables)
    assert model.layer_costs(plan)["c"] == pytest.approx(lat.cost(24, 16))
    # the table at a total of 24 is what the backend says for a 24-channel input
    from fxprune.latency.unit_specs import build_unit

    spec, act = unit_spec(nodes(analysis)["c"], analysis.gm)
    module, inputs = build_unit(spec, 24, 16, act)
    assert lat.cost(24, 16) == pytest.approx(backend.cost(module, inputs), rel=1e-4)


# ------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize(
    ("c", "expected"),
    [
        (16, [(1, 1.0)]),  # on the grid
        (24, [(1, 0.5), (2, 0.5)]),  # aligned, between aligned counts
        (20, [(2, 1.0)]),  # unaligned: next grid count up stands in
        (100, [(3, 1.0)]),  # beyond the grid: the largest
    ],
)
def test_interp_weights(c, expected):
    assert interp_weights((8, 16, 32, 40), 8, c) == expected


# --------------------------------------------------------------------------- attention units


def _vit(attention: str, tmp_path):
    from attention_models import FusedViT

    torch.manual_seed(0)
    analysis = fxprune.analyze(
        FusedViT(dim=64, heads=4, side=8).eval(), torch.randn(1, 3, 8, 8), attention=attention
    )
    backend = FakeBackend()
    tables = annotate_latency(analysis, backend, cache=LatencyCache(tmp_path), config=QUIET)
    return analysis, tables, backend


@pytest.mark.parametrize(("attention", "size"), [("head_dim", 16), ("heads", 4)])
def test_an_attention_unit_is_a_vector_over_the_head_group(tmp_path, attention, size):
    analysis, tables, _ = _vit(attention, tmp_path)
    (rec,) = analysis.attention_layers
    lat = tables.layers[rec.node]
    assert nodes(analysis)[rec.node].meta[LATENCY] is lat  # annotated like a layer
    assert lat.axes == "channel" and lat.unit.startswith("sdpa " + attention)
    (g,) = analysis.spaces.groups_of(rec.in_units)
    grid = tables.group_grids[analysis.groups[g].name]
    assert lat.in_grid == (size,) and lat.out_grid == grid and grid[-1] == size
    row = np.asarray(lat.table)
    assert row.shape == (1, len(grid))  # one entry per kept count on the group's grid
    assert np.all(np.diff(row[0]) > 0)  # fewer heads (a narrower head) cost less
    assert tables.constant_ms == pytest.approx(tables.dense_ms - tables.full_sum())


def test_attention_tables_cost_what_the_fake_runtime_charges(tmp_path):
    from fxprune.latency.unit_specs import build_unit

    analysis, tables, backend = _vit("heads", tmp_path)
    (rec,) = analysis.attention_layers
    lat = tables.layers[rec.node]
    for k in lat.out_grid:
        module, inputs = build_unit(lat_spec(analysis, rec), k, k)
        assert lat.cost(k, k) == pytest.approx(backend.cost(module, inputs), rel=1e-4)  # fit


def lat_spec(analysis, rec):
    from fxprune.latency.unit_specs import attention_spec

    return attention_spec(nodes(analysis)[rec.node], rec.dim)
