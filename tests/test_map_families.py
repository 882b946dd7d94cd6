"""Issue 22 item 4: map families from the same Gram as the affine map — orthogonal Procrustes with
scale and offset, and reduced-rank affine maps — against direct implementations on the
materialised rows (SciPy's ``orthogonal_procrustes``, an explicit reduced-rank regression), with
the affine − family gaps in the stats, the summary and the CLI.

Tolerances: the fit stores float32 maps (unit roundoff 6e-8 relative to each matrix's largest
entry); the Gram is float64, so its products differ from the direct float64 ones by ~n·eps64
(1e-13 relative), which the SVD/eigendecomposition amplifies by 1/(relative gap) — ≤ 1e3 for these
spectra (leading directions of a signal with unit-scale singular values against noise 0.1) — to
≤ 1e-10. ``atol = 1e-6 × max|W|`` covers both with a factor > 10; a wrong factor (a transposed Q,
a missing scale, the wrong eigenvectors) is off by O(max|W|).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from affeq_rt.cli.main import main
from affeq_rt.data.readers import Sample
from affeq_rt.errors import AffeqError
from affeq_rt.io.store import StoreConfig, StoreWriter
from affeq_rt.method.fit import FitOptions, fit, holdout_mask

scipy_linalg = pytest.importorskip("scipy.linalg")


def _training(x: np.ndarray, y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The fit's training rows (per-sample hold-out, seed 0), float64."""
    keep = ~holdout_mask(x.shape[0], fraction, 0)
    return np.asarray(x[keep], np.float64), np.asarray(y[keep], np.float64)


def _close(w: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def _rotated(rng: np.random.Generator, n: int, d: int) -> dict[str, np.ndarray]:
    """B = 1.7·R A + offset + noise, R orthogonal; A anisotropic."""
    a = rng.normal(size=(n, d)) * np.linspace(0.5, 3.0, d)
    r = np.linalg.qr(rng.normal(size=(d, d)))[0]
    b = 1.7 * a @ r.T + rng.normal(size=d) + 0.1 * rng.normal(size=(n, d))
    return {"a": a.astype(np.float32), "b": b.astype(np.float32)}


def test_orthogonal_matches_scipy_orthogonal_procrustes() -> None:
    rng = np.random.default_rng(0)
    feats = _rotated(rng, 800, 24)
    res = fit(feats, method="orthogonal", options=FitOptions(holdout=0.2, dedup=False))
    m = res.maps["a", "b"]
    x, y = _training(feats["a"], feats["b"], 0.2)
    xc, yc = x - x.mean(0), y - y.mean(0)
    r, sigma_sum = scipy_linalg.orthogonal_procrustes(xc, yc)  # xc @ r ≈ yc
    scale = sigma_sum / float((xc * xc).sum())  # least-squares scale given r
    w_ref = scale * r.T
    _close(m.weight, w_ref)
    _close(m.bias, y.mean(0) - w_ref @ x.mean(0))
    assert m.stats["scale"] == pytest.approx(scale, rel=1e-9)
    assert m.stats["scale"] == pytest.approx(1.7, rel=0.01)
    # the affine map fits the same training rows at least as well: the gap is ≥ 0 (float64 sums)
    ols = fit(feats, method="ols", options=FitOptions(holdout=0.2, dedup=False)).maps["a", "b"]
    assert m.stats["affine_r2_holdout"] == ols.stats["r2_holdout"]
    assert m.stats["affine_gap_r2_train"] >= -1e-12
    assert m.stats["affine_gap_r2_holdout"] == pytest.approx(
        ols.stats["r2_holdout"] - m.stats["r2_holdout"], abs=1e-15)


def test_orthogonal_between_different_widths_has_orthonormal_rows_or_columns() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(600, 40))
    b = a[:, :24] @ np.linalg.qr(rng.normal(size=(24, 24)))[0] + 0.1 * rng.normal(size=(600, 24))
    feats = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
    maps = fit(feats, method="orthogonal", options=FitOptions(holdout=0.2, dedup=False)).maps
    for key, eye in ((("a", "b"), "rows"), (("b", "a"), "cols")):
        m = maps[key]
        q = m.weight.astype(np.float64) / m.stats["scale"]
        gram = q @ q.T if eye == "rows" else q.T @ q
        np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=1e-6)  # float32 storage
    # and for the wider source, Q = U Vᵀ of the direct cross-covariance
    x, y = _training(feats["a"], feats["b"], 0.2)
    u, _, vt = np.linalg.svd((y - y.mean(0)).T @ (x - x.mean(0)), full_matrices=False)
    _close(maps["a", "b"].weight / maps["a", "b"].stats["scale"], u @ vt)


