"""NumPy float64 references of every compiled-core operation (each backend is tested on them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from affeq_rt.core.evaluate import HeadsResult

__all__ = ["GramReference", "evaluate_reference", "gram_from", "gram_reference"]


def gram_from(n: int, mean: np.ndarray, scatter: np.ndarray) -> np.ndarray:
    """ZᵀZ for Z = [X 1] from count, mean and centred scatter: [[S + nμμᵀ, nμ], [nμᵀ, n]]."""
    d = mean.shape[0]
    G = np.empty((d + 1, d + 1))
    G[:d, :d] = scatter + float(n) * np.outer(mean, mean)
    G[:d, d] = G[d, :d] = float(n) * mean
    G[d, d] = n
    return G


@dataclass
class GramReference:
    """Float64 reference statistics of a feature matrix (finite rows only)."""

    n: int
    skipped: int
    mean: np.ndarray
    scatter: np.ndarray

    def gram(self) -> np.ndarray:
        """ZᵀZ for Z = [X 1] in float64."""
        return gram_from(self.n, self.mean, self.scatter)


def gram_reference(X: np.ndarray, chunk: int = 65536) -> GramReference:
    """NumPy float64 two-pass reference (mean first, then centred products); same NaN policy."""
    X = np.asarray(X)
    ok = np.isfinite(X).all(axis=1)
    Xf = X[ok] if not ok.all() else X
    n, d = Xf.shape
    mean = np.zeros(d)
    for i in range(0, n, chunk):
        mean += Xf[i : i + chunk].astype(np.float64).sum(axis=0)
    mean = mean / max(n, 1)
    S = np.zeros((d, d))
    for i in range(0, n, chunk):
        Y = Xf[i : i + chunk].astype(np.float64) - mean
        S += Y.T @ Y
    return GramReference(n=n, skipped=int((~ok).sum()), mean=mean if n else np.zeros(d), scatter=S)


def evaluate_reference(
    X: np.ndarray, W: np.ndarray, b: np.ndarray, labels: np.ndarray
) -> HeadsResult:
    """NumPy float64 reference of :func:`evaluate_heads` (stable sort: ties to the lowest class)."""
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    T, K, _ = W.shape
    n = X.shape[0]
    kk = min(5, K)
    top1 = np.zeros(T, dtype=np.int64)
    top5 = np.zeros(T, dtype=np.int64)
    pred = np.zeros((T, n), dtype=np.int32)
    hits = np.zeros((T, n), dtype=bool)
    known = labels >= 0
    for t in range(T):
        logits = X @ W[t].T + b[t]
        order = np.argsort(-logits, axis=1, kind="stable")[:, :kk]
        pred[t] = order[:, 0]
        hits[t] = known & (order[:, 0] == labels)
        top1[t] = int(hits[t].sum())
        top5[t] = int((known & (order == labels[:, None]).any(axis=1)).sum())
    return HeadsResult(
        top1=top1,
        top5=top5,
        pred=pred,
        correct=np.packbits(hits, axis=1),
        n=n,
        labeled=int(known.sum()),
        device="reference",
    )
