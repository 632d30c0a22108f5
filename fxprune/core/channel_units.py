"""Channel units: the atoms of structured pruning, and a union-find over them.

Every tensor's elements are labelled with *units* by an integer array ``U`` that broadcasts to the
tensor's shape (a "channel map"). A dimension where ``U`` has size > 1 is where the tensor can be
pruned; at most one such dimension exists per tensor (its *channel dim*). Two positions that must be
kept or pruned together hold units that are joined in the union-find. A conv or linear creates fresh
units for its output channels (a *root*); BN, activations and pooling pass their input's map
through; ``add`` joins its inputs position-wise; ``cat`` concatenates maps; reshapes move them.

Pruning is then simply: choose a set of unit classes to keep, and keep every position whose unit's
class is kept. Any choice is shape-consistent by construction, which is what makes the rewrite and
the masking oracle agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["UnitTable", "compact", "expand_index", "normalize", "varying_dims"]


@dataclass
class UnitTable:
    """Union-find over unit ids with per-class flags (frozen / inexact) and their reasons."""

    parent: list[int] = field(default_factory=list)
    frozen: dict[int, list[str]] = field(default_factory=dict)
    inexact: dict[int, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.parent)

    def alloc(self, n: int) -> np.ndarray:
        """Fresh units ``[k, k+n)``."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, u: int) -> int:
        parent = self.parent
        root = u
        while parent[root] != root:
            root = parent[root]
        while parent[u] != root:
            parent[u], u = root, parent[u]
        return root

    def find_array(self, units: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(units, return_inverse=True)
        roots = np.fromiter((self.find(int(u)) for u in uniq), dtype=np.int64, count=len(uniq))
        return roots[inverse].reshape(units.shape)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:  # the older unit stays the representative: deterministic, readable
            ra, rb = rb, ra
        self.parent[rb] = ra
        for flags in (self.frozen, self.inexact):
            if rb in flags:
                flags.setdefault(ra, []).extend(flags.pop(rb))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join ``a[i]`` with ``b[i]`` for all i (arrays are broadcast against each other)."""
        a, b = np.broadcast_arrays(a, b)
        pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
        for x, y in pairs:
            if x != y:
                self.union(int(x), int(y))

    def union_all(self, units: np.ndarray) -> None:
        flat = np.unique(units)
        for u in flat[1:]:
            self.union(int(flat[0]), int(u))

    def _flag(self, flags: dict[int, list[str]], units: np.ndarray, reason: str) -> None:
        for u in np.unique(units):
            root = self.find(int(u))
            reasons = flags.setdefault(root, [])
            if reason not in reasons:
                reasons.append(reason)

    def freeze(self, units: np.ndarray, reason: str) -> None:
        """Mark units as never prunable, remembering why (shown in the report)."""
        self._flag(self.frozen, units, reason)

    def mark_inexact(self, units: np.ndarray, reason: str) -> None:
        """Mark units as prunable but not equivalent to masking (e.g. LayerNorm statistics)."""
        self._flag(self.inexact, units, reason)

    def reasons(self, flags: dict[int, list[str]], u: int) -> list[str]:
        return flags.get(self.find(u), [])


def expand_index(index: object, ndim: int) -> list:
    """A basic index (ints, slices, None, ``...``) as one entry per dim plus the ``None``s.

    ``...`` is replaced by full slices and trailing dims get full slices, so position ``d`` among
    the non-None entries is the index applied to tensor dim ``d`` (same meaning as the original).
    """
    idx = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out: list = []
    for i in idx:
        out.extend([slice(None)] * (ndim - n_real) if i is Ellipsis else [i])
    out.extend([slice(None)] * (ndim - sum(1 for i in out if i is not None)))
    return out


def varying_dims(u: np.ndarray) -> list[int]:
    return [d for d, s in enumerate(u.shape) if s > 1]


def compact(u: np.ndarray) -> np.ndarray:
    """Shrink every dimension along which ``u`` is constant to size 1."""
    for d in varying_dims(u):
        first = np.take(u, [0], axis=d)
        if np.array_equal(np.broadcast_to(first, u.shape), u):
            u = first
    return u


def normalize(table: UnitTable, u: np.ndarray, cdim: int | None = None) -> np.ndarray:
    """Compact ``u`` and, if it still varies along several dims, collapse it onto one.

    Collapsing joins all units that share an index along the chosen channel dim: ``cdim`` when
    given and varying, else the longest varying dim. That is always safe — it only adds
    constraints — and the longest dim is exactly the rule channel shuffle needs: after
    ``view(b, g, c // g, h, w)`` the g rows must be pruned alike. (A multi-head split may collapse
    onto its head dim instead: ``channel_rules.head_dim``.)
    """
    u = compact(u)
    dims = varying_dims(u)
    if len(dims) <= 1:
        return u
    if cdim not in dims:
        cdim = max(dims, key=lambda d: (u.shape[d], d))
    moved = np.moveaxis(u, cdim, 0).reshape(u.shape[cdim], -1)
    table.union_arrays(moved[:, :1], moved)
    out_shape = [1] * u.ndim
    out_shape[cdim] = u.shape[cdim]
    return moved[:, 0].reshape(out_shape).copy()
