"""Latency annotation: a measured cost table ``C[k_in, k_out]`` for every conv, linear and attention unit.

For each conv/linear call the pass measures its *unit* (layer + folded BN + fused activation,
:mod:`fxprune.latency.unit_specs`) on the backend, at the layer's real input size and batch, and
stores a :class:`LayerLatency` in ``node.meta["fxprune.latency"]``. How:

1. **Steps.** A 1-D sweep of contiguous counts (the output count; the input count when the
   output is fixed) finds the unit's alignment period ``P`` (:func:`alignment_classes`), then
   :func:`refine_period` checks whether multiples of ``2P`` beat the odd multiples of ``P``
   beside them, and so on: ``P`` ends as the coarsest alignment the runtime rewards.
2. **Grid.** A coupling group's candidate counts are multiples of the largest ``P`` among the
   layers it feeds or comes from (capped at ``size / 4``, so every group keeps a choice), at most
   ``max_candidates`` of them, plus the full size. A layer's table axes are its groups' grids.
3. **Measure coarsely.** Only ``measured_per_axis`` counts per axis are measured (the smallest,
   the largest aligned, the full size, evenly spaced ones); :func:`denoise_2d` fits them
   (monotone within alignment classes, robust to interference; raw figures are kept), and the
   rest of the grid is interpolated bilinearly *within an alignment class* — exact for the
   bilinear ``k_in·k_out`` cost of a conv between aligned counts.
4. **Shapes of tables.** A matrix where input and output are both prunable; a vector where one
   side is fixed (the stem conv's RGB input, the classifier's outputs) and for depthwise convs
   (one space, ``groups = c``); a single figure where neither side is prunable.
5. **Several groups on one input** (DenseNet concatenations): the cost is modelled as a
   function of the *total* input count (the sum of kept counts over the concatenated groups),
   on a grid of multiples of the smallest period among them. A conv reads the concatenation as
   one tensor, so its kernel sees only the total.
6. **Attention.** An unmasked SDPA call is a unit too (:mod:`fxprune.analysis.attention_units`):
   its input axis is ``q``'s pruned dim (``E``, or the heads), its output axis the output's
   (``Ev``, or the heads). Where one group sets both (heads; timm's fused ``qkv``) it is a
   vector over that group (``axes == "channel"``, like a depthwise conv).
7. **The call overhead.** A unit timed by a whole call (anything but a per-kernel profile)
   pays the runtime's fixed cost of one call: a session run, a compiled function's guards, a
   deterministic runtime's constant. A model pays it once, not once per layer, so with it in
   every cell a plan that removes blocks looks cheaper than it is by that much per removed
   unit, and the budget loop chases a saving that is not there. The overhead is measured on a
   null module (one add on one element) and taken out of every cell (a cell keeps at least a
   twentieth of its figure).
8. **The constant.** Everything not in a table (stand-alone BN, pooling, adds, reshapes, the
   runtime's per-op overhead, the one call) is ``dense whole-model latency − Σ tables at full
   width``; the predictor's calibration refines it (:mod:`fxprune.latency.predictor`).

Every figure goes through :class:`~fxprune.backends.LatencyCache`, keyed by the unit spec, the
counts, the measurement settings and the backend identity, so identical layers — in one model or
across models and runs — are measured once.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxprune.analysis.attention_units import attention_full_counts
from fxprune.backends import (
    Backend,
    KernelMeasurement,
    LatencyCache,
    MeasureConfig,
    Measurement,
    SessionMeasurement,
    UnitMeasurement,
    identity_label,
    layout_block_of,
)
from fxprune.core.meta import LATENCY
from fxprune.core.progress import reporter
from fxprune.latency.denoise import candidate_counts, class_of, denoise_2d
from fxprune.latency.steps import detect_period
from fxprune.latency.unit_specs import UnitSpec, attention_spec, build_unit, unit_spec

__all__ = [
    "LATENCY",
    "LatencyConfig",
    "LatencyTables",
    "LayerLatency",
    "annotate_latency",
]


_FORMAT = 1
_MIN_SHARE = 0.05  # a cell keeps at least this share of its figure after the overhead

# Sweep points only need to rank neighbours; table points are what predictions rest on.
_SWEEP = MeasureConfig(warmup=2, repeats=10, max_rel_spread=0.15, max_rounds=2)
_GRID = MeasureConfig(warmup=5, repeats=20, max_rel_spread=0.1, max_rounds=3)
# The dense figure sets the constant part of every uncalibrated prediction, so its runs go round
# three sessions for at least 0.7 s each: a single short session at a busy moment can be far off,
# and the cache would keep it.
_WHOLE = MeasureConfig(warmup=5, repeats=30, max_rel_spread=0.1, max_rounds=3, min_seconds=0.7)


@dataclass(frozen=True)
class LatencyConfig:
    """How tables are built.

    Args:
        sweep_halfwidth: the period sweep measures ``2·halfwidth + 1`` contiguous counts around
            a multiple of 32 near the middle of the swept axis (at most 96); 20 resolves
            periods up to 16.
        max_period: never align coarser than this.
        max_candidates: at most this many candidate counts per group (the step grows).
        measured_per_axis: counts measured per axis of a matrix; the rest is interpolated.
        measured_per_vector: counts measured along a vector (depthwise, one side fixed).
        sweep_measure / grid_measure / whole_measure: timing settings for sweep points, table
            points and the dense whole model.
        unit_timing: ``"kernels"`` times a unit the cheapest faithful way the backend offers:
            by the runtime's own per-kernel profile without layout conversions, which a whole
            model pays only at its ends (``measure_kernels``, i.e. ONNX Runtime), else through
            one shape-generic compile per kind of unit (``measure_unit``, i.e. inductor: one
            compile instead of one per channel count); ``"wall"`` times the whole unit run,
            compiled on its own. Timings other than the kernel profile carry the runtime's
            per-call overhead in every figure, which is taken out (the module's item 7).
        share_period: no group aligns finer than the median period over all swept layers.
            One runtime's kernels share one channel blocking, and sweeps of tiny layers (7×7
            maps, where per-run overhead dominates) can miss it.
        layout_floor: no group is offered fewer channels than the runtime's blocked-layout
            width (``backend.layout_block()``: the runtime's channel block, e.g. 8 or 16 on
            ORT CPU depending on the CPU's vector width), unless it is that
            narrow to start with. Below it the runtime leaves its layout between layers, a
            cost that units timed alone do not show (see
            :meth:`~fxprune.backends.OnnxRuntimeBackend.layout_block`).
        progress: report progress (through :mod:`fxprune.core.progress`: logging by default,
            a rich bar under the CLI).
    """

    sweep_halfwidth: int = 20
    max_period: int = 32
    max_candidates: int = 16
    measured_per_axis: int = 5
    measured_per_vector: int = 8
    sweep_measure: MeasureConfig = _SWEEP
    grid_measure: MeasureConfig = _GRID
    whole_measure: MeasureConfig = _WHOLE
    unit_timing: str = "kernels"
    share_period: bool = True
    layout_floor: bool = True
    progress: bool = True


# ------------------------------------------------------------------------------ the records


def interp_weights(grid: Sequence[int], period: int, c: int) -> list[tuple[int, float]]:
    """Weights over ``grid`` indices that give the value at count ``c``.

    Exact grid counts get weight 1; otherwise linear interpolation between the nearest grid
    counts *of c's alignment class*. With no bracket in the class (an unaligned count between
    aligned candidates), the next grid count up stands in: the runtime pads an unaligned count
    to at least the next aligned one, so this is the optimistic side of the truth.
    """
    grid = list(grid)
    if c in grid:
        return [(grid.index(c), 1.0)]
    k = class_of(c, period)
    same = [i for i, g in enumerate(grid) if class_of(g, period) == k]
    below = [i for i in same if grid[i] < c]
    above = [i for i in same if grid[i] > c]
    if below and above:
        i0 = max(below, key=lambda i: grid[i])
        i1 = min(above, key=lambda i: grid[i])
        w = (c - grid[i0]) / (grid[i1] - grid[i0])
        return [(i0, 1.0 - w), (i1, w)]
    up = [i for i, g in enumerate(grid) if g > c]
    if up:
        return [(min(up, key=lambda i: grid[i]), 1.0)]
    return [(max(range(len(grid)), key=lambda i: grid[i]), 1.0)]


@dataclass(frozen=True, eq=False)
class LayerLatency:
    """Latency of one layer's unit over its candidate counts (ms), with the raw evidence.

    ``axes`` says which counts the cost depends on: ``"in,out"`` (matrix), ``"in"`` or ``"out"``
    (vector, the other side fixed), ``"channel"`` (depthwise: in = out) or ``""`` (constant).
    ``table[i][j]`` is the fitted cost at ``(in_grid[i], out_grid[j])``; a fixed axis has one
    entry, the full count. ``raw`` / ``fitted`` are at the measured counts only.
    """

    node: str
    unit: str
    axes: str
    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]
    table: tuple[tuple[float, ...], ...]
    period_in: int
    period_out: int
    measured_in: tuple[int, ...]
    measured_out: tuple[int, ...]
    raw: tuple[tuple[float, ...], ...]
    fitted: tuple[tuple[float, ...], ...]
    unstable_points: int = 0
    sweep_counts: tuple[int, ...] = ()
    sweep_raw: tuple[float, ...] = ()
    sweep_axis: str = ""

    @property
    def full_ms(self) -> float:
        """Cost at full width."""
        return self.table[-1][-1]

    def cost(self, k_in: int, k_out: int) -> float:
        """Cost (ms) at ``k_in`` input and ``k_out`` output channels (see :func:`interp_weights`)."""
        if self.axes == "channel":
            k_in = k_out
        wi = interp_weights(self.in_grid, self.period_in, k_in) if "in" in self.axes else [(0, 1.0)]
        wo = (
            interp_weights(self.out_grid, self.period_out, k_out)
            if ("out" in self.axes or self.axes == "channel")
            else [(0, 1.0)]
        )
        return float(sum(a * b * self.table[i][j] for i, a in wi for j, b in wo))

    def on_grid(self, k_in: int, k_out: int) -> bool:
        """Whether the counts are table entries (no interpolation or stand-in)."""
        if self.axes == "channel":
            return k_out in self.out_grid
        return ("in" not in self.axes or k_in in self.in_grid) and (
            "out" not in self.axes or k_out in self.out_grid
        )


@dataclass
class LatencyTables:
    """The pass's result: per-layer tables, per-group candidate counts, the constant part."""

    layers: dict[str, LayerLatency]
    group_grids: dict[str, tuple[int, ...]]
    group_periods: dict[str, int]
    dense_ms: float
    constant_ms: float
    backend_id: str
    build_s: float = 0.0
    points: int = 0
    measured: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def full_sum(self) -> float:
        """Σ of all tables at full width."""
        return float(sum(lat.full_ms for lat in self.layers.values()))


