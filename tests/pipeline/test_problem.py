"""The problem builder on real architectures: the solver's model of a plan is the predictor's.

Tables come from the deterministic FakeBackend, so every figure is reproducible. For random
solutions (random options per group, random removed blocks) the plan built from the solution
must be valid, prune to the masking oracle, and have the latency the problem says it has.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision
from fake_backend import FakeBackend
from helpers import check_plan, make_sensitive
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.analysis.importance import magnitude_scores
from fxprune.backends import LatencyCache
from fxprune.latency.predictor import LatencyModel
from fxprune.latency.tables import LatencyConfig, annotate_latency
from fxprune.pipeline.problem import apportion, build_problem, keep_mask, read_segments
from fxprune.solver import Solution, evaluate, solve_minlp

QUIET = LatencyConfig(progress=False, unit_timing="wall")

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), 64),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 64),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(), 64),  # grouped convs, SE
    "densenet121": (lambda: torchvision.models.densenet121(), 64),  # concatenations
    # channel split + shuffle: layers read a slice of a group, some its indices twice
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(), 64),
}


@pytest.fixture(scope="module", params=list(MODELS))
def built(request, tmp_path_factory):
    make, size = MODELS[request.param]
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = make_sensitive(make().eval(), x)
    analysis = fxprune.analyze(model, x)
    cache = LatencyCache(tmp_path_factory.mktemp("cache"))
    tables = annotate_latency(analysis, FakeBackend(), cache=cache, config=QUIET)
    latency = LatencyModel(analysis, tables)
    pp = build_problem(analysis, latency, magnitude_scores(analysis), importance_method="l2")
    return request.param, analysis, latency, pp, x


def _random_solution(pp, rng: np.random.Generator) -> Solution:
    removed = frozenset(b.name for b in pp.problem.blocks if rng.random() < 0.3)
    choice = {}
    for name in pp.group_names:
        spec = pp.problem.group(name)
        if spec.block in removed:
            choice[name] = 0
        else:
            choice[name] = int(rng.choice([k for k, c in enumerate(spec.counts) if c > 0]))
    value, lat = evaluate(pp.problem, choice, removed)
    return Solution(choice, removed, value, lat, "random")


def test_dense_choice_is_the_dense_prediction(built):
    _, analysis, latency, pp, _ = built
    full = {n: len(pp.problem.group(n).counts) - 1 for n in pp.group_names}
    value, lat = evaluate(pp.problem, full, frozenset())
    assert lat == pytest.approx(latency.predict(fxprune.Plan.empty(analysis)), rel=1e-9)
    assert value == pytest.approx(1.0)
    assert pp.problem.groups, "no prunable group made it into the problem"


def test_random_solutions_round_trip(built):
    _, analysis, latency, pp, x = built
    rng = np.random.default_rng(1)
    # a total over several groups is rounded up to the layer's grid; one group's is exact
    rounded = any(len(g.sum_of) > 1 for g in pp.problem.groups)
    for _ in range(3):
        sol = _random_solution(pp, rng)
        plan = pp.plan(sol)
        plan.validate(analysis)
        assert set(plan.removed_blocks) == set(sol.removed)
        counts = sol.counts(pp.problem)
        for g in pp.group_names:
            if pp.problem.group(g).block not in sol.removed:
                assert len(plan.kept.get(g, range(analysis.group(g).size))) == counts[g]
        predicted = latency.predict(plan)
        if rounded:  # a concatenation's total is rounded up to its grid in the problem
            assert sol.latency == pytest.approx(predicted, rel=0.1)
        else:
            assert sol.latency == pytest.approx(predicted, rel=1e-9)
        assert pp.importance_kept(plan) == pytest.approx(sol.objective, rel=1e-9)
        check_plan(analysis, plan, x)


def test_resource_rows_count_the_pruned_model(built):
    """``max_params`` / ``max_macs`` rows: the dense choice is the dense model's count, and a
    random solution's usage is its pruned model's (exact; a derived total rounds up)."""
    from fxprune.pipeline.report import count_macs, count_params
    from fxprune.solver import usage

    name, analysis, latency, _, _ = built
    pp = build_problem(
        analysis, latency, magnitude_scores(analysis), max_params=10**12, max_macs=10**15
    )
    assert [r.name for r in pp.problem.resources] == ["params", "macs"]
    full = {n: len(pp.problem.group(n).counts) - 1 for n in pp.group_names}
    dense = usage(pp.problem, full, frozenset())
    # no derived total rounds up at the full choice unless a grid's top is above the total
    assert dense["params"] >= count_params(analysis.gm) - 1e-6
    assert dense["macs"] >= count_macs(analysis.gm) - 1e-6
    rounded = any(g.sum_of for g in pp.problem.groups)
    rng = np.random.default_rng(2)
    for _ in range(3):
        sol = _random_solution(pp, rng)
        pruned = fxprune.prune(analysis, pp.plan(sol))
        used = usage(pp.problem, sol.choice, sol.removed)
        measured = {"params": count_params(pruned), "macs": count_macs(pruned)}
        for resource in ("params", "macs"):
            if rounded:  # never under: a limit on the row holds on the model
                assert used[resource] >= measured[resource] - 1e-6, (name, resource)
            else:
                assert used[resource] == pytest.approx(measured[resource], rel=1e-9), name


def test_activation_rows_count_the_pruned_model(built):
    """``max_activation_bytes`` rows: the dense choice's peak is the analysed graph's, and a
    random solution's (blocks removed included) is its pruned model's counted peak, exactly."""
    from fxprune.analysis.liveness import peak_activation_bytes
    from fxprune.solver import usage

    name, analysis, latency, _, _ = built
    pp = build_problem(analysis, latency, magnitude_scores(analysis), max_activation_bytes=1)
    (peak,) = pp.problem.resources
    assert peak.name == "activation_bytes" and peak.limit == 1 and len(peak.rows) > 1
    full = {n: len(pp.problem.group(n).counts) - 1 for n in pp.group_names}
    dense = usage(pp.problem, full, frozenset())["activation_bytes"]
    assert dense == pytest.approx(peak_activation_bytes(analysis.gm), rel=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(4):
        sol = _random_solution(pp, rng)
        pruned = fxprune.prune(analysis, pp.plan(sol))
        used = usage(pp.problem, sol.choice, sol.removed)["activation_bytes"]
        assert used == pytest.approx(peak_activation_bytes(pruned), rel=1e-12), name


def test_blocks_hold_their_groups(built):
    _, analysis, _, pp, _ = built
    for block in pp.problem.blocks:
        inside = pp.block_groups[block.name]
        assert inside
        for g in inside:
            spec = pp.problem.group(g)
            assert spec.block == block.name and spec.counts[0] == 0 and spec.importance[0] == 0
    if any(b.name in pp.block_groups for b in analysis.blocks):
        assert pp.problem.blocks


def test_solved_plan_meets_predicted_budget(built):
    _, analysis, latency, pp, x = built
    dense = latency.predict(fxprune.Plan.empty(analysis))
    sol = solve_minlp(pp.problem, 0.6 * dense, time_limit=20)
    plan = pp.plan(sol)
    assert sol.latency <= 0.6 * dense + 1e-9
    assert latency.predict(plan) <= 0.6 * dense * 1.1
    check_plan(analysis, plan, x)


def test_min_keep_offers_no_narrower_count(built):
    """``min_keep``: every offered count is the group's full size, 0 for a removed block, or at
    least that share of the size; the full count is always there, so the dense plan stays."""
    _, analysis, latency, pp, _ = built
    narrow = build_problem(analysis, latency, magnitude_scores(analysis), min_keep=0.5)
    cut = 0
    for name in narrow.group_names:
        spec, size = narrow.problem.group(name), analysis.group(name).size
        assert size in spec.counts
        assert all(c == size or c >= 0.5 * size or (c == 0 and spec.block) for c in spec.counts)
        cut += len(pp.problem.group(name).counts) - len(spec.counts)
    assert cut > 0  # the unrestricted problem offers narrower counts somewhere


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(2, 64),
    parts=st.sampled_from([1, 2, 4]),
    count=st.integers(0, 64),
    seed=st.integers(0, 2**16),
)
def test_keep_mask_keeps_the_top_scores(size, parts, count, seed):
    from fxprune.analysis.channel_groups import Group

    size = size * parts
    count = min(count, size) // parts * parts
    rng = np.random.default_rng(seed)
    scores = rng.random(size)
    segments = tuple(np.arange(p * size // parts, (p + 1) * size // parts) for p in range(parts))
    group = Group("g", size, np.arange(size), ("r",), equal_count=(segments,) if parts > 1 else ())
    mask = keep_mask(group, scores, count)
    assert mask.sum() == count
    for seg in segments:
        kept, dropped = scores[seg][mask[seg]], scores[seg][~mask[seg]]
        assert mask[seg].sum() == count // parts
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_every_option_of_every_group_is_a_valid_plan(built):
    """Each group alone at each of its options: the plan validates, and (at its smallest) the
    problem's latency is the predictor's (exact where no layer reads a sum of several groups)."""
    _, analysis, latency, pp, _ = built
    rounded = any(len(g.sum_of) > 1 for g in pp.problem.groups)
    full = {n: len(pp.problem.group(n).counts) - 1 for n in pp.group_names}
    for name in pp.group_names:
        spec = pp.problem.group(name)
        for k, c in enumerate(spec.counts):
            if c == 0:
                continue  # the block's removal, covered by the round trip
            sol = Solution({**full, name: k}, frozenset(), 0.0, 0.0, "one group")
            plan = pp.plan(sol)
            plan.validate(analysis)
            assert len(plan.kept.get(name, range(analysis.group(name).size))) == c
            if not rounded and c == min(c for c in spec.counts if c > 0):  # one per group
                want = evaluate(pp.problem, sol.choice, frozenset())[1]
                assert latency.predict(plan) == pytest.approx(want, rel=1e-9)


def test_a_slice_reading_layer_keeps_a_share_on_shufflenet():
    """ShuffleNetV2: a branch reads half of a group's indices (each twice, after the shuffle);
    its kept input is never empty and is what the problem says."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    analysis = fxprune.analyze(torchvision.models.shufflenet_v2_x0_5().eval(), x)
    tables = annotate_latency(analysis, FakeBackend(), config=QUIET)
    pp = build_problem(analysis, LatencyModel(analysis, tables), magnitude_scores(analysis))
    assert pp.segments, "no group is read in slices"
    op = next(o for o in pp.problem.ops if o.name == "stage2_1_branch2_0")
    reader = pp.problem.group(op.in_group)
    assert reader.sum_of, "a slice read must be a derived group, not the whole group"
    ((member, shares),) = reader.sum_of
    smallest = {n: 0 for n in pp.group_names} | {member: 0}
    plan = pp.plan(Solution(smallest, frozenset(), 0.0, 0.0, "smallest"))
    plan.validate(analysis)
    k_in, _ = analysis.layer_keep(analysis.spaces.keep_units(plan.kept))["stage2_1_branch2_0"]
    assert k_in == shares[0] > 0


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    frac=st.floats(0.0, 1.2),
)
def test_apportion_shares_in_proportion(sizes, frac):
    total = sum(sizes)
    count = int(frac * total)
    alloc = apportion(count, sizes)
    assert alloc.sum() == min(count, total)
    assert (alloc >= 0).all() and (alloc <= np.asarray(sizes)).all()
    if len(sizes) <= count:
        assert (alloc >= 1).all()  # no bin left empty once the count allows
    quota = min(count, total) * np.asarray(sizes) / total
    if count < len(sizes) or (quota >= 1).all():  # nothing moved to fill an empty bin
        assert np.abs(alloc - quota).max() < 1


