"""Channel orders that turn gathers into slices: the consecutive-ones property.

A tensor with ``n`` channels is read by several consumers; consumer ``i`` reads the channel set
``S_i``. We may apply one permutation to the producer's output channels and to every consumer's
input columns. A consumer whose set occupies one contiguous range of positions then reads a slice
(a view); any other consumer needs a gather (a copy). A permutation under which *every* set is
contiguous exists iff the family has the consecutive-ones property (C1P), which
:func:`consecutive_ones_order` decides exactly. When no such order exists, :func:`order_channels`
keeps a heavy C1P subfamily greedily and orders the channels for it.

The exact test rests on three facts about *overlap components* (two sets overlap when they
intersect and neither contains the other; components are the connected parts of that relation):

1. The family is C1P iff every overlap component is: the unions of the components form a laminar
   family, and a component nested in another lies inside one class of the other's partition below,
   whose channels may be permuted freely.
2. For a C1P overlap component, the valid orders of its union are exactly one ordered partition
   ``C_0 | C_1 | … | C_{k-1}`` (channels free within a class) or its reverse.
3. That partition can be built by adding the component's sets in BFS order of the overlap graph, so
   each new set overlaps one already placed: the new set must cover a run of classes, full inside
   and possibly partial at the ends (which are split), and its channels outside the current union
   must extend the run past one end. Each step is forced, so a failure proves "not C1P".

This is the decomposition behind Hsu's "simple test for the consecutive ones property" (2002),
without his linear-time bookkeeping; Booth–Lueker PQ-trees reach linear time too. At our sizes
(thousands of channels, tens of sets) the vectorised quadratic version is simpler and fast.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Ordering", "consecutive_ones_order", "is_contiguous", "order_channels", "runs"]

# extra greedy passes ``order_channels`` may spend, each forcing one rejected set in
_MAX_KICKS = 16

_Rank = np.ndarray  # int64[n]: class index of each channel in a component's union, -1 outside


@dataclass(frozen=True)
class Ordering:
    """A channel permutation and which consumer sets it makes contiguous (slices, not gathers).

    Attributes:
        perm: ``perm[k]`` is the original channel placed at position ``k``.
        contiguous: ``contiguous[i]`` is true iff ``sets[i]`` is one run of positions under perm.
        exact: every set is contiguous, i.e. a zero-copy order exists and this is one.
    """

    perm: tuple[int, ...]
    contiguous: tuple[bool, ...]
    exact: bool


# ---- public API ------------------------------------------------------------------------------


def consecutive_ones_order(n: int, sets: Iterable[Iterable[int]]) -> list[int] | None:
    """A permutation of ``range(n)`` in which every set is contiguous, or None if none exists.

    Exact: None means the family lacks the consecutive-ones property (see the module docstring for
    the algorithm). With ``m`` distinct non-trivial sets the cost is O(m²·n) for the overlap
    matrix (one BLAS product) plus O(m·n log n) for the refinement steps and the assembly.
    Empty sets, singletons, the full set and duplicates never constrain the order.
    """
    arrays = _normalise(n, sets)
    reps, _ = _distinct_nontrivial(n, arrays)
    overlap = _overlap_matrix(n, reps)
    ranks = []
    for component in _components(overlap):
        rank = _refine(n, reps, component)
        if rank is None:
            return None
        ranks.append(rank)
    perm = _assemble(n, ranks)
    _check_contiguous(perm, reps)
    return perm


def order_channels(
    n: int,
    sets: Sequence[Iterable[int]],
    weights: Sequence[float] | None = None,
    *,
    max_sets: int | None = None,
) -> Ordering:
    """The channel order that makes the most (weighted) consumer sets contiguous that we can find.

    If a zero-copy order exists it is returned with ``exact=True`` (the identity when it already
    qualifies, so nothing is permuted needlessly). Otherwise finding the best subfamily is NP-hard
    (C1P by fewest row deletions), so greedy passes bound the work: each offers the sets in some
    order and keeps one only while the kept family stays C1P, re-refining just the overlap
    component it joins. Orders tried: heaviest first; weight per overlapping set first (overlaps
    are what conflict); the identity's contiguous sets first, so the result is never worse than
    the identity; and up to 16 (``_MAX_KICKS``) passes that each force one rejected set in,
    heaviest first, ahead of the best order's contiguous sets. The best order found is returned,
    the identity on ties. At most 19 passes of O(m) refinement steps (amortised; O(m²) if every
    merge fails), O(n log n) each.

    Args:
        n: number of channels.
        sets: the channel set each consumer reads (ints in ``[0, n)``).
        weights: what making each set contiguous is worth (e.g. the bytes a gather would copy);
            non-negative, default the set's size.
        max_sets: offer at most this many sets to the greedy per pass (heaviest first); None for
            all. The exact test always sees every set.
    """
    arrays = _normalise(n, sets)
    w = _weights(arrays, weights)
    if max_sets is not None and max_sets < 0:
        raise ValueError(f"max_sets must be non-negative or None, got {max_sets}")

    identity = list(range(n))
    flags = _flags(identity, arrays)
    if all(flags):
        return Ordering(tuple(identity), tuple(flags), exact=True)
    perm = consecutive_ones_order(n, arrays)
    if perm is not None:
        return Ordering(tuple(perm), tuple(_flags(perm, arrays)), exact=True)

    search = _GreedySearch(n, arrays, w, max_sets)
    by_weight, by_ratio = search.offer_orders()
    search.attempt(by_weight)
    search.attempt(by_ratio)
    # The sets one order makes contiguous are C1P, so offering them first keeps them all: seeded
    # with the identity's, a pass can only match or beat the identity.
    search.attempt(_to_front(by_weight, search.contiguous_reps(flags)))
    search.kick(by_weight)
    return Ordering(tuple(search.perm), tuple(search.flags), exact=all(search.flags))


class _GreedySearch:
    """Greedy passes over one family of sets, keeping the best order found (identity on ties)."""

    def __init__(
        self, n: int, arrays: list[np.ndarray], w: np.ndarray, max_sets: int | None
    ) -> None:
        self.n, self.arrays, self.w, self.max_sets = n, arrays, w, max_sets
        self.reps, self.rep_of = _distinct_nontrivial(n, arrays)
        self.overlap = _overlap_matrix(n, self.reps)
        self.perm = list(range(n))
        self.flags = _flags(self.perm, arrays)
        self.score = float(np.dot(w, self.flags))

    def offer_orders(self) -> tuple[list[int], list[int]]:
        """The distinct sets heaviest first, and by weight per overlapping set."""
        rep_weight = np.zeros(len(self.reps))
        for i, r in enumerate(self.rep_of):
            if r >= 0:
                rep_weight[r] += self.w[i]
        degree = self.overlap.sum(axis=1)
        reps = self.reps
        by_weight = sorted(range(len(reps)), key=lambda r: (-rep_weight[r], -reps[r].size, r))
        # sets that overlap nothing never conflict, so a set's overlaps measure what it may block
        by_ratio = sorted(by_weight, key=lambda r: -rep_weight[r] / (1 + degree[r]))
        return by_weight, by_ratio

    def contiguous_reps(self, flags: list[bool]) -> set[int]:
        """The distinct sets that ``flags`` (one per input set) marks contiguous."""
        return {self.rep_of[i] for i, ok in enumerate(flags) if ok and self.rep_of[i] >= 0}

    def attempt(self, candidates: list[int]) -> None:
        """One greedy pass offering ``candidates`` in order; kept if it beats the best so far."""
        ranks, kept = _greedy(self.n, self.reps, self.overlap, candidates[: self.max_sets])
        perm = _assemble(self.n, ranks)
        _check_contiguous(perm, [self.reps[r] for r in kept])
        flags = _flags(perm, self.arrays)
        score = float(np.dot(self.w, flags))
        if score > self.score:
            self.perm, self.flags, self.score = perm, flags, score

    def kick(self, by_weight: list[int]) -> None:
        """Up to ``_MAX_KICKS`` passes, each forcing one rejected set in, heaviest first.

        The forced set goes ahead of the best order's contiguous sets, evicting what conflicts
        with it.
        """
        kicks = 0
        for r in by_weight[: self.max_sets]:
            if kicks == _MAX_KICKS:
                break
            current = self.contiguous_reps(self.flags)
            if r not in current:
                kicks += 1
                self.attempt([r, *(c for c in _to_front(by_weight, current) if c != r)])


def runs(perm: Sequence[int], s: Iterable[int]) -> list[tuple[int, int]]:
    """The maximal position ranges ``[start, stop)`` that set ``s`` occupies under ``perm``.

    One run means the consumer can read ``narrow(start, stop - start)`` instead of gathering;
    several runs could still become a concatenation of slices.
    """
    pos = _positions(perm)
    channels = _normalise(len(pos), [s])[0]
    p = np.sort(pos[channels])
    if p.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = p[np.concatenate(([0], breaks))]
    stops = p[np.concatenate((breaks - 1, [p.size - 1]))] + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def is_contiguous(perm: Sequence[int], s: Iterable[int]) -> bool:
    """Whether set ``s`` is one run of positions under ``perm`` (the empty set counts as one)."""
    return len(runs(perm, s)) <= 1


# ---- normalisation ---------------------------------------------------------------------------


def _normalise(n: int, sets: Iterable[Iterable[int]]) -> list[np.ndarray]:
    """Each set as a sorted array of distinct channels, checked to lie in ``[0, n)``."""
    if n < 0:
        raise ValueError(f"the number of channels must be non-negative, got {n}")
    out = []
    for i, s in enumerate(sets):
        a = s if isinstance(s, np.ndarray) else np.fromiter((int(c) for c in s), dtype=np.int64)
        a = np.unique(np.asarray(a, dtype=np.int64))
        if a.size and (a[0] < 0 or a[-1] >= n):
            bad = int(a[0] if a[0] < 0 else a[-1])
            raise ValueError(f"set {i} names channel {bad}, outside [0, {n}); pass the tensor's n")
        out.append(a)
    return out


def _weights(arrays: list[np.ndarray], weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:
        return np.array([a.size for a in arrays], dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),):
        raise ValueError(f"got {w.size} weights for {len(arrays)} sets; give one per set")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    return w


def _distinct_nontrivial(n: int, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """The distinct sets that constrain an order, and each input set's index among them (or -1)."""
    reps: list[np.ndarray] = []
    index: dict[bytes, int] = {}
    rep_of = []
    for a in arrays:
        if a.size <= 1 or a.size == n:
            rep_of.append(-1)
            continue
        rep_of.append(index.setdefault(a.tobytes(), len(reps)))
        if rep_of[-1] == len(reps):
            reps.append(a)
    return reps, rep_of


