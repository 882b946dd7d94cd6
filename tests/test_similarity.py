"""similarity: CKA, debiased CKA, CCA, SVCCA, R² and Procrustes from the joint Gram state, checked
against straightforward n×n / per-row implementations and against known identities.

Tolerances. The features are float32 (what stores hold); references are computed in float64 from
the same float32 values, so both sides see identical inputs. The Gram state is float64 with each
scatter entry off by ≤ γ_m·sqrt(S_ii S_jj) (γ_m = m·eps64 ≈ 1e-13 for the ≤ 512-row blocks here,
any summation order, any BLAS); the references' own sums carry the same kind of error. CKA is a
ratio of sums of squares of those entries: relative error ≤ a few γ_m. CCA, SVCCA and R² go through
S_aa^{-1/2}: errors are amplified by cond(S_aa) ≤ 1e2 for these well-conditioned random features
(checked below), so ≤ ~1e-10. Debiased CKA subtracts terms of size ~n·Σ‖x̃‖⁴ whose result is of the
same order for correlated features (shown below: each HSIC is ≥ 1e-2 of its largest term), so its
relative error is ≤ 1e2·γ. 1e-8 (the issue's bound) therefore holds with ≥ 100× margin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from affeq_rt.cli.main import main
from affeq_rt.data.readers import Sample
from affeq_rt.errors import AffeqError
from affeq_rt.io.maps import AffineMap, MapSet
from affeq_rt.io.store import ArrayStore, StoreConfig, StoreWriter
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.rows import ArraySource
from affeq_rt.method.similarity import (
    RowNorms,
    accumulate_joint,
    load_similarity,
    loss_correlations,
    similarity,
    similarity_from_moments,
)

TOL = 1e-8
DIMS = {"a": 7, "b": 5, "c": 9}


def _features(n: int = 300, seed: int = 0, offset: float = 3.0) -> dict[str, np.ndarray]:
    """Three 'networks' seeing a shared latent, with noise and a mean offset (as CNN features)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    return {m: (z @ rng.normal(size=(4, d)) + 0.5 * rng.normal(size=(n, d))
                + offset * rng.normal(size=d)).astype(np.float32) for m, d in DIMS.items()}


# ---- straightforward references (n×n kernels, QR, lstsq, SciPy's Procrustes)


