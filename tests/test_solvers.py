"""Solvers against NumPy float64 references, on the compiled GramAccumulator's statistics."""

from __future__ import annotations

import numpy as np
import pytest

from affeq_rt.core import GramAccumulator, gram_reference
from affeq_rt.errors import AffeqError
from affeq_rt.io.heads import Head
from affeq_rt.method import solvers


class RefMoments:
    """float64 two-pass statistics (core.gram_reference) behind the solvers' Moments interface."""

    def __init__(self, x: np.ndarray) -> None:
        self.r = gram_reference(np.asarray(x))
        self.n = self.r.n

    def mean(self) -> np.ndarray:
        return self.r.mean

    def scatter(self, rows: slice, cols: slice) -> np.ndarray:
        return self.r.scatter[rows, cols]


def _acc(*blocks: np.ndarray) -> tuple[GramAccumulator, list[slice]]:
    x = np.ascontiguousarray(np.concatenate(blocks, axis=1).astype(np.float32))
    acc = GramAccumulator(x.shape[1], device="cpu")
    for i in range(0, x.shape[0], 37):  # odd batch size: exercises streaming
        acc.update(np.ascontiguousarray(x[i:i + 37]))
    sl, o = [], 0
    for b in blocks:
        sl.append(slice(o, o + b.shape[1]))
        o += b.shape[1]
    return acc, sl


def _pair(rng, n, da, db, noise=0.1, mean=3.0):
    a = rng.normal(size=(n, da)) @ rng.normal(size=(da, da)) * 0.5 + mean
    m = rng.normal(size=(db, da))
    b = a @ m.T + rng.normal(size=db) + noise * rng.normal(size=(n, db))
    return a.astype(np.float32), b.astype(np.float32)


def test_ols_solver_math_is_exact_on_float64_moments():
    rng = np.random.default_rng(0)
    a, b = _pair(rng, 600, 24, 16)  # condition number of S_AA ~6e4
    w, bias, st = solvers.ols(RefMoments(np.hstack([a, b])), slice(0, 24), slice(24, 40))
    z = np.hstack([a.astype(np.float64), np.ones((len(a), 1))])
    ref = np.linalg.lstsq(z, b.astype(np.float64), rcond=None)[0]
    # float64 all the way: only eigh/lstsq rounding (~1e-16·cond) separates the two
    np.testing.assert_allclose(w, ref[:-1].T, rtol=0, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(bias, ref[-1], rtol=0, atol=1e-9 * np.abs(ref).max())
    assert st["rank"] == 24
    assert not st["rank_deficient"]
    assert st["dead_features"] == 0


def test_ols_on_the_compiled_accumulator_matches_lstsq():
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(600, 24)) + 3.0).astype(np.float32)  # well conditioned, offset mean
    b = (a @ rng.normal(size=(16, 24)).T + 0.1 * rng.normal(size=(600, 16))).astype(np.float32)
    acc, (sa, sb) = _acc(a, b)
    w, bias, st = solvers.ols(acc, sa, sb)
    z = np.hstack([a.astype(np.float64), np.ones((len(a), 1))])
    ref = np.linalg.lstsq(z, b.astype(np.float64), rcond=None)[0]
    # The core sums float64 products of mean-shifted blocks: each scatter entry within
    # γ_600 ≈ 1.3e-13 of sqrt(S_ii S_jj) for any summation order, ≤ d·γ ≈ 3.2e-12 in norm (d=24),
    # which the solve amplifies by ≤ 2·cond(S_AA) (< 20): ≤ 7e-11; the bias adds |μ_A|·ΔW
    # (|μ| ≈ 3): 1e-9 of the largest entry is a worst-case bound (measured ~3e-14).
    assert st["condition"] < 10
    np.testing.assert_allclose(w, ref[:-1].T, rtol=0, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_allclose(bias, ref[-1], rtol=0, atol=1e-9 * np.abs(ref).max())
    resid = ((b - a @ ref[:-1] - ref[-1]) ** 2).sum() / len(a)
    assert st["residual"] == pytest.approx(resid, rel=1e-3)


def test_ols_rank_deficient_is_min_norm_and_finite():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(12, 30)).astype(np.float32) + 1.0  # 12 images, 30 dims
    a[:, [3, 7, 11]] = 0.0  # dead features (e.g. ReLU units that never fire)
    b = rng.normal(size=(12, 9)).astype(np.float32)
    acc, (sa, sb) = _acc(a, b)
    w, bias, st = solvers.ols(acc, sa, sb)
    assert np.isfinite(w).all()
    assert np.isfinite(bias).all()
    assert st["rank"] == 11
    assert st["rank_deficient"]
    assert st["underdetermined"]
    assert st["dead_features"] == 3
    ac = a.astype(np.float64) - a.mean(0)
    bc = b.astype(np.float64) - b.mean(0)
    # the eigen cut-off (max(d·eps64·λmax, 4·|most negative λ|): null-space noise ~eps64·λmax)
    # sits far below the smallest kept singular value (~0.25·σmax, i.e. λ ≈ 0.06·λmax), and
    # lstsq's rcond=1e-3 far above the null space's noise: both select the same subspace
    ref = np.linalg.lstsq(ac, bc, rcond=1e-3)[0].T
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # min-norm: dead inputs get no weight (up to eigenvector rounding, ~1e-16)
    np.testing.assert_allclose(w[:, [3, 7, 11]], 0.0, atol=1e-12)
    # underdetermined: the training residual is (numerically) zero
    assert st["residual"] < 1e-6 * (bc ** 2).sum() / 12