# ---- the exact test --------------------------------------------------------------------------


def _overlap_matrix(n: int, arrays: list[np.ndarray]) -> np.ndarray:
    """``overlap[i, j]``: sets i and j intersect and neither contains the other."""
    # float32 so the product runs in BLAS; intersection counts up to 2**24 are exact
    incidence = np.zeros((len(arrays), n), dtype=np.float32)
    for i, a in enumerate(arrays):
        incidence[i, a] = 1.0
    inter = incidence @ incidence.T
    size = incidence.sum(axis=1)
    return (inter > 0) & (inter < size[:, None]) & (inter < size[None, :])


def _bfs(overlap: np.ndarray, start: int, allowed: set[int]) -> list[int]:
    """Sets reachable from ``start`` through overlaps within ``allowed``, in BFS order."""
    seen, order, queue = {start}, [start], deque([start])
    while queue:
        for j in np.flatnonzero(overlap[queue.popleft()]).tolist():
            if j in allowed and j not in seen:
                seen.add(j)
                order.append(j)
                queue.append(j)
    return order


def _components(overlap: np.ndarray) -> list[list[int]]:
    """Overlap components, each in BFS order: every set after the first overlaps an earlier one."""
    remaining = set(range(len(overlap)))
    out = []
    for start in range(len(overlap)):
        if start in remaining:
            component = _bfs(overlap, start, remaining)
            remaining.difference_update(component)
            out.append(component)
    return out


