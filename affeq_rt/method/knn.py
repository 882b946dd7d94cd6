"""Mutual k-nearest-neighbour agreement (issue 22): a local similarity measure beside global ones.

For two networks A and B and the same images, each image's k nearest neighbours among the others
are found in A's feature space and in B's (features scaled to unit length, neighbours by inner
product, i.e. cosine); the score is the mean over images of |N_A(i) ∩ N_B(i)| / k, in [0, 1]
(1: the same neighbourhoods; chance ≈ k/(m − 1)). This is the ``mutual_knn`` measure of Huh et al.
(ICML 2024, "The Platonic Representation Hypothesis", platonic-rep's ``metrics.py``).

It needs the rows, not a Gram: it is taken on a documented subsample — :data:`ROWS` samples drawn
without replacement with the fixed seed :data:`SEED` (all samples when there are fewer), the rows
kept as the pass goes (a ``HeldOutRows`` reducer over :func:`sample_mask`) — with k = :data:`K`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ROWS = 2000  # samples in the subsample (m² products per network)
K = 10  # neighbours per image
SEED = 22  # the subsample's draw: the same images for every run over the same samples


def sample_mask(n: int, rows: int = ROWS, seed: int = SEED) -> np.ndarray:
    """bool [n]: the subsample (``rows`` samples drawn with ``seed``; all when n ≤ rows)."""
    out = np.zeros(n, bool)
    out[np.random.default_rng(seed).permutation(n)[:rows]] = True
    return out


def neighbours(x: np.ndarray, k: int = K) -> np.ndarray:
    """Indices [m, k] of each row's k nearest other rows by cosine (float64; ties by index)."""
    z = np.asarray(x, np.float64)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _agreement(na: np.ndarray, nb: np.ndarray, k: int) -> float:
    """Mean |N_A(i) ∩ N_B(i)| / k of two neighbour lists."""
    hits = [np.intersect1d(a, b, assume_unique=True).size for a, b in zip(na, nb, strict=True)]
    return float(np.mean(hits)) / k


def mutual_knn(xa: np.ndarray, xb: np.ndarray, k: int = K) -> float:
    """Mean |N_A(i) ∩ N_B(i)| / k over the rows (same images in the same order)."""
    return _agreement(neighbours(xa, k), neighbours(xb, k), k)


def mutual_knn_table(x: np.ndarray, slices: Mapping[str, slice], k: int = K) -> np.ndarray | None:
    """[N, N] mutual kNN agreement of every pair of models on joint rows ``x`` (None when there
    are no more than ``k`` rows: no k neighbours to compare)."""
    if x.shape[0] <= k:
        return None
    nb = {m: neighbours(x[:, s], k) for m, s in slices.items()}
    names = list(slices)
    out = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            out[i, j] = out[j, i] = _agreement(nb[a], nb[names[j]], k)
    return out


def knn_rows(rows: Any, red: Mapping[str, Any]) -> np.ndarray | None:
    """The subsample's joint rows: read from addressable rows (arrays, stores), else the rows the
    pass kept (``red["knn"]``, a ``HeldOutRows`` over :func:`sample_mask`); None without them."""
    arrays = rows.arrays()
    if arrays is not None:
        idx = np.flatnonzero(sample_mask(int(rows.n)))
        return np.concatenate([np.asarray(arrays[m][idx], np.float32) for m in rows.names], 1)
    kept = red["knn"].rows() if "knn" in red else None
    return None if kept is None else kept[0]