def test_holdout_r2_from_gram_equals_direct():
    rng = np.random.default_rng(2)
    a, b = _pair(rng, 400, 10, 8, noise=0.5)
    tr, (sa, sb) = _acc(a[:300], b[:300])
    ho, _ = _acc(a[300:], b[300:])
    w, bias, st = solvers.ols(tr, sa, sb, holdout=ho)
    pred = a[300:].astype(np.float64) @ w.T + bias
    y = b[300:].astype(np.float64)
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert st["r2_holdout"] == pytest.approx(r2, rel=1e-6)
    assert st["holdout_images"] == 100
    assert 0.5 < st["r2_holdout"] < 1


def test_ridge_path_matches_brute_force():
    rng = np.random.default_rng(3)
    n, da, db = 80, 40, 6  # few images, many collinear dims: ridge should help
    a = (rng.normal(size=(n, 5)) @ rng.normal(size=(5, da)) + 0.05 * rng.normal(size=(n, da)))
    b = a[:, :5] @ rng.normal(size=(5, db)) + 0.3 * rng.normal(size=(n, db))
    a, b = a.astype(np.float32), b.astype(np.float32)
    tr, (sa, sb) = _acc(a[:60], b[:60])
    ho, _ = _acc(a[60:], b[60:])
    w, bias, st = solvers.ridge(tr, sa, sb, ho)
    at, bt = a[:60].astype(np.float64), b[:60].astype(np.float64)
    mu_a, mu_b = at.mean(0), bt.mean(0)
    saa = (at - mu_a).T @ (at - mu_a)
    sba = (bt - mu_b).T @ (at - mu_a)
    ah, bh = a[60:].astype(np.float64), b[60:].astype(np.float64)
    brute = []
    for lmb in st["lambda_path"][1:]:
        wl = np.linalg.solve(saa + lmb * np.eye(da), sba.T).T
        brute.append(((bh - (ah - mu_a) @ wl.T - mu_b) ** 2).sum() / len(ah))
    # every eigenvalue is kept (rank 40: 60 rows, noise 0.05), so the path is plain ridge. Float64
    # Gram (entries within γ_60·sqrt(S_ii S_jj)) and eigh (d·eps64·‖S‖) perturb W_λ by
    # ≤ cond(S_AA + λI)·d·eps64 (cond ≤ 7e5, d = 40: ≤ 6e-9) relative; the residual is quadratic
    # in W: 2e-8 relative bounds it (measured 3e-12; the float32 Gram was ~1e-4)
    assert st["rank"] == 40
    np.testing.assert_allclose(st["holdout_residual_path"][1:], brute, rtol=2e-8)
    assert st["lambda_index"] == int(np.argmin(st["holdout_residual_path"]))
    assert st["lambda"] > 0  # with this collinearity, shrinkage wins over λ = 0
    assert st["r2_holdout"] > solvers.ols(tr, sa, sb, ho)[2]["r2_holdout"]
    with pytest.raises(AffeqError, match="held-out"):
        solvers.ridge(tr, sa, sb, None)