def _refine(
    n: int, arrays: list[np.ndarray], order: Sequence[int], rank: _Rank | None = None
) -> _Rank | None:
    """The ordered partition of an overlap component's union, or None if it is not C1P.

    Adds ``arrays[j]`` for ``j`` in ``order`` to the partition ``rank`` (a fresh one if None);
    every added set must overlap a set already in. The input rank is not modified.
    """
    if rank is None:
        rank = np.full(n, -1, dtype=np.int64)
        rank[arrays[order[0]]] = 0
        order = order[1:]
    else:
        rank = rank.copy()
    for j in order:
        s = arrays[j]
        member = rank >= 0
        k = int(rank.max()) + 1
        r = rank[s]
        new = s[r < 0]
        count = np.bincount(r[r >= 0], minlength=k)
        touched = np.flatnonzero(count)
        if touched.size == 0:
            raise RuntimeError("internal error: a set was added before any set it overlaps")
        lo, hi = int(touched[0]), int(touched[-1])
        if hi - lo + 1 != touched.size:
            return None  # S skips a class between two it touches
        full = count == np.bincount(rank[member], minlength=k)
        if not full[lo + 1 : hi].all():
            return None  # S covers part of an inner class, so that class would be cut
        in_s = np.zeros(n, dtype=bool)
        in_s[s] = True
        # keys 3c+1 keep class c in place; 3c and 3c+2 put a split-off part just left / right of it
        key = 3 * rank + 1
        if new.size == 0:
            if lo == hi and not full[lo]:
                raise RuntimeError("internal error: a set nested in one class was not an overlap")
            if not full[lo]:
                key[(rank == lo) & in_s] = 3 * lo + 2
            if not full[hi]:
                key[(rank == hi) & in_s] = 3 * hi
        elif hi == k - 1 and (full[hi] or lo == hi):  # S runs off the right end
            if not full[lo]:
                key[(rank == lo) & in_s] = 3 * lo + 2
            key[new] = 3 * k + 1
        elif lo == 0 and (full[lo] or lo == hi):  # S runs off the left end
            if not full[hi]:
                key[(rank == hi) & in_s] = 3 * hi
            key[new] = -1
        else:
            return None  # S has channels outside the union but touches neither end
        member[new] = True
        rank[member] = np.unique(key[member], return_inverse=True)[1]
    return rank