def _c(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.mean(0)


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l_ = x.astype(np.float64) @ x.T.astype(np.float64), y.astype(np.float64) @ y.T.astype(
        np.float64)

    def hsic(p: np.ndarray, q: np.ndarray) -> float:
        return float(np.trace(p @ h @ q @ h))

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def ref_hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (2012) eq. 5, on kernels with zeroed diagonals."""
    n = len(k)
    k, l_ = k.copy(), l_.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    one = np.ones(n)
    return float(np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * one @ k @ l_ @ one) / (n * (n - 3))


def ref_cka_debiased(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)  # raw, uncentred kernels
    k, l_ = x @ x.T, y @ y.T
    return ref_hsic_unbiased(k, l_) / np.sqrt(ref_hsic_unbiased(k, k) * ref_hsic_unbiased(l_, l_))


def ref_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Björck–Golub: singular values of Q_xᵀ Q_y for thin QR factors of the centred data."""
    qx, qy = np.linalg.qr(_c(x))[0], np.linalg.qr(_c(y))[0]
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def ref_svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    def pca(v: np.ndarray) -> np.ndarray:
        u, s, _ = np.linalg.svd(_c(v), full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.searchsorted(frac, keep * (1 - 1e-12)) + 1)
        return u[:, :k] * s[:k]

    return float(ref_cca(pca(x), pca(y)).mean())


def ref_r2(x: np.ndarray, y: np.ndarray) -> float:
    z = np.hstack([np.asarray(x, np.float64), np.ones((len(x), 1))])
    y = np.asarray(y, np.float64)
    res = y - z @ np.linalg.lstsq(z, y, rcond=None)[0]
    return 1.0 - float((res**2).sum()) / float((_c(y) ** 2).sum())


def ref_procrustes(x: np.ndarray, y: np.ndarray) -> float:
    """min over orthogonal R of ‖X R − Y‖_F² for centred, unit-Frobenius X, Y (zero-padded to one
    width), by SciPy's orthogonal_procrustes."""
    x, y = _c(x), _c(y)
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    d = max(x.shape[1], y.shape[1])
    xp = np.pad(x, ((0, 0), (0, d - x.shape[1])))
    yp = np.pad(y, ((0, 0), (0, d - y.shape[1])))
    r, _ = scipy.linalg.orthogonal_procrustes(xp, yp)
    return float(np.linalg.norm(xp @ r - yp) ** 2)


# ---- tests


@pytest.fixture(scope="module")
def feats() -> dict[str, np.ndarray]:
    return _features()


@pytest.fixture(scope="module")
def sim(feats: dict[str, np.ndarray]):
    return similarity(feats, device="cpu")


def test_conditioning_assumed_by_the_tolerances(feats: dict[str, np.ndarray]) -> None:
    for x in feats.values():
        s = np.linalg.eigvalsh(_c(x).T @ _c(x))
        assert s[-1] / s[0] < 1e2


def test_every_measure_matches_its_reference(feats, sim) -> None:
    names = list(DIMS)
    assert sim.models == names
    assert sim.n == 300
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            x, y = feats[a], feats[b]
            assert sim.r2[i, j] == pytest.approx(ref_r2(x, y), abs=TOL)
            assert sim.cka[i, j] == pytest.approx(ref_cka(x, y), abs=TOL)
            assert sim.cka_debiased[i, j] == pytest.approx(ref_cka_debiased(x, y), abs=TOL)
            assert sim.procrustes[i, j] == pytest.approx(ref_procrustes(x, y), abs=TOL)
            assert sim.svcca[i, j] == pytest.approx(ref_svcca(x, y), abs=TOL)
            if i <= j:
                rho = ref_cca(x, y)
                np.testing.assert_allclose(sim.cca[f"{a}->{b}"], rho, rtol=0, atol=TOL)
                assert sim.cca_mean[i, j] == pytest.approx(rho.mean(), abs=TOL)
    # the measures are not trivially equal to each other: the test would see a mix-up
    assert abs(sim.cka[0, 1] - sim.cka_debiased[0, 1]) > 1e-3
    assert sim.r2[0, 1] != pytest.approx(sim.r2[1, 0], abs=1e-3)
    assert not sim.warnings


class _Float64Moments:
    """Exact float64 moments of an in-memory matrix (the Moments protocol), so the identities
    are tested without the float32 rounding that stores apply to their inputs."""

    def __init__(self, x: np.ndarray) -> None:
        self.n = len(x)
        self._mu = x.mean(0)
        self._s = (x - self._mu).T @ (x - self._mu)

    def mean(self) -> np.ndarray:
        return self._mu

    def scatter(self, rows: slice, cols: slice) -> np.ndarray:
        return self._s[rows, cols]


def test_identities() -> None:
    """CKA(X, XQ) = 1 and Procrustes 0 for orthogonal Q; CCA of X with an invertible affine map
    of X: all ones, R² = 1 both ways. In float64 the identities hold to rounding amplified by
    cond(A) ≤ 1e2 (A = the affine map's matrix, checked): ≤ 1e2·d·eps64 ≈ 1e-13; tested at 1e-10."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 5.0
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    a = rng.normal(size=(6, 6)) + 4 * np.eye(6)
    assert np.linalg.cond(a) < 1e2
    joint = np.hstack([x, x @ q, x @ a + 2.0])
    sl = {"x": slice(0, 6), "xq": slice(6, 12), "xa": slice(12, 18)}
    norms = RowNorms(sl, 18)
    norms.update(joint)
    s = similarity_from_moments(_Float64Moments(joint), sl, norms)
    assert s.cka[0, 1] == pytest.approx(1.0, abs=1e-10)
    assert s.cka_debiased[0, 1] == pytest.approx(1.0, abs=1e-10)
    assert s.procrustes[0, 1] == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(s.cca["x->xa"], np.ones(6), atol=1e-10)
    assert s.cca_mean[0, 2] == pytest.approx(1.0, abs=1e-10)
    assert s.r2[0, 2] == pytest.approx(1.0, abs=1e-10)
    assert s.r2[2, 0] == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(np.diag(s.cka), 1.0, atol=1e-12)
    # and not everything is 1: an affine (non-orthogonal) map changes CKA and Procrustes
    assert s.cka[0, 2] < 0.999
    assert s.procrustes[0, 2] > 1e-3


def test_row_norms_are_chunking_and_offset_independent() -> None:
    """The fourth-moment sums give the same centred products for any chunking and mean offset."""
    f = _features(257, seed=5, offset=1e3)
    rows = ArraySource(f)
    acc, norms = accumulate_joint(rows, device="cpu")
    c4 = norms.centred_products(acc)
    xc = np.hstack([_c(f[m]) for m in DIMS])
    sl = list(norms.slices.values())
    r = np.stack([(xc[:, s] ** 2).sum(1) for s in sl], 1)
    want = r.T @ r
    # offset 1e3 with σ ~ 3: the shift reference (first chunk's mean, here all rows) keeps it exact
    np.testing.assert_allclose(c4, want, rtol=1e-10)
    other = RowNorms(norms.slices, norms.dim)
    x = np.hstack([f[m] for m in DIMS])
    for i in range(0, len(x), 50):
        other.update(x[i:i + 50])
    np.testing.assert_allclose(other.centred_products(acc), want, rtol=1e-10)


def test_fit_gives_the_same_tables_from_its_gram_state(feats) -> None:
    """fit(…, similarity=True) over train + held-out Grams merged (Chan) = one pass over all rows:
    two float64 routes over the same rows, each ≤ a few γ off (see the module docstring)."""
    res = fit(feats, None, "ols", options=FitOptions(holdout=0.2, device="cpu", similarity=True))
    direct = similarity(feats, device="cpu")
    fs = res.similarity
    assert fs.n == direct.n == 300
    for key, mtx in direct.measures().items():
        np.testing.assert_allclose(fs.measures()[key], mtx, rtol=0, atol=TOL, err_msg=key)
    assert fit(feats, None, "ols", options=FitOptions(device="cpu")).similarity is None


def test_fewer_images_than_dimensions_warns() -> None:
    f = _features(12, seed=2)
    s = similarity(f, device="cpu")
    assert s.ranks["c"] <= 11
    assert any("canonical correlations are 1" in w for w in s.warnings)
    np.testing.assert_allclose(s.cca["a->c"][:1], [1.0], atol=1e-8)


def test_errors() -> None:
    with pytest.raises(AffeqError, match="two networks"):
        similarity({"a": np.zeros((5, 2), np.float32)}, device="cpu")


def test_loss_correlations_match_scipy() -> None:
    """Pearson and Spearman across the ordered pairs, as SciPy computes them from the same pairs."""
    import scipy.stats

    rng = np.random.default_rng(0)
    n, k = 600, 5
    labels = rng.integers(0, k, n)
    base = np.eye(k)[labels] * 3 + rng.normal(size=(n, k))
    feats, heads = {}, {}
    for m, noise in (("p", 0.1), ("q", 0.5), ("r", 2.0), ("s", 4.0)):
        f = np.hstack([base, rng.normal(size=(n, 3))]) + noise * rng.normal(size=(n, k + 3))
        feats[m] = f.astype(np.float32)
        w = np.linalg.lstsq(np.hstack([f, np.ones((n, 1))]), np.eye(k)[labels], rcond=None)[0]
        heads[m] = (w[:-1].T.astype(np.float32), w[-1].astype(np.float32))
    maps = []
    for a in feats:
        for b in feats:
            if a != b:
                z = np.hstack([feats[a], np.ones((n, 1), np.float32)])
                sol = np.linalg.lstsq(z, feats[b], rcond=None)[0]
                maps.append(AffineMap(a, b, sol[:-1].T, sol[-1], "ols"))
    table = evaluate(ArrayStore(feats, heads, labels), MapSet(maps), device="cpu")
    s = similarity(feats, device="cpu")
    cor = loss_correlations(s, table)
    assert cor["pairs"] == 12
    off = ~np.eye(4, dtype=bool)
    y = table.hybrid_loss_top1[off]
    for m in ("r2", "cka", "procrustes"):
        x = getattr(s, m)[off]
        # both sides are float64 sums of 12 values: agreement to ~1e-15, tested at 1e-12
        assert cor["measures"][m]["pearson"] == pytest.approx(
            scipy.stats.pearsonr(x, y)[0], abs=1e-12)
        assert cor["measures"][m]["spearman"] == pytest.approx(
            scipy.stats.spearmanr(x, y)[0], abs=1e-12)


def test_cli_prints_and_writes(tmp_path: Path, feats) -> None:
    store = tmp_path / "store"
    _write_store(store, feats)
    out = tmp_path / "sim"
    assert main(["similarity", "--features", str(store), "--out", str(out), "--device", "cpu"]) == 0
    doc = json.loads((out / "similarity.json").read_text())
    s = load_similarity(out / "similarity.json")
    names = list(DIMS)
    assert doc["models"] == names
    assert s.cka[0, 2] == pytest.approx(ref_cka(feats["a"], feats["c"]), abs=TOL)
    assert s.r2[2, 1] == pytest.approx(ref_r2(feats["c"], feats["b"]), abs=TOL)
    assert (out / "similarity.md").read_text().count("| **") >= 3 * len(MEAS := s.measures())
    assert len(MEAS) == 7  # six from the Gram, mutual k-NN from the rows (issue 22)
    assert (out / "similarity.csv").read_text().startswith("measure,")


def _write_store(path: Path, feats: dict[str, np.ndarray]) -> None:
    n = len(next(iter(feats.values())))
    cfg = StoreConfig(models=list(feats), dims={m: f.shape[1] for m, f in feats.items()},
                      specs={m: {"name": m, "label_offset": 0} for m in feats},
                      exports={m: "x" for m in feats},
                      data={"kind": "test", "n_samples": n, "fingerprint": "f"},
                      dtype="float32", batch_size=n)
    rng = np.random.default_rng(1)
    heads = {m: (rng.normal(size=(4, f.shape[1])).astype(np.float32), np.zeros(4, np.float32))
             for m, f in feats.items()}
    w = StoreWriter(path, cfg, heads)
    for m, f in feats.items():
        w.write(m, 0, f)
    w.commit(n, n, [])
    w.finalise([Sample(f"/i/{i}.jpg", i % 4) for i in range(n)])