def test_logit_pinv_lossless_when_head_has_full_row_rank():
    rng = np.random.default_rng(4)
    wa, ba = rng.normal(size=(10, 6)), rng.normal(size=10)
    wb, bb = rng.normal(size=(10, 12)), rng.normal(size=10)  # K=10 ≤ d_B=12
    w, b, st = solvers.logit_pinv(Head(wa, ba), Head(wb, bb))
    x = rng.normal(size=(5, 6))
    np.testing.assert_allclose((x @ w.T + b) @ wb.T + bb, x @ wa.T + ba, atol=1e-10)
    assert st["logits_exact"]
    assert w.shape == (12, 6)
    # heads over different label sets are refused, not silently truncated
    with pytest.raises(AffeqError, match="different numbers of classes"):
        solvers.logit_pinv(Head(wa, ba),
                           Head(np.vstack([wb, wb[:1]]), np.concatenate([bb, bb[:1]])))
    _, _, st2 = solvers.logit_pinv(Head(wa, ba), Head(rng.normal(size=(10, 4)), bb))  # d_B=4 < K
    assert not st2["logits_exact"]


def test_naive_truncates_and_pads():
    w, b, st = solvers.naive(5, 3)
    np.testing.assert_array_equal(np.arange(5.0) @ w.T + b, [0, 1, 2])
    w, b, st = solvers.naive(2, 4)
    np.testing.assert_array_equal(np.array([7.0, 8.0]) @ w.T + b, [7, 8, 0, 0])
    assert st["padded"]


def test_adam_reduces_the_unit_normalised_loss():
    rng = np.random.default_rng(5)
    a, b = _pair(rng, 3000, 12, 8, noise=0.05)
    w, bias, st = solvers.adam(a, b, solvers.AdamSchedule(300, 0.01, batch_size=512))
    assert np.isfinite(w).all()
    assert st["loss_last"] < 0.3 * st["loss_first"]
    # the fitted direction beats the best constant (the mean) on fresh rows
    a2, b2 = a[:500], b[:500]
    assert solvers.unit_loss(w, bias, a2, b2) < solvers.unit_loss(
        np.zeros_like(w), b.mean(0).astype(np.float64), a2, b2)
    _, _, st01 = solvers.adam(a, b, solvers.AdamSchedule(20))  # the paper's lr 0.1: no NaN
    assert np.isfinite(st01["loss_last"])


def test_adam_reports_steps_through_progress_and_prints_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from recording import RecordingProgress

    rng = np.random.default_rng(5)
    a, b = _pair(rng, 200, 6, 4, noise=0.05)
    rec = RecordingProgress()
    solvers.adam(a, b, solvers.AdamSchedule(7, batch_size=64), progress=rec)
    assert rec.calls == [("start", "adam", 7, 0, "step"), *[("advance", 1)] * 7, ("done",)]
    assert capsys.readouterr().out == ""


def test_all_dead_source_and_constant_target_stay_finite():
    rng = np.random.default_rng(6)
    a = np.zeros((20, 4), np.float32)  # every feature dead
    b = rng.normal(size=(20, 3)).astype(np.float32)
    b[:, 1] = 2.5  # one constant target feature
    acc, (sa, sb) = _acc(a, b)
    w, bias, st = solvers.ols(acc, sa, sb)
    np.testing.assert_array_equal(w, 0.0)
    np.testing.assert_allclose(bias, b.mean(0), rtol=1e-6)  # the best constant: the mean
    assert st["rank"] == 0
    assert st["dead_features"] == 4
    assert st["condition"] is None
    acc2, (s2a, s2b) = _acc(np.full((5, 2), 1.0, np.float32), np.full((5, 2), 3.0, np.float32))
    assert solvers.ols(acc2, s2a, s2b)[2]["r2_train"] is None  # constant target: undefined R²