def _greedy(
    n: int, reps: list[np.ndarray], overlap: np.ndarray, candidates: Sequence[int]
) -> tuple[list[_Rank], list[int]]:
    """The component partitions of a C1P subfamily grown by offering ``candidates`` in order.

    Only the overlap component a candidate joins can stop being C1P, so we refine from the
    largest component it merges with instead of re-testing the whole family.
    """
    component_of: dict[int, int] = {}  # kept set -> component id (the set that founded it)
    members: dict[int, list[int]] = {}
    ranks: dict[int, _Rank] = {}
    for j in candidates:
        if j in component_of:
            continue
        touching = {
            component_of[i] for i in np.flatnonzero(overlap[j]).tolist() if i in component_of
        }
        if not touching:
            rank = np.full(n, -1, dtype=np.int64)
            rank[reps[j]] = 0
            base = j
        else:
            base = max(touching, key=lambda c: len(members[c]))
            others = {i for c in touching - {base} for i in members[c]} | {j}
            rank = _refine(n, reps, _bfs(overlap, j, others), ranks[base])
            if rank is None:
                continue
        for c in touching - {base}:
            members[base] += members.pop(c)
            del ranks[c]
        members.setdefault(base, []).append(j)
        ranks[base] = rank
        for i in members[base]:
            component_of[i] = base
    return list(ranks.values()), list(component_of)


