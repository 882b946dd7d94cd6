"""Maps must not depend on the CPU: OLS/ridge maps from the streaming Gram against float64 lstsq.

Every tolerance below is a worst-case bound from float64 arithmetic (valid for any summation order,
blocking or FMA use, hence for any BLAS kernel), not a measurement on this machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from affeq_rt.core import GramAccumulator, gram_reference
from affeq_rt.method import solvers

EPS64 = float(np.finfo(np.float64).eps)


def _accumulate(x: np.ndarray, block_rows: int = 0) -> GramAccumulator:
    acc = GramAccumulator(x.shape[1], device="cpu", block_rows=block_rows)
    for i in range(0, len(x), 1000):
        acc.update(np.ascontiguousarray(x[i : i + 1000]))
    return acc


def _lstsq(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.hstack([a.astype(np.float64), np.ones((len(a), 1))])
    sol = np.linalg.lstsq(z, y.astype(np.float64), rcond=None)[0]
    return sol[:-1].T, sol[-1]


def _ill_conditioned(n: int, d: int, db: int, cond: float, seed: int = 0):
    """Centred source with singular values log-spaced over [1, 1/cond] (× √n), plus an offset;
    target = linear image + noise. Returns float32 source, target and the target map."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d))
    g -= g.mean(0)  # orthonormalise centred columns (Cholesky-QR: two products, no slow QR)
    q = g @ np.linalg.inv(np.linalg.cholesky(g.T @ g).T)
    v = np.linalg.qr(rng.standard_normal((d, d)))[0]
    sig = np.logspace(0, -np.log10(cond), d) * np.sqrt(n)
    a = ((q * sig) @ v.T + rng.uniform(-1, 1, d)).astype(np.float32)
    m = rng.standard_normal((db, d))
    y = (a.astype(np.float64) @ m.T + 0.01 * rng.standard_normal((n, db)) + 2).astype(np.float32)
    return a, y


def test_ols_on_ill_conditioned_data_matches_float64_lstsq() -> None:
    n, d, db, blk = 20_000, 256, 8, 512
    a, y = _ill_conditioned(n + 2000, d, db, 1e6)
    (a_tr, y_tr), (a_te, y_te) = (a[:n], y[:n]), (a[n:], y[n:])
    acc = _accumulate(np.hstack([a_tr, y_tr]), block_rows=blk)
    w, b, st = solvers.ols(acc, slice(0, d), slice(d, d + db))
    wr, br = _lstsq(a_tr, y_tr)
    # The float32 data really has cond(X_c) ≈ 1e6 (so cond(S_AA) ≈ 1e12).
    lam = np.linalg.eigvalsh(gram_reference(a_tr).scatter)
    cond = float(np.sqrt(lam[-1] / lam[0]))
    assert 5e5 < cond < 2e6
    # The cut-off follows float64 precision: every direction is resolved (the old 1e-7 cut-off
    # kept ~7/12 of them; a float32-product Gram cannot resolve eigenvalues below ~1e-7·λmax).
    assert st["rank"] == d
    # Bound. Each Gram entry is a float64 sum over ≤ blk rows (γ_blk ≤ blk·eps64 of
    # sqrt(S_ii S_jj), any order), merged over n/blk blocks (≤ eps64 each), shifted in float64;
    # |ΔS| ≤ δ s sᵀ (s_i = √S_ii) gives ‖ΔS‖₂ ≤ δ·tr(S). eigh adds a backward error ≤ d·eps64·‖S‖.
    # So ε_S = ‖ΔS‖/‖S‖ ≤ (blk + n/blk + 4 + d)·eps64·tr(S)/λmax. For normal equations the
    # fitted values move by ‖X ΔW‖ ≤ cond(X)·ε_S·(‖Y_c‖ + σmax‖W‖) (first order). Measured here
    # ≈1e-9; the bound is ≈1e-5; the old float32 Gram / 1e-7 cut-off give ≥4e-4 (they fail).
    delta = (blk + n / blk + 4 + d) * EPS64 * float(lam.sum() / lam[-1])
    pred, ref = a_te.astype(np.float64) @ w.T + b, a_te.astype(np.float64) @ wr.T + br
    yc = y_te.astype(np.float64) - y_te.mean(0)
    rho = np.sqrt(lam[-1]) * np.linalg.norm(wr, 2) / np.linalg.norm(y_tr - y_tr.mean(0))
    bound = cond * delta * (1 + rho)
    assert np.linalg.norm(pred - ref) / np.linalg.norm(yc) < bound
    assert bound < 1e-4  # the bound itself separates float64 from float32 moments