def _low_rank_data(rng: np.random.Generator, rank: int) -> dict[str, np.ndarray]:
    """B = M A + offset + noise with rank(M) = ``rank`` (singular values 1…3 against noise 0.1)."""
    a = rng.normal(size=(900, 30))
    left = np.linalg.qr(rng.normal(size=(20, rank)))[0]
    right = np.linalg.qr(rng.normal(size=(30, rank)))[0]
    m = left @ np.diag(np.linspace(1.0, 3.0, rank)) @ right.T
    b = a @ m.T + rng.normal(size=20) + 0.1 * rng.normal(size=(900, 20))
    return {"a": a.astype(np.float32), "b": b.astype(np.float32)}


def test_low_rank_matches_explicit_reduced_rank_regression() -> None:
    rng = np.random.default_rng(2)
    feats = _low_rank_data(rng, 3)
    m = fit(feats, ["a", "b"], method="low-rank",
            options=FitOptions(holdout=0.2, dedup=False, rank=3)).maps["a", "b"]
    x, y = _training(feats["a"], feats["b"], 0.2)
    xc, yc = x - x.mean(0), y - y.mean(0)
    w0 = np.linalg.lstsq(xc, yc, rcond=None)[0].T  # OLS on the materialised rows
    vr = np.linalg.svd(xc @ w0.T, full_matrices=False)[2][:3].T  # leading fitted directions
    w_ref = vr @ vr.T @ w0
    _close(m.weight, w_ref)
    _close(m.bias, y.mean(0) - w_ref @ x.mean(0))
    assert np.linalg.matrix_rank(m.weight.astype(np.float64), tol=1e-4) == 3
    assert m.stats["map_rank"] == 3
    assert m.stats["affine_gap_r2_train"] >= -1e-12


def test_low_rank_chooses_its_rank_on_the_held_out_images() -> None:
    """True rank 4: the held-out residual is smallest at rank 4 of the grid 1, 2, 4, 8, 16, 20;
    the affine − rank-4 gap on held-out images is about nothing (noise only)."""
    rng = np.random.default_rng(3)
    feats = _low_rank_data(rng, 4)
    res = fit(feats, ["a", "b"], method="low-rank", options=FitOptions(holdout=0.2, dedup=False))
    st = res.maps["a", "b"].stats
    assert list(st["rank_path"]) == ["1", "2", "4", "8", "16", "20"]
    assert st["map_rank"] == 4
    assert abs(st["affine_gap_r2_holdout"]) < 0.01
    assert "map rank 4; affine R²" in res.summary()
    with pytest.raises(AffeqError, match="none are held out"):
        fit(feats, ["a", "b"], method="low-rank", options=FitOptions(holdout=0.0))
    with pytest.raises(AffeqError, match="--rank must be between 1 and 20"):
        fit(feats, ["a", "b"], method="low-rank", options=FitOptions(rank=21, dedup=False))


def test_cli_fits_map_families_and_reports_the_gaps(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(4)
    feats = _rotated(rng, 300, 16)
    n, k = 300, 5
    cfg = StoreConfig(models=["a", "b"], dims={"a": 16, "b": 16},
                      specs={m: {"name": m, "label_offset": 0} for m in "ab"},
                      exports={m: "x" for m in "ab"},
                      data={"kind": "test", "n_samples": n, "fingerprint": "f"},
                      dtype="float32", batch_size=n)
    w = StoreWriter(tmp_path / "s", cfg, {m: (rng.normal(size=(k, 16)).astype(np.float32),
                                             np.zeros(k, np.float32)) for m in "ab"})
    for m in "ab":
        w.write(m, 0, feats[m])
    w.commit(n, n, [])
    w.finalise([Sample(f"/p/img{i}.jpg", -1) for i in range(n)])
    assert main(["fit", "-f", str(tmp_path / "s"), "-o", str(tmp_path / "o.safetensors"),
                 "--method", "orthogonal", "--no-dedup", "--no-curve", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "affine R²" in out
    assert "(affine − orthogonal" in out
    assert "near-duplicate detection off" in out
    assert main(["fit", "-f", str(tmp_path / "s"), "-o", str(tmp_path / "r.safetensors"),
                 "--method", "low-rank", "--rank", "2", "--no-curve", "--quiet"]) == 0
    assert "map rank 2" in capsys.readouterr().out