def test_ridge_path_matches_direct_solves_at_every_lambda_when_rows_are_fewer_than_dims():
    """Fewer training rows (20) than dimensions (40): S_AA has 19 non-null directions and 21 null
    ones, which the compiled Gram fills with rounding noise (~γ_n·λ_max ≈ 1e-14 of it, either
    sign). Every λ of the path must use the eigen cut-off, so that noise is never divided by a
    small λ: then each W_λ equals the direct solve (S + λI)⁻¹ S_AB on the exact float64 rows, whose
    null space is exact (S_AB has no component there). Without the cut-off at λ > 0, the smallest
    λ (1e-8 × the mean eigenvalue, ~2e-9·λ_max) divides noise of ~1e-14·λ_max: errors ~1e-5."""
    rng = np.random.default_rng(11)
    n, n_tr, da, db = 28, 20, 40, 5
    a = (rng.normal(size=(n, da)) * np.linspace(3, 0.5, da) + 2.0).astype(np.float32)
    b = (a @ rng.normal(size=(da, db)) * 0.2 + rng.normal(size=(n, db))).astype(np.float32)
    tr, (sa, sb) = _acc(a[:n_tr], b[:n_tr])
    ho, _ = _acc(a[n_tr:], b[n_tr:])
    w, bias, st = solvers.ridge(tr, sa, sb, ho)
    assert st["rank"] == n_tr - 1
    assert st["underdetermined"]
    at, bt = a[:n_tr].astype(np.float64), b[:n_tr].astype(np.float64)
    mu_a, mu_b = at.mean(0), bt.mean(0)
    ac, bc = at - mu_a, bt - mu_b
    ah, bh = a[n_tr:].astype(np.float64), b[n_tr:].astype(np.float64)
    eig = solvers.source_eig(tr, sa)
    for k, lmb in enumerate(st["lambda_path"]):
        # The direct solve, as the augmented least-squares problem [X; √λ I] W = [Y; 0] (the
        # normal equations (S + λI)⁻¹ S_AB would square its condition, up to 5e8 at the smallest
        # λ). λ = 0: the minimum-norm solution (rcond 1e-8 ≫ the null space's ~1e-16·σ_max and
        # ≪ the 19 real singular values ≥ 0.05·σ_max).
        aug = np.vstack([ac, np.sqrt(lmb) * np.eye(da)]) if lmb > 0 else ac
        rhs = np.vstack([bc, np.zeros((da, db))]) if lmb > 0 else bc
        ref = np.linalg.lstsq(aug, rhs, rcond=1e-8 if lmb == 0 else None)[0].T
        d = np.where(eig.keep, 1.0 / (np.where(eig.keep, eig.lam, 1.0) + lmb), 0.0)
        got = ((tr.scatter(sb, sa) @ eig.vecs) * d) @ eig.vecs.T
        # Gram entries within γ_20·sqrt(S_ii S_jj) (~5e-15 relative), amplified by the kept
        # spectrum's condition (λ_max/λ_19 ≤ 400 here, smaller with λ > 0) and by eigh's
        # d·eps64: ≤ ~1e-11 of the largest entry; 1e-9 leaves margin, 1e-5 (no cut-off) fails.
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.abs(ref).max(),
                                   err_msg=f"lambda index {k}")
        resid = ((bh - (ah - mu_a) @ ref.T - mu_b) ** 2).sum() / len(ah)
        # the path's residual is quadratic in W_λ: the same bound, doubled, relative
        assert st["holdout_residual_path"][k] == pytest.approx(resid, rel=1e-8, abs=1e-12)
    assert st["lambda_index"] == int(np.argmin(st["holdout_residual_path"]))


