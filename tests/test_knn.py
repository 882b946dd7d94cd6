"""Issue 22 item 5: mutual k-nearest-neighbour agreement (a local similarity measure) on a
documented subsample, against a brute-force loop, in ``similarity`` and ``fit --similarity``
alike (rows read from arrays or kept by the pass)."""

from __future__ import annotations

import numpy as np

from affeq_rt.method import knn
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.rows import ArraySource
from affeq_rt.method.similarity import SimilarityTable, similarity


def _brute(xa: np.ndarray, xb: np.ndarray, k: int) -> float:
    """The definition, one image at a time: k most cosine-similar others in A and in B."""
    def nearest(x: np.ndarray, i: int) -> set[int]:
        sims = []
        for j in range(x.shape[0]):
            if j != i:
                c = float(x[i] @ x[j]) / float(np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
                sims.append((-c, j))
        return {j for _, j in sorted(sims)[:k]}

    m = xa.shape[0]
    return sum(len(nearest(xa, i) & nearest(xb, i)) for i in range(m)) / (m * k)


def test_mutual_knn_matches_brute_force() -> None:
    """Exact equality: the score is a multiple of 1/(m·k) = 1/600, and the cosines of continuous
    random rows are never within the 1e-16 by which the matrix and the loop may differ."""
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(60, 12))
    xb = xa @ rng.normal(size=(12, 9)) + 0.8 * rng.normal(size=(60, 9))
    got = knn.mutual_knn(xa, xb, 10)
    assert got == _brute(xa, xb, 10)
    assert 0.2 < got < 1.0  # related, not the same neighbourhoods
    q = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    assert knn.mutual_knn(xa, 3.0 * xa @ q, 10) == 1.0  # rotation and scale keep cosines
    far = [knn.mutual_knn(xa, rng.normal(size=(60, 12)), 10) for _ in range(20)]
    # chance: k/(m − 1) = 0.169; the mean of 20 draws has sd ≈ 0.01
    assert abs(np.mean(far) - 10 / 59) < 0.05


def test_table_and_subsample() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 20))
    sl = {"a": slice(0, 8), "b": slice(8, 14), "c": slice(14, 20)}
    t = knn.mutual_knn_table(x, sl, 5)
    np.testing.assert_array_equal(t, t.T)
    np.testing.assert_array_equal(np.diag(t), 1.0)
    assert t[0, 2] == knn.mutual_knn(x[:, sl["a"]], x[:, sl["c"]], 5)
    assert knn.mutual_knn_table(x[:5], sl, 5) is None
    m = knn.sample_mask(5000)
    assert m.sum() == knn.ROWS
    np.testing.assert_array_equal(m, knn.sample_mask(5000))  # fixed seed: the same images
    assert knn.sample_mask(300).all()


class _Streamed(ArraySource):
    """Rows that are read, not addressable (as an image folder's)."""

    def arrays(self) -> None:
        return None


def test_similarity_and_fit_report_mutual_knn_on_the_subsample() -> None:
    """2,500 rows: the subsample is 2,000 of them; the command, a fit on arrays and a fit on
    streamed rows (kept by the pass) give the same figure, the brute-force one on those rows."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2500, 16))
    feats = {"a": a.astype(np.float32),
             "b": (a @ rng.normal(size=(16, 16)) + rng.normal(size=(2500, 16))).astype(np.float32)}
    table = similarity(feats)
    idx = np.flatnonzero(knn.sample_mask(2500))
    want = knn.mutual_knn(feats["a"][idx].astype(np.float64), feats["b"][idx].astype(np.float64))
    assert table.mutual_knn[0, 1] == want
    opt = FitOptions(similarity=True, curve="off", dedup=False)
    for src in (feats, _Streamed(feats)):
        sim = fit(src, method="ols", options=opt).similarity
        assert sim.mutual_knn[0, 1] == want
    back = SimilarityTable.from_dict(table.to_dict())
    np.testing.assert_array_equal(back.mutual_knn, table.mutual_knn)
    assert "mutual_knn" in table.measures()