def test_ols_on_well_conditioned_data_matches_float64_lstsq_to_its_bound() -> None:
    rng = np.random.default_rng(1)
    n, d, db, blk = 20_000, 64, 16, 4096
    a = (rng.standard_normal((n, d)) * rng.uniform(0.5, 2, d) + 5).astype(np.float32)
    y = (a @ rng.standard_normal((db, d)).T + 0.1 * rng.standard_normal((n, db))).astype(np.float32)
    acc = _accumulate(np.hstack([a, y]))  # default blocks: 4096 rows
    w, b, st = solvers.ols(acc, slice(0, d), slice(d, d + db))
    wr, br = _lstsq(a, y)
    lam = np.linalg.eigvalsh(gram_reference(a).scatter)
    cond = float(lam[-1] / lam[0])  # cond(S_AA), what the solver reports as "condition"
    assert cond == pytest.approx(st["condition"], rel=1e-6)
    assert cond < 20
    # Bound (the same argument as above, issue 23: the old 1e-6 was 400× the comment's own
    # figure). ε_S ≤ (blk + n/blk + 4 + d)·eps64·tr(S)/λmax ≈ 4.2e3·2.2e-16·30 ≈ 2.8e-11 bounds the
    # Gram's relative error (S_AA and S_AB alike); solving the normal equations moves W by
    # ‖ΔW‖₂ ≤ 2·cond(S_AA)·ε_S·‖W‖₂ (first order: one ε_S from each side), the float64 lstsq
    # reference adds ≤ d·eps64·√cond of its own, and b = ȳ − W·x̄ moves by ‖ΔW‖₂·‖x̄‖₂. With
    # ‖W‖₂ ≈ 13 that is ≈1e-8 absolute (measured ≈2e-14); a map rounded to float32 is off by
    # ≈1e-7 (2⁻²⁴ of the largest entry, 4.0) and fails.
    delta = (blk + n / blk + 4 + d) * EPS64 * float(lam.sum() / lam[-1])
    rel = 2 * cond * delta + d * EPS64 * np.sqrt(cond)
    w_norm = float(np.linalg.norm(wr, 2))
    assert np.linalg.norm(w - wr, 2) <= rel * w_norm
    x_mean = float(np.linalg.norm(a.astype(np.float64).mean(0)))
    assert np.abs(b - br).max() <= rel * w_norm * (x_mean + 1)
    assert rel * w_norm < np.abs(wr).max() * 2.0**-24  # it separates float64 maps from float32


def test_ridge_cut_off_applies_at_every_lambda() -> None:
    """Fewer rows than dimensions: the null directions of S_AA carry only rounding noise; ridge
    must drop them at every λ, not divide that noise by a small λ."""
    rng = np.random.default_rng(2)
    n, d, db = 30, 60, 5
    a = (rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 3).astype(np.float32)
    y = (a @ rng.standard_normal((db, d)).T + rng.standard_normal((n, db))).astype(np.float32)
    tr, ho = _accumulate(np.hstack([a[:20], y[:20]])), _accumulate(np.hstack([a[20:], y[20:]]))
    eig = solvers.source_eig(tr, slice(0, d))
    assert eig.rank == 8  # rank of the 8-factor source over 20 rows
    tiny = 1e-12 * float(eig.lam.max())  # a λ far below the kept eigenvalues: barely any shrinkage
    w, _, st = solvers.ridge(tr, slice(0, d), slice(d, d + db), ho, lambdas=np.array([tiny]))
    assert st["lambda"] == tiny
    # W lies in the kept subspace: its null-space part is eigenvector rounding (≤ ~d·eps64·‖W‖),
    # while dividing the null eigenvalues' float64 noise (~eps64·λmax) by λ = 1e-12·λmax leaves
    # ≳1e-4·‖W‖ there (with the cut-off at λ = 0 only, the null part was ~all of ‖W‖).
    null = eig.vecs[:, ~eig.keep]
    assert np.linalg.norm(w @ null) <= 1e3 * d * EPS64 * np.linalg.norm(w)


def test_rcond_is_exposed_and_follows_the_moments_precision() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 12))
    a[:, 11] = a[:, 10] + 1e-4 * rng.standard_normal(500)  # one direction at ~5e-9·λmax of S_AA
    a = a.astype(np.float32)  # rounding (~3e-8 of each entry) leaves that direction at ~5e-9
    y = rng.standard_normal((500, 2)).astype(np.float32)
    acc = _accumulate(np.hstack([a, y]))
    assert solvers.ols(acc, slice(0, 12), slice(12, 14))[2]["rank"] == 12  # float64: resolved
    assert solvers.ols(acc, slice(0, 12), slice(12, 14), rcond=1e-6)[2]["rank"] == 11
    assert solvers.default_rcond(512) == 512 * EPS64
