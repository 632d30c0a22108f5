"""Tests for fxprune.unconstrained.consecutive: the exact consecutive-ones test, the greedy order and runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.unconstrained.consecutive import (
    Ordering,
    consecutive_ones_order,
    is_contiguous,
    order_channels,
    runs,
)

_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


# ---- helpers ---------------------------------------------------------------------------------


def _contiguous(perm, s) -> bool:
    """Pure-Python reference: the positions of ``s`` form one run."""
    pos = {c: k for k, c in enumerate(perm)}
    p = [pos[c] for c in set(s)]
    return not p or max(p) - min(p) + 1 == len(p)


def _brute_force(n: int, sets) -> tuple[int, ...] | None:
    """Some order making every set contiguous, found by trying all n! orders."""
    for perm in itertools.permutations(range(n)):
        if all(_contiguous(perm, s) for s in sets):
            return perm
    return None


def _score(perm, sets, weights) -> float:
    return sum(w for s, w in zip(sets, weights, strict=True) if _contiguous(perm, s))


def _assert_valid(result: Ordering, n: int, sets) -> None:
    assert sorted(result.perm) == list(range(n))
    assert result.contiguous == tuple(_contiguous(result.perm, s) for s in sets)
    assert result.exact == all(result.contiguous)


@st.composite
def hidden_intervals(draw) -> tuple[int, list[int], list[list[int]]]:
    """A hidden order and intervals of it, so a zero-copy order exists by construction."""
    n = draw(st.integers(0, 40))
    hidden = draw(st.permutations(range(n)))
    bounds = st.tuples(st.integers(0, n), st.integers(0, n)).map(sorted)
    sets = [hidden[a:b] for a, b in draw(st.lists(bounds, max_size=12))]
    return n, hidden, sets


@st.composite
def small_families(draw) -> tuple[int, list[set[int]], list[int]]:
    """Arbitrary sets over at most 6 channels (small enough to brute-force), with weights."""
    n = draw(st.integers(1, 6))
    sets = draw(st.lists(st.sets(st.integers(0, n - 1)), max_size=6))
    weights = draw(st.lists(st.integers(0, 9), min_size=len(sets), max_size=len(sets)))
    return n, sets, weights


# ---- properties ------------------------------------------------------------------------------


@_SETTINGS
@given(hidden_intervals())
def test_intervals_of_a_hidden_order_are_made_contiguous(case):
    n, _, sets = case
    perm = consecutive_ones_order(n, sets)
    assert perm is not None
    assert sorted(perm) == list(range(n))
    assert all(_contiguous(perm, s) for s in sets)
    result = order_channels(n, sets)
    assert result.exact
    _assert_valid(result, n, sets)


@_SETTINGS
@given(hidden_intervals(), st.randoms(use_true_random=False))
def test_shuffled_input_orders_give_the_same_answer(case, rnd):
    # the answer must not depend on how the caller lists the sets or their channels
    n, _, sets = case
    shuffled = [rnd.sample(s, len(s)) for s in sets]
    rnd.shuffle(shuffled)
    perm = consecutive_ones_order(n, shuffled)
    assert perm is not None
    assert all(_contiguous(perm, s) for s in sets)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(small_families())
def test_exact_test_agrees_with_brute_force(case):
    n, sets, _ = case
    perm = consecutive_ones_order(n, sets)
    assert (perm is None) == (_brute_force(n, sets) is None)
    if perm is not None:
        assert sorted(perm) == list(range(n))
        assert all(_contiguous(perm, s) for s in sets)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(small_families(), st.booleans())
def test_order_channels_is_valid_and_never_worse_than_identity(case, weighted):
    n, sets, weights = case
    weights = weights if weighted else [len(s) for s in sets]
    result = order_channels(n, sets, weights if weighted else None)
    _assert_valid(result, n, sets)
    assert result.exact == (_brute_force(n, sets) is not None)
    assert _score(result.perm, sets, weights) >= _score(range(n), sets, weights)


@st.composite
def perm_and_subset(draw) -> tuple[list[int], set[int]]:
    perm = draw(st.integers(1, 30).flatmap(lambda n: st.permutations(range(n))))
    return perm, draw(st.sets(st.sampled_from(perm)))


@_SETTINGS
@given(perm_and_subset())
def test_runs_are_the_maximal_position_ranges_of_a_set(case):
    perm, s = case
    found = runs(perm, s)
    covered = [k for a, b in found for k in range(a, b)]
    assert covered == sorted(k for k, c in enumerate(perm) if c in s)
    assert all(a < b for a, b in found)
    assert all(b < a for (_, b), (a, _) in itertools.pairwise(found))  # gaps between runs
    assert is_contiguous(perm, s) == (len(found) <= 1) == _contiguous(perm, s)


# ---- hand-built families ---------------------------------------------------------------------

_C1P = {
    "nested prefixes (DenseNet concat)": (8, [range(k) for k in range(1, 9)]),
    "overlapping chain": (7, [{0, 1, 2}, {2, 3, 4}, {4, 5, 6}]),
    "path of pairs": (5, [{0, 1}, {1, 2}, {2, 3}, {3, 4}]),
    "chain out of order": (5, [{3, 1}, {4, 2}, {0, 3}, {2, 1}]),
    "nested and overlapping": (9, [range(6), range(3, 9), range(3), range(6, 9), {4, 5}]),
    "laminar in a class": (8, [{0, 1, 2, 3}, {2, 3, 4, 5}, {0, 1}, {6, 7}]),
    "equal union of a component": (4, [{0, 1, 2}, {1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}]),
    "trivial sets only": (4, [set(), {2}, range(4), {1}, {1}]),
}

_NOT_C1P = {
    # three pairs that must all be adjacent: a path of 3 channels has only 2 adjacencies
    "Tucker M_I(3): triangle": (3, [{0, 1}, {1, 2}, {0, 2}]),
    "Tucker M_I(4): 4-cycle": (4, [{0, 1}, {1, 2}, {2, 3}, {3, 0}]),
    "Tucker M_I(5): 5-cycle": (5, [{0, 1}, {1, 2}, {2, 3}, {3, 4}, {4, 0}]),
    # the middle of the run {1, 3, 5} would need a neighbour outside it
    "Tucker M_IV": (6, [{0, 1}, {2, 3}, {4, 5}, {1, 3, 5}]),
    # 0 and 3 must meet in the middle of {0, 1, 2, 3}, yet one of them must touch 4
    "Tucker M_V": (5, [{0, 1}, {2, 3}, {0, 1, 2, 3}, {0, 3, 4}]),
    "channel 0 with three neighbours": (5, [{0, 1, 2}, {0, 3}, {0, 4}]),
}


@pytest.mark.parametrize("n, sets", _C1P.values(), ids=_C1P.keys())
def test_known_c1p_families(n, sets):
    assert _brute_force(n, sets) is not None  # the table itself is right
    perm = consecutive_ones_order(n, sets)
    assert perm is not None
    assert all(_contiguous(perm, s) for s in sets)
    result = order_channels(n, sets)
    assert result.exact
    _assert_valid(result, n, sets)


@pytest.mark.parametrize("n, sets", _NOT_C1P.values(), ids=_NOT_C1P.keys())
def test_known_non_c1p_families(n, sets):
    assert _brute_force(n, sets) is None  # the table itself is right
    assert consecutive_ones_order(n, sets) is None
    result = order_channels(n, sets)
    assert not result.exact
    _assert_valid(result, n, sets)
    # dropping any one set of a minimal obstruction leaves a C1P family, which the greedy finds
    if len(sets) > 1 and all(_brute_force(n, sets[:i] + sets[i + 1 :]) for i in range(len(sets))):
        assert sum(result.contiguous) == len(sets) - 1


def test_identity_is_kept_when_it_already_works():
    sets = [range(2, 5), range(0, 3), range(4, 8), {7}]
    result = order_channels(8, sets)
    assert result == Ordering(tuple(range(8)), (True,) * 4, exact=True)


def test_identity_is_kept_on_ties():
    # every order makes at most two of the three pairs contiguous; the identity already does
    result = order_channels(3, [{0, 1}, {1, 2}, {0, 2}])
    assert result.perm == (0, 1, 2)
    assert result.contiguous == (True, True, False)


def test_the_heavy_set_wins():
    result = order_channels(3, [{0, 1}, {1, 2}, {0, 2}], weights=[1, 1, 10])
    assert result.contiguous[2]
    assert sum(result.contiguous) == 2
    assert not result.exact


def test_duplicates_count_once_per_copy():
    # {0, 2} listed twice outweighs {0, 1} and {1, 2} once each
    sets = [{0, 1}, {1, 2}, {0, 2}, {2, 0}]
    result = order_channels(3, sets, weights=[2, 2, 3, 3])
    assert result.contiguous[2] and result.contiguous[3]


def test_max_sets_zero_offers_nothing_and_falls_back_to_identity():
    result = order_channels(4, [{0, 2}, {1, 3}, {0, 1}, {2, 3}], max_sets=0)
    assert result.perm == (0, 1, 2, 3)
    assert result.contiguous == (False, False, True, True)


def test_no_channels():
    assert consecutive_ones_order(0, [[], set()]) == []
    assert order_channels(0, [[]]) == Ordering((), (True,), exact=True)
    assert runs([], []) == []


def test_runs_of_a_split_set():
    perm = [4, 0, 1, 3, 2, 5]
    assert runs(perm, {0, 1, 2, 5}) == [(1, 3), (4, 6)]
    assert runs(perm, {3, 1}) == [(2, 4)]
    assert is_contiguous(perm, {3, 1})
    assert not is_contiguous(perm, {4, 5})


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: consecutive_ones_order(3, [{0, 3}]), "outside"),
        (lambda: consecutive_ones_order(-1, []), "non-negative"),
        (lambda: order_channels(3, [{0, 1}], weights=[1, 2]), "one per set"),
        (lambda: order_channels(3, [{0, 1}], weights=[-1]), "non-negative"),
        (lambda: order_channels(3, [{0, 1}], max_sets=-1), "max_sets"),
        (lambda: runs([0, 0, 1], {0}), "permutation"),
        (lambda: runs([0, 1, 3], {0}), "permutation"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- scale -----------------------------------------------------------------------------------


def test_densenet_sized_c1p_family_is_solved_exactly():
    rng = np.random.default_rng(0)
    n = 1024
    hidden = rng.permutation(n)
    prefixes = [hidden[: 64 + 32 * k] for k in range(30)]
    windows = [hidden[a : a + 160] for a in range(0, 800, 40)]
    sets = prefixes + windows
    assert len(sets) == 50
    result = order_channels(n, sets)
    assert result.exact
    _assert_valid(result, n, sets)


def test_densenet_sized_conflicting_family_runs():
    # UCPE-like: each consumer keeps a random 70% of a growing prefix, plus a chain of windows
    rng = np.random.default_rng(1)
    n = 1024
    kept = [rng.choice(64 + 32 * k, size=(64 + 32 * k) * 7 // 10, replace=False) for k in range(25)]
    windows = [np.arange(a, a + 160) for a in range(0, 850, 34)]
    sets = kept + windows
    assert len(sets) == 50
    result = order_channels(n, sets)
    _assert_valid(result, n, sets)
    assert not result.exact
    # the identity already makes every window contiguous; the search keeps at least that
    assert _score(result.perm, sets, [len(s) for s in sets]) >= sum(len(s) for s in windows)