# ------------------------------------------------------------------------------- the steps


def _sweep_counts(max_count: int, halfwidth: int, max_center: int = 96) -> list[int]:
    """Contiguous counts around a multiple of 32 near the middle (at most ``max_center``).

    Capping the centre keeps sweeps of wide layers cheap; the alignment a kernel rewards is
    assumed to be the same at small and large counts (it comes from vector and block widths).
    """
    if max_count <= 2 * halfwidth + 1:
        return list(range(1, max_count + 1))
    center = min(32 * round(max_count / 2 / 32), max_center)
    center = min(max(center, halfwidth + 1), max_count - halfwidth)
    return list(range(center - halfwidth, center + halfwidth + 1))


def _pow2_floor(x: float) -> int:
    return 1 if x < 2 else 1 << (int(x).bit_length() - 1)


def _grid(size: int, period: int, max_candidates: int) -> tuple[int, ...]:
    return tuple(candidate_counts(size, period, -(-size // max_candidates)))


def _measured_subset(grid: Sequence[int], period: int, n: int) -> tuple[int, ...]:
    """Counts to measure: evenly spread over the grid, with both ends and the largest aligned."""
    grid = sorted(grid)
    if len(grid) <= n:
        return tuple(grid)
    idx = {round(float(i)) for i in np.linspace(0, len(grid) - 1, n)}
    aligned = [i for i, c in enumerate(grid) if c % period == 0]
    if aligned:
        idx.add(aligned[-1])
    return tuple(grid[i] for i in sorted(idx))


# ------------------------------------------------------------------------------- the pass


@dataclass
class _Layer:
    node: fx.Node
    spec: UnitSpec
    act: nn.Module | None
    axes: str
    in_max: int
    out_max: int
    in_groups: list[int]
    out_groups: list[int]
    period: int = 1
    sweep: tuple[tuple[int, ...], tuple[float, ...], str] = ((), (), "")


class _NullUnit(nn.Module):
    """The least a runtime can be asked to run: one add on one element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


class _Measurer:
    """Cached, memoised, progress-reporting unit measurements."""

    def __init__(
        self, backend: Backend, cache: LatencyCache, progress: Any, timing: str = "wall"
    ) -> None:
        self.backend = backend
        self.kernels = timing == "kernels" and isinstance(backend, KernelMeasurement)
        self.generic = (
            timing == "kernels" and not self.kernels and isinstance(backend, UnitMeasurement)
        )
        self.cache = cache
        self.identity = backend.identity()
        self.backend_id = identity_label(self.identity)
        self.progress = progress
        self.memo: dict[str, Measurement] = {}
        self.measured = 0
        self.points = 0

    @property
    def timing(self) -> str:
        """How units are timed, part of every unit's cache key: figures of one kind only."""
        return "kernels" if self.kernels else "generic" if self.generic else "wall"

    def key(self, spec: UnitSpec, cin: int, cout: int, config: MeasureConfig) -> dict[str, Any]:
        cin, cout = spec.counts(cin, cout)
        return {
            "format": _FORMAT,
            "what": "unit",
            "unit": spec.key(),
            "cin": cin,
            "cout": cout,
            "timing": self.timing,
            "measure": asdict(config),
            "backend": self.identity,
        }

    def unit(
        self, layer: _Layer, cin: int, cout: int, config: MeasureConfig, task: Any = None
    ) -> Measurement:
        key = self.key(layer.spec, cin, cout, config)
        digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()
        if digest not in self.memo:

            def run() -> Measurement:
                self.measured += 1
                module, inputs = build_unit(layer.spec, cin, cout, layer.act)
                if self.kernels:
                    return self.backend.measure_kernels(module, inputs, config)
                if self.generic:
                    return self.backend.measure_unit(module, inputs, config)
                return self.backend.measure(module, inputs, config)

            self.memo[digest] = self.cache.get_measurement(key, run)
            self.points += 1
        if task is not None:
            self.progress.advance(task)
        return self.memo[digest]

    def call_overhead(self, config: MeasureConfig) -> float:
        """The runtime's fixed cost of one call (ms), in every unit figure but a kernel
        profile's: the time of :class:`_NullUnit`. 0 under kernel timing."""
        if self.kernels:
            return 0.0
        key = {
            "format": _FORMAT,
            "what": "call_overhead",
            "timing": self.timing,
            "measure": asdict(config),
            "backend": self.identity,
        }

        def run() -> Measurement:
            self.measured += 1
            return self.backend.measure(_NullUnit(), (torch.zeros(1, 1),), config)

        return max(0.0, self.cache.get_measurement(key, run).median_ms)

    def whole(self, gm: fx.GraphModule, inputs: tuple, config: MeasureConfig) -> Measurement:
        key = {
            "format": _FORMAT,
            "what": "model",
            "protocol": "sessions-no-spin",  # older figures (one session) differ
            "model": model_fingerprint(gm, inputs),
            "measure": asdict(config),
            "backend": self.identity,
        }

        def run() -> Measurement:
            self.measured += 1
            if isinstance(self.backend, SessionMeasurement):  # round three sessions
                return self.backend.measure_sessions(gm, inputs, config, 3)
            return self.backend.measure(gm, inputs, config)

        return self.cache.get_measurement(key, run)


def model_fingerprint(gm: fx.GraphModule, inputs: Sequence[Any]) -> str:
    """Hash of a GraphModule's code, parameter/buffer shapes and input shapes."""
    h = hashlib.sha256(gm.code.encode())
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)};".encode())
    h.update(repr([tuple(x.shape) for x in inputs]).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """The current progress reporter (:func:`fxprune.core.progress.reporter`), or None."""
    yield reporter() if enabled else None


def _collect(analysis: Any) -> list[_Layer]:
    spaces = analysis.spaces
    gm = analysis.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    prunable = {i for i, g in enumerate(spaces.groups) if not g.frozen}
    out: list[_Layer] = []
    for rec in spaces.layers:
        if rec.kind not in ("conv", "linear"):
            continue
        node = nodes[rec.node]
        spec, act = unit_spec(node, gm)
        in_groups = [i for i in spaces.groups_of(rec.in_units) if i in prunable]
        out_groups = [i for i in spaces.groups_of(rec.out_units) if i in prunable]
        if spec.depthwise:
            axes = "channel" if out_groups or in_groups else ""
            out_groups = out_groups or in_groups
        else:
            axes = ",".join(a for a, g in (("in", in_groups), ("out", out_groups)) if g)
        out.append(
            _Layer(
                node, spec, act, axes, len(rec.in_units), len(rec.out_units), in_groups, out_groups
            )
        )
    for att in analysis.attention_layers:
        node = nodes[att.node]
        in_groups = [i for i in spaces.groups_of(att.in_units) if i in prunable]
        out_groups = [i for i in spaces.groups_of(att.out_units) if i in prunable]
        if in_groups and set(in_groups) == set(out_groups):
            axes = "channel"  # one space sets both sides (heads; timm's fused qkv): a vector
        else:
            axes = ",".join(a for a, g in (("in", in_groups), ("out", out_groups)) if g)
        full_in, full_out = attention_full_counts(node, att)
        spec = attention_spec(node, att.dim)
        out.append(_Layer(node, spec, None, axes, full_in, full_out, in_groups, out_groups))
    return out


def _axis_grid(
    analysis: Any,
    groups: list[int],
    n_units: int,
    grids: dict[int, tuple[int, ...]],
    periods: dict[int, int],
    max_candidates: int,
) -> tuple[tuple[int, ...], int]:
    """A layer axis's candidate counts and period: its group's grid, or a grid of totals."""
    if len(groups) == 1 and analysis.groups[groups[0]].size == n_units:
        return grids[groups[0]], periods[groups[0]]
    p = min(periods[g] for g in groups)
    return _grid(n_units, p, max_candidates), p


def annotate_latency(
    analysis: Any,
    backend: Backend,
    *,
    cache: LatencyCache | None = None,
    config: LatencyConfig | None = None,
) -> LatencyTables:
    """Measure a cost table for every conv/linear layer of ``analysis`` and annotate its node.

    Args:
        analysis: from :func:`fxprune.analyze`; sizes and batch are those of its example inputs.
        backend: the deployment runtime, e.g. ``get_backend("ort", provider="cpu")``.
        cache: where figures are cached (default :class:`LatencyCache` location).
        config: grid, sweep and timing settings.

    Returns:
        The tables (also stored per node under ``node.meta["fxprune.latency"]``).
    """
    config = config or LatencyConfig()
    cache = cache if cache is not None else LatencyCache()
    start = time.perf_counter()
    layers = _collect(analysis)
    with _progress(config.progress) as progress:
        meas = _Measurer(backend, cache, progress, config.unit_timing)
        _sweep_all(layers, meas, config)
        block = layout_block_of(backend) if config.layout_floor else 1
        periods, grids = _group_grids(analysis, layers, config, block)
        overhead = meas.call_overhead(config.grid_measure)
        tables = _tables(analysis, layers, meas, periods, grids, config, overhead)
        dense = meas.whole(analysis.gm, analysis.example_inputs, config.whole_measure)
    for node in analysis.gm.graph.nodes:
        if node.name in tables:
            node.meta[LATENCY] = tables[node.name]
    result = LatencyTables(
        layers=tables,
        group_grids={analysis.groups[g].name: grid for g, grid in grids.items()},
        group_periods={analysis.groups[g].name: p for g, p in periods.items()},
        dense_ms=dense.median_ms,
        constant_ms=dense.median_ms - float(sum(t.full_ms for t in tables.values())),
        backend_id=meas.backend_id,
        points=meas.points,
        measured=meas.measured,
        notes={
            "dense_stable": dense.stable,
            "config": repr(config),
            "layout_block": block,
            "unit_timing": meas.timing,
            "call_overhead_ms": overhead,
        },
    )
    result.build_s = time.perf_counter() - start
    return result


def _sweep_all(layers: list[_Layer], meas: _Measurer, config: LatencyConfig) -> None:
    plans = []
    for layer in layers:
        if not layer.axes:
            continue
        axis = "in" if layer.axes == "in" else "out"
        n = layer.in_max if axis == "in" else layer.out_max
        plans.append((layer, axis, _sweep_counts(n, config.sweep_halfwidth)))
    task = None
    if meas.progress is not None:
        total = sum(len(c) for _, _, c in plans)
        task = meas.progress.add_task("period sweeps", total=total)
    for layer, axis, counts in plans:
        times = []
        for c in counts:
            cin, cout = (c, layer.out_max) if axis == "in" else (layer.in_max, c)
            if layer.axes == "channel":  # one space: depthwise, or attention's heads
                cin = cout = c
            times.append(meas.unit(layer, cin, cout, config.sweep_measure, task).median_ms)
        layer.period = detect_period(counts, times, max_period=config.max_period)
        layer.sweep = (tuple(counts), tuple(times), axis)


def _group_grids(
    analysis: Any, layers: list[_Layer], config: LatencyConfig, block: int = 1
) -> tuple[dict[int, int], dict[int, tuple[int, ...]]]:
    swept = [layer.period for layer in layers if layer.axes]
    floor = _pow2_floor(float(np.median(swept))) if swept and config.share_period else 1
    periods: dict[int, int] = {}
    for layer in layers:
        for g in {*layer.in_groups, *layer.out_groups}:
            periods[g] = max(periods.get(g, floor), layer.period)
    grids: dict[int, tuple[int, ...]] = {}
    for g, p in periods.items():
        group = analysis.groups[g]
        if group.equal_count:
            parts = len(group.equal_count[0])
            part = len(np.unique(group.equal_count[0][0]))
            pp = min(_pow2_floor(max(p // parts, 1)), _pow2_floor(part / 2))
            step = pp * parts  # grid counts are multiples of it; classes need a power of two
            periods[g] = step & -step if group.size == part * parts else 1
            grids[g] = tuple(parts * k for k in _grid(part, pp, config.max_candidates))
            continue
        p = min(p, _pow2_floor(group.size / 2))
        periods[g] = p
        grids[g] = _layout_floor(_grid(group.size, p, config.max_candidates), group.size, p, block)
    return periods, grids


def _layout_floor(grid: tuple[int, ...], size: int, period: int, block: int) -> tuple[int, ...]:
    """``grid`` without counts below the runtime's layout block (the block itself added when
    it is aligned), for a group at least that wide."""
    if block <= 1 or size < block:
        return grid
    kept = {c for c in grid if c >= block}
    if block % period == 0:
        kept.add(block)
    return tuple(sorted(kept))


def _tables(
    analysis: Any,
    layers: list[_Layer],
    meas: _Measurer,
    periods: dict[int, int],
    grids: dict[int, tuple[int, ...]],
    config: LatencyConfig,
    overhead: float = 0.0,
) -> dict[str, LayerLatency]:
    """Every layer's table; ``overhead`` (the per-call cost in each figure) is taken out."""
    axes_of: dict[str, tuple[tuple[int, ...], int, tuple[int, ...], int]] = {}
    total = 0
    for layer in layers:
        gi, pi = ((layer.in_max,), 1)
        go, po = ((layer.out_max,), 1)
        if "in" in layer.axes:
            gi, pi = _axis_grid(
                analysis, layer.in_groups, layer.in_max, grids, periods, config.max_candidates
            )
        if "out" in layer.axes or layer.axes == "channel":
            go, po = _axis_grid(
                analysis, layer.out_groups, layer.out_max, grids, periods, config.max_candidates
            )
        axes_of[layer.node.name] = (gi, pi, go, po)
        n_in = config.measured_per_vector if layer.axes == "in" else config.measured_per_axis
        n_out = config.measured_per_axis if layer.axes == "in,out" else config.measured_per_vector
        total += len(_measured_subset(gi, pi, n_in)) * len(_measured_subset(go, po, n_out))
    task = meas.progress.add_task("tables", total=total) if meas.progress is not None else None
    fits: dict[tuple, tuple] = {}
    out: dict[str, LayerLatency] = {}
    for layer in layers:
        gi, pi, go, po = axes_of[layer.node.name]
        dw = layer.axes == "channel"
        n_in = config.measured_per_vector if layer.axes == "in" else config.measured_per_axis
        n_out = config.measured_per_axis if layer.axes == "in,out" else config.measured_per_vector
        mi = _measured_subset(gi, pi, n_in) if not dw else (layer.in_max,)
        mo = _measured_subset(go, po, n_out)
        memo_key = (layer.spec, gi, go, mi, mo, pi, po, dw)
        if memo_key not in fits:
            figures = [
                [meas.unit(layer, co if dw else ci, co, config.grid_measure, task) for co in mo]
                for ci in mi
            ]
            raw = np.array([[m.median_ms for m in row] for row in figures])
            unstable = sum(not m.stable for row in figures for m in row)
            fitted = denoise_2d(mi, mo, raw, pi, po).fitted
            in_model = np.maximum(fitted - overhead, _MIN_SHARE * fitted)
            table = _expand(in_model, mi, mo, gi if not dw else mi, go, pi, po)
            fits[memo_key] = (raw, fitted, table, unstable)
        elif task is not None:
            meas.progress.advance(task, len(mi) * len(mo))
        raw, fitted, table, unstable = fits[memo_key]
        sweep_counts, sweep_raw, sweep_axis = layer.sweep
        out[layer.node.name] = LayerLatency(
            node=layer.node.name,
            unit=layer.spec.label(),
            axes=layer.axes,
            in_grid=tuple(gi) if not dw else (layer.in_max,),
            out_grid=tuple(go),
            table=_tuples(table),
            period_in=pi,
            period_out=po,
            measured_in=tuple(mi),
            measured_out=tuple(mo),
            raw=_tuples(raw),
            fitted=_tuples(fitted),
            unstable_points=unstable,
            sweep_counts=sweep_counts,
            sweep_raw=sweep_raw,
            sweep_axis=sweep_axis,
        )
    return out


def _expand(
    fitted: np.ndarray,
    mi: Sequence[int],
    mo: Sequence[int],
    gi: Sequence[int],
    go: Sequence[int],
    pi: int,
    po: int,
) -> np.ndarray:
    """The fitted values at the measured counts, interpolated onto the whole grid."""
    wi = [interp_weights(mi, pi, c) for c in gi]
    wo = [interp_weights(mo, po, c) for c in go]
    table = np.empty((len(gi), len(go)))
    for a, ws_i in enumerate(wi):
        for b, ws_o in enumerate(wo):
            table[a, b] = sum(x * y * fitted[i, j] for i, x in ws_i for j, y in ws_o)
    return table


def _tuples(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.atleast_2d(a))