# ---- assembling one order --------------------------------------------------------------------


def _assemble(n: int, ranks: list[_Rank]) -> list[int]:
    """One permutation realising every component's partition, nesting components inside classes.

    Unions are laminar and a nested component lies inside one class of its parent, so each class
    (and the whole range) holds child blocks and free channels in any order; we sort them by their
    smallest channel, and orient each component, to stay close to the identity.
    """
    unions = [np.flatnonzero(r >= 0) for r in ranks]
    n_classes = [int(r.max()) + 1 for r in ranks]
    # parents before children; for equal unions the one-class (single-set) component is the parent
    by_size = sorted(range(len(ranks)), key=lambda c: (-unions[c].size, n_classes[c]))
    owner = np.full(n, -1, dtype=np.int64)
    children: dict[tuple[int, int], list[int]] = {}
    for c in by_size:
        first = unions[c][0]
        parent = int(owner[first])
        slot = (parent, int(ranks[parent][first]) if parent >= 0 else 0)
        children.setdefault(slot, []).append(c)
        owner[unions[c]] = c

    def classes(c: int) -> list[tuple[int, np.ndarray]]:
        r = ranks[c][unions[c]]
        grouped = unions[c][np.argsort(r, kind="stable")]  # stable: each class stays sorted
        cls = list(enumerate(np.split(grouped, np.flatnonzero(np.diff(np.sort(r))) + 1)))
        return cls[::-1] if cls[0][1][0] > cls[-1][1][0] else cls

    def items(channels: np.ndarray, slot: tuple[int, int]) -> list[tuple[int, int]]:
        """(smallest channel, component or -1 for a free channel), in placement order."""
        kids = children.get(slot, [])
        covered = np.concatenate([unions[c] for c in kids]) if kids else np.empty(0, np.int64)
        free = np.setdiff1d(channels, covered, assume_unique=True)
        return sorted([(int(e), -1) for e in free] + [(int(unions[c][0]), c) for c in kids])

    def expand(c: int) -> Iterator[tuple[int, int]]:
        """Component ``c``'s items class by class, produced lazily as the walk reaches them."""
        return itertools.chain.from_iterable(items(ch, (c, i)) for i, ch in classes(c))

    perm: list[int] = []
    stack: list[Iterator[tuple[int, int]]] = [iter(items(np.arange(n), (-1, 0)))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif item[1] < 0:
            perm.append(item[0])
        else:
            stack.append(expand(item[1]))
    return perm


# ---- checks ----------------------------------------------------------------------------------


def _positions(perm: Sequence[int]) -> np.ndarray:
    """The inverse permutation: ``pos[channel]`` is the channel's position."""
    p = np.asarray(perm, dtype=np.int64)
    pos = np.full(p.size, -1, dtype=np.int64)
    if p.size and (p.min() < 0 or p.max() >= p.size):
        raise ValueError(f"perm must be a permutation of range({p.size})")
    pos[p] = np.arange(p.size)
    if np.any(pos < 0):
        raise ValueError(f"perm must be a permutation of range({p.size}); it repeats a channel")
    return pos


def _flags(perm: Sequence[int], arrays: list[np.ndarray]) -> list[bool]:
    pos = _positions(perm)
    out = []
    for a in arrays:
        p = pos[a]
        out.append(a.size == 0 or int(p.max() - p.min()) + 1 == a.size)
    return out


def _to_front(order: list[int], front: set[int]) -> list[int]:
    """``order`` with the members of ``front`` moved ahead, both parts keeping their order."""
    return [r for r in order if r in front] + [r for r in order if r not in front]


def _check_contiguous(perm: list[int], arrays: list[np.ndarray]) -> None:
    if not all(_flags(perm, arrays)):
        raise RuntimeError("internal error: the assembled order breaks a C1P set; please report")
