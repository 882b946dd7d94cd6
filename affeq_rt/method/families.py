"""Map families from the same Gram as the affine map (issue 22): orthogonal Procrustes with scale
and offset, and reduced-rank affine maps. Each returns (W, b, stats) like ``solvers.ols``, with the
affine (OLS) map's R² on the same rows beside its own: the gap says how much the family gives up.

* :func:`procrustes`: y ≈ s·Q x + b, Q with orthonormal columns (d_B ≥ d_A) or rows (d_B < d_A).
  With S_BA = U Σ Vᵀ (thin SVD of the training cross-scatter), Q = U Vᵀ maximises tr(Qᵀ S_BA) (for
  equal widths this is ``scipy.linalg.orthogonal_procrustes`` of the centred rows); given Q the
  least-squares scale is s = tr(Σ) / tr(Q S_AA Qᵀ), and b = μ_B − s Q μ_A.
* :func:`reduced_rank`: min ‖Y − X Wᵀ − 1bᵀ‖² over rank(W) ≤ r. With the OLS map W₀ (minimum
  norm) the fitted scatter is C = W₀ S_AA W₀ᵀ; with U_r its r leading eigenvectors the solution
  is W_r = U_r U_rᵀ W₀, b = μ_B − W_r μ_A (Izenman 1975; Reinsel & Velu 1998, identity weight).
  ``rank`` None: chosen on the held-out Gram (smallest held-out residual over a doubling grid).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from affeq_rt.errors import AffeqError
from affeq_rt.method import solvers
from affeq_rt.method.solvers import Moments, SourceEig


def _with_affine(stats: dict[str, Any], affine: dict[str, Any]) -> dict[str, Any]:
    """The affine map's R² beside this map's, and the gaps (affine − this)."""
    for k in ("r2_train", "r2_holdout"):
        mine, aff = stats.get(k), affine.get(k)
        stats[f"affine_{k}"] = aff
        stats[f"affine_gap_{k}"] = None if mine is None or aff is None else aff - mine
    return stats


def procrustes(train: Moments, a: slice, t: slice, holdout: Moments | None = None,
               eig: SourceEig | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Orthogonal Procrustes with scale and offset from the Gram (see the module docstring)."""
    if int(train.n) < 2:
        raise AffeqError(f"a map needs at least 2 training images, got {int(train.n)}",
                         "use more images (--max-images) or a smaller --holdout")
    s_ba = np.asarray(train.scatter(t, a), np.float64)
    u, sig, vt = np.linalg.svd(s_ba, full_matrices=False)
    q = u @ vt
    s_aa = np.asarray(train.scatter(a, a), np.float64)
    denom = float(np.sum((q @ s_aa) * q))
    scale = float(sig.sum()) / denom if denom > 0 else 0.0
    w = scale * q
    mu = train.mean()
    b = mu[t] - w @ mu[a]
    stats = solvers._common_stats(w, b, train, a, t, holdout)
    stats.update(scale=scale, source_dim=int(s_aa.shape[0]))
    _, _, affine = solvers.ols(train, a, t, holdout, eig=eig)
    return w, b, _with_affine(stats, affine)


def rank_grid(top: int) -> list[int]:
    """Candidate ranks: 1, 2, 4, … below ``top``, and ``top``."""
    out, r = [], 1
    while r < top:
        out.append(r)
        r *= 2
    return [*out, top] if top >= 1 else []


def reduced_rank(train: Moments, a: slice, t: slice, holdout: Moments | None = None,
                 rank: int | None = None, eig: SourceEig | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The reduced-rank affine map of rank ``rank`` (None: chosen on ``holdout``)."""
    w0, _, affine = solvers.ols(train, a, t, holdout, eig=eig)
    s_aa = np.asarray(train.scatter(a, a), np.float64)
    c = w0 @ s_aa @ w0.T
    lam, vecs = np.linalg.eigh(0.5 * (c + c.T))
    vecs = vecs[:, ::-1]
    top = min(affine["rank"], w0.shape[0])
    mu = train.mean()

    def map_of(r: int) -> tuple[np.ndarray, np.ndarray]:
        ur = vecs[:, :r]
        w = ur @ (ur.T @ w0)
        return w, mu[t] - w @ mu[a]

    path: dict[str, float] = {}
    if rank is None:
        if holdout is None or int(holdout.n) == 0:
            raise AffeqError("low-rank chooses its rank on held-out images, and none are held out",
                             "pass --holdout > 0, or --rank R")
        for r in rank_grid(top):
            path[str(r)] = solvers._fit_stats(*map_of(r), holdout, a, t)[0] / int(holdout.n)
        rank = int(min(path, key=lambda k: (path[k], int(k))))
    elif not 1 <= int(rank) <= w0.shape[0]:
        raise AffeqError(f"--rank must be between 1 and {w0.shape[0]}, got {rank}",
                         "pass a rank no larger than the target's width")
    w, b = map_of(int(rank))
    stats = solvers._common_stats(w, b, train, a, t, holdout)
    stats.update(map_rank=int(rank), rank_path=path or None, rank=affine["rank"],
                 source_dim=affine["source_dim"])
    return w, b, _with_affine(stats, affine)
