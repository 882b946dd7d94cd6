"""Permutation null of the Gram similarity measures, from the same pass (issue 22).

Similarity scores grow with width and depth whatever the networks share (Gröger, Wen, Brbić 2026):
a score means something only against what unrelated rows of the same networks give. Pairing A's
row i with B's row π(i) keeps each network's own statistics (S_aa, S_bb, the means) and destroys
what the images share, so only the cross blocks change: S^π_ab = Σ_i x_a,i x_b,π(i)ᵀ − n μ_a μ_bᵀ.
The ``PermutedCross`` reducer (``method.reducers``) accumulates Σ_i x_a,i x_b,π(i)ᵀ for K
permutations in the pass that builds the Gram (K cross blocks per pair of networks, no pass of its
own); each permutation shuffles the rows **within each chunk** of the fixed grid (4,096 rows of a
store or of arrays), by ``default_rng([NULL_SEED, k, chunk start])``, so a cluster's shards give
the same sums.

For every measure and pair: the null mean and standard deviation over the K permutations, the
**calibrated** score raw − null mean (the part of the score that unrelated rows do not reach), and
the empirical **p-value** (1 + #{null ≥ raw}) / (K + 1) (Procrustes, a distance: null ≤ raw).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from affeq_rt.method.reducers import PermutedCross

NULL_MEASURES = ("cka", "cca_mean", "svcca", "r2", "procrustes")  # from the Gram's blocks


class _Permuted:
    """A Gram state whose cross blocks are those of permutation ``k`` (Moments protocol)."""

    def __init__(self, moments: Any, cross: PermutedCross, k: int) -> None:
        self.n, self.moments, self.cross, self.k = int(moments.n), moments, cross, k
        self.mu = np.asarray(moments.mean(), np.float64)
        self.eps = getattr(moments, "eps", np.finfo(np.float64).eps)
        self.where = {(s.start, s.stop): m for m, s in cross.slices.items()}

    def mean(self) -> np.ndarray:
        """The real mean (a permutation keeps each network's rows)."""
        return self.mu

    def scatter(self, rows: slice, cols: slice) -> np.ndarray:
        """Own blocks from the Gram, cross blocks from the permutation."""
        a, b = self.where.get((rows.start, rows.stop)), self.where.get((cols.start, cols.stop))
        if a is None or b is None or a == b:
            return self.moments.scatter(rows, cols)
        key, flip = (f"{a}|{b}", False) if f"{a}|{b}" in self.cross.sums else (f"{b}|{a}", True)
        raw = self.cross.sums[key][self.k]
        raw = raw.T if flip else raw
        return raw - self.n * np.outer(self.mu[rows], self.mu[cols])


def null_stats(moments: Any, cross: PermutedCross, raw: Mapping[str, np.ndarray],
               measure: Callable[[Any], Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Null mean, sd, calibrated score and p-value per measure ([N, N] each) from the K permuted
    states; ``measure(moments)`` gives the measures of a state, ``raw`` the real ones."""
    draws: dict[str, list[np.ndarray]] = {m: [] for m in NULL_MEASURES if m in raw}
    for k in range(cross.count):
        got = measure(_Permuted(moments, cross, k))
        for m in draws:
            draws[m].append(np.asarray(got[m], np.float64))
    out: dict[str, Any] = {"permutations": cross.count, "measures": {}}
    for m, d in draws.items():
        z = np.stack(d)
        real = np.asarray(raw[m], np.float64)
        beyond = (z <= real) if m == "procrustes" else (z >= real)
        mean = z.mean(0)
        out["measures"][m] = {"mean": mean, "sd": z.std(0, ddof=1) if len(d) > 1 else 0 * mean,
                              "calibrated": real - mean,
                              "p": (1.0 + beyond.sum(0)) / (cross.count + 1.0)}
    return out