@settings(max_examples=80, deadline=None)
@given(size=st.integers(2, 64), n_reads=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_read_segments_partition_by_who_reads(size, n_reads, seed):
    rng = np.random.default_rng(seed)
    reads = [np.unique(rng.choice(size, size=rng.integers(1, size + 1))) for _ in range(n_reads)]
    segments = read_segments(size, reads)
    assert np.array_equal(np.sort(np.concatenate(segments)), np.arange(size))
    member = np.zeros((size, n_reads), dtype=bool)
    for j, r in enumerate(reads):
        member[r, j] = True
    for seg in segments:  # one membership per segment, a different one per segment
        assert (member[seg] == member[seg[0]]).all()
    assert len({member[seg[0]].tobytes() for seg in segments}) == len(segments)


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(2, 64),
    cuts=st.integers(1, 6),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_keep_mask_keeps_the_top_scores_of_each_segment(size, cuts, frac, seed):
    from fxprune.analysis.channel_groups import Group

    rng = np.random.default_rng(seed)
    bounds = np.unique(np.concatenate([[0, size], rng.integers(1, size, size=cuts - 1)]))
    order = rng.permutation(size)  # segments need not be contiguous
    segments = [np.sort(order[a:b]) for a, b in itertools.pairwise(bounds)]
    scores = rng.random(size)
    count = int(frac * size)
    group = Group("g", size, np.arange(size), ("r",))
    mask = keep_mask(group, scores, count, segments)
    assert mask.sum() == count
    want = apportion(count, [len(seg) for seg in segments])
    for seg, k in zip(segments, want, strict=True):
        assert mask[seg].sum() == k
        kept, dropped = scores[seg][mask[seg]], scores[seg][~mask[seg]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


@settings(max_examples=40, deadline=None)
@given(size=st.integers(2, 24), copies=st.integers(2, 4), data=st.data())
def test_keep_mask_with_identical_equal_count_parts_keeps_the_count(size, copies, data):
    """A grouped conv whose groups all read the same channels (ResNeSt's radix conv) lists the
    same part several times: every count up to the size is reachable, with the top scores."""
    from fxprune.analysis.channel_groups import Group

    parts = tuple(np.arange(size) for _ in range(copies))
    group = Group("g", size, np.arange(size), ("r",), equal_count=(parts,))
    scores = np.asarray(data.draw(st.permutations(range(size))), dtype=float)
    count = data.draw(st.integers(1, size))
    mask = keep_mask(group, scores, count)
    assert int(mask.sum()) == count
    assert set(np.flatnonzero(mask)) == set(np.argsort(-scores)[:count])


@pytest.mark.parametrize("attention", ["head_dim", "heads"])
def test_an_attention_unit_is_one_op_over_the_head_group(tmp_path, attention):
    """An SDPA call is an op over the group that sets its heads (a vector, like a depthwise
    conv), calibrated like the others, and costs less at fewer heads / a narrower head."""
    from attention_models import FusedViT

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(FusedViT(dim=64, heads=4, side=8).eval(), x, attention=attention)
    tables = annotate_latency(analysis, FakeBackend(), cache=LatencyCache(tmp_path), config=QUIET)
    latency = LatencyModel(analysis, tables)
    latency.a = 2.0  # a calibrated slope reaches the attention op too
    pp = build_problem(analysis, latency, magnitude_scores(analysis))
    (rec,) = analysis.attention_layers
    (op,) = [op for op in pp.problem.ops if op.name == rec.node]
    (g,) = analysis.spaces.groups_of(rec.in_units)
    name = analysis.groups[g].name
    assert op.in_group is None and op.out_group == name
    counts = pp.problem.group(name).counts
    assert op.table.shape == (1, len(counts)) and len(counts) > 1
    lat = tables.layers[rec.node]
    want = [2.0 * lat.cost(c, c) for c in counts]
    assert np.allclose(op.table[0], want) and np.all(np.diff(op.table[0]) > 0)
