"""choose_read: every read covers exactly the kept positions with non-zero columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxprune.measure.probes import ReadUnit
from fxprune.measure.reads import MeasuredReads
from fxprune.unconstrained.reads import ConsumerRead, ReadCost, choose_read, pad_read


@st.composite
def kept_sets(draw):
    n = draw(st.integers(2, 40))
    kept = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1))
    return n, np.array(sorted(kept))


@given(
    kept_sets(),
    st.sampled_from(["exact", "auto", "full"]),
    st.integers(1, 64),
    st.integers(1, 10_000),
)
def test_read_covers_kept_exactly(case, policy, spatial, macs):
    n, kept = case
    r = choose_read(kept, n, spatial=spatial, macs_per_input=macs, policy=policy)
    assert np.array_equal(r.local[~r.zero], kept)  # non-zero columns = kept, in order
    assert np.all(np.diff(r.local) > 0) and r.local[0] >= 0 and r.local[-1] < n
    contiguous = kept[-1] - kept[0] + 1 == kept.size
    if policy == "exact":
        assert r.kind == ("slice" if contiguous else "gather") and not r.zero.any()
    if r.kind in ("slice", "span", "full"):
        assert np.array_equal(r.local, np.arange(r.start, r.start + r.length))
    if policy == "full":
        assert r.kind == "full" and r.length == n


def test_auto_follows_the_cost():
    kept = np.array([0, 2, 3, 4, 5, 6, 7, 9])
    copies_cheap = ReadCost(slice_s_per_element=1e-12, gather_s_per_element=1e-12, mac_s=1e-9)
    macs_cheap = ReadCost(slice_s_per_element=1e-6, gather_s_per_element=1e-6, mac_s=1e-15)
    gathers_dear = ReadCost(slice_s_per_element=1e-12, gather_s_per_element=1e-3, mac_s=1e-12)
    args = dict(spatial=100, macs_per_input=1000, policy="auto")
    assert choose_read(kept, 12, cost=copies_cheap, **args).kind == "gather"
    assert choose_read(kept, 12, cost=macs_cheap, **args).kind == "full"
    assert choose_read(kept, 12, cost=gathers_dear, **args).kind == "span"


def test_bad_policy():
    with pytest.raises(ValueError, match="policy"):
        choose_read(np.array([1]), 3, spatial=1, macs_per_input=1, policy="fast")


@pytest.mark.parametrize("kind", ["slice", "gather", "span", "full"])
@pytest.mark.parametrize("producer", [0, 8])
def test_read_unit_computes_its_candidate(kind, producer):
    torch.manual_seed(0)
    local = {"slice": [2, 3, 4], "gather": [0, 3, 6], "span": [2, 3, 4, 5], "full": range(8)}[kind]
    read = ConsumerRead(kind, np.array(list(local)), np.zeros(len(local), dtype=bool))
    layer = nn.Conv2d(len(local), 4, 3, padding=1)
    unit = ReadUnit(read, layer, 1, producer_channels=producer).eval()
    x = torch.randn(1, 8, 5, 5)
    # the producer (a per-channel conv standing in for the model's own) runs before the read
    y = unit.producer(x) if producer else x
    assert isinstance(unit.producer, nn.Conv2d if producer else nn.Identity)
    if producer:
        assert unit.producer.groups == producer and unit.producer.kernel_size == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), layer(y[:, list(local)]))


@pytest.mark.parametrize(
    ("exact", "ms", "kept"),
    [
        # a zero-padded read must beat a slice clearly (min_gain 5%)
        ("slice", {"slice": 1.0, "full": 0.97}, "slice"),
        ("slice", {"slice": 1.0, "full": 0.90}, "full"),
        # a gather gives way to a full read that is not slower (it copies nothing)
        ("gather", {"gather": 1.0, "full": 1.0}, "full"),
        ("gather", {"gather": 1.0, "full": 1.01}, "gather"),
        ("gather", {"gather": 1.0, "span": 0.97, "full": 1.02}, "gather"),
        ("gather", {"gather": 1.0, "span": 0.90, "full": 0.99}, "span"),
    ],
)
def test_measured_reads_rule(monkeypatch, exact, ms, kept):
    import types

    import fxprune.measure.reads

    def scripted(backend, units, inputs, config, sessions):
        return [types.SimpleNamespace(median_ms=ms[u.kind]) for u in units]

    monkeypatch.setattr(fxprune.measure.reads, "measure_side_by_side", scripted)
    layer = nn.Conv2d(4, 2, 1)
    local = {"slice": [0, 1, 2, 3], "gather": [0, 2, 5, 7], "span": range(8), "full": range(8)}
    candidates = {
        k: (ConsumerRead(k, np.array(list(local[k])), np.zeros(len(local[k]), dtype=bool)), layer)
        for k in ms
    }
    judge = MeasuredReads(backend=None)
    got = judge.choose("c", (1, 8, 4, 4), 1, candidates)
    assert got.kind == kept
    assert judge.decisions["c"] == ms
    judge.decisions.clear()  # a remembered decision still reports its figures
    assert judge.choose("c", (1, 8, 4, 4), 1, candidates).kind == kept
    assert judge.decisions["c"] == ms


def test_compare_is_the_median_over_shuffled_repeats(monkeypatch):
    import types

    import fxprune.measure.reads

    calls, place = [], iter([0.90, 1.0, 1.0, 1.0, 1.1, 1.0, 1.0, 1.0, 1.0])

    def scripted(backend, modules, inputs, config, sessions):
        # each module has a true latency; one measurement in three is off for one module
        calls.append([m.ms for m in modules])
        return [types.SimpleNamespace(median_ms=m.ms * next(place), round_ms=()) for m in modules]

    monkeypatch.setattr(fxprune.measure.reads, "measure_side_by_side", scripted)
    modules = [types.SimpleNamespace(ms=ms) for ms in (10.0, 12.0, 9.0)]
    ratios = MeasuredReads(backend=None, check_repeats=3).compare(modules, ())
    assert len(calls) == 3 and all(sorted(c) == [9.0, 10.0, 12.0] for c in calls)
    assert len({tuple(c) for c in calls}) > 1  # the order changes between repeats
    assert ratios[0] == 1.0
    assert ratios == pytest.approx([1.0, 1.2, 0.9])  # the odd measurement is outvoted


@given(
    st.integers(2, 40).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True),
            st.sampled_from(["exact", "span", "full"]),
            st.sampled_from([1, 4, 8]),
        )
    )
)
def test_pad_read_widens_to_the_block_with_zero_columns(case):
    n, kept, policy, block = case
    kept = np.sort(np.asarray(kept))
    read = choose_read(kept, n, spatial=1, macs_per_input=1, policy=policy)
    padded = pad_read(read, n, block)
    # the kept positions are still read, with live columns; every other read position is zero
    assert np.all(np.diff(padded.local) > 0)
    assert np.array_equal(padded.local[~padded.zero], kept)
    if read.kind == "full" or read.length % block == 0 or block == 1:
        assert padded is read
        return
    if padded.kind == "full":
        assert padded.length == n and -(-read.length // block) * block >= n
        return
    assert padded.length % block == 0 and padded.length - read.length < block
    if read.kind in ("slice", "span"):  # still one range: a slice with zero columns
        assert padded.kind == "span"
        assert padded.local[-1] - padded.local[0] + 1 == padded.length
    else:  # a gather takes the free positions nearest to what it reads
        assert padded.kind == "gather"
        extra = np.setdiff1d(padded.local, read.local)
        free = np.setdiff1d(np.arange(n), padded.local)
        dist = lambda p: np.abs(p - read.local).min()  # noqa: E731
        if free.size:
            assert max(dist(p) for p in extra) <= min(dist(p) for p in free)