def test_prior_ridge_spectral_form_is_the_penalised_least_squares_solution():
    """M = M₀ + P_r diag(1/(Λ+λ)) Vᵀ minimises ‖X Mᵀ + 1bᵀ − Y‖² + λ‖M − M₀‖² (b free):
    Mᵀ = (S_AA + λI)⁻¹ (S_AB + λM₀ᵀ), b = μ_B − M μ_A, with more dims (30) than rows (12), where
    the residual S_AB − S_AA M₀ᵀ lies in S_AA's range so the thin SVD loses nothing; the PCA filter
    with every direction kept is the minimum-norm OLS of the residual."""
    rng = np.random.default_rng(12)
    n, da, db = 12, 30, 7
    xa = rng.normal(size=(n, da)) + 1.0
    xb = rng.normal(size=(n, db))
    m0 = rng.normal(size=(db, da))
    spec = solvers.row_spectrum(xa)
    assert spec.rank == n - 1
    ac, bc = xa - xa.mean(0), xb - xb.mean(0)
    saa, sab = ac.T @ ac, ac.T @ bc
    for lmb in (1e-3, 0.5, 40.0):
        w, b = solvers.spectral_map(spec, xb, m0, solvers.ridge_filter(spec.lam, lmb))
        ref = np.linalg.solve(saa + lmb * np.eye(da), sab + lmb * m0.T).T
        # float64 SVD vs LU solve: both backward stable, cond(S + λI) ≤ 1e6 at λ = 1e-3:
        # ≤ ~1e-9 relative; 1e-8 is the bound
        np.testing.assert_allclose(w, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
        np.testing.assert_allclose(b, xb.mean(0) - ref @ xa.mean(0), rtol=0,
                                   atol=1e-8 * np.abs(ref).max() * np.abs(xa).max() * da)
    w, _ = solvers.spectral_map(spec, xb, m0, solvers.pca_filter(spec.lam, spec.rank))
    resid = bc - ac @ m0.T
    ref = m0 + np.linalg.lstsq(ac, resid, rcond=1e-10)[0].T
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-8 * np.abs(ref).max())
    # the intercept shrunk toward the prior's (s = n/(n + λ)): the exact minimiser of
    # ‖(X − 1μ_Aᵀ)Mᵀ + 1cᵀ − Y‖² + λ‖M − M₀‖² + λ‖c − c₀‖², c₀ = M₀μ_A + b₀, solved directly
    # as one augmented least-squares problem over [M | c] (both backward stable: 1e-8 bound)
    b0 = rng.normal(size=db)
    lmb = 0.5
    w, b = solvers.spectral_map(spec, xb, m0, solvers.ridge_filter(spec.lam, lmb), b0,
                                n / (n + lmb))
    z = np.hstack([ac, np.ones((n, 1))])
    aug = np.vstack([z, np.sqrt(lmb) * np.eye(da + 1)])
    c0 = m0 @ xa.mean(0) + b0
    rhs = np.vstack([xb, np.sqrt(lmb) * np.hstack([m0, c0[:, None]]).T])
    sol = np.linalg.lstsq(aug, rhs, rcond=None)[0].T  # [db, da + 1]: M, then c
    np.testing.assert_allclose(w, sol[:, :da], rtol=0, atol=1e-8 * np.abs(sol).max())
    np.testing.assert_allclose(b, sol[:, da] - sol[:, :da] @ xa.mean(0), rtol=0,
                               atol=1e-8 * np.abs(sol).max() * np.abs(xa).max() * da)
    # no prior: plain ridge toward zero
    w0, _ = solvers.spectral_map(spec, xb, None, solvers.ridge_filter(spec.lam, 0.5))
    np.testing.assert_allclose(w0, np.linalg.solve(saa + 0.5 * np.eye(da), sab).T, rtol=0,
                               atol=1e-8 * np.abs(w0).max())
