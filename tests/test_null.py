"""Issue 22 item 3: the permutation null of the Gram similarity measures, accumulated in the same
pass, against an explicit permutation loop over the materialised rows (the same within-chunk
permutations applied to B's rows, then the measures of the permuted pair computed afresh).

Tolerance: both sides are float64; the null's cross blocks are raw products centred at the end
(Σ x_a x_bᵀ − n μ_a μ_bᵀ) where the direct path centres row by row, so they differ by cancellation:
≤ n·eps64·max|x|² ≈ 1e-12 relative for these unit-scale rows (n = 5,000), far below 1e-8."""

from __future__ import annotations

import numpy as np
import pytest

from affeq_rt.cluster.worker import run_locally
from affeq_rt.engine import run_pass
from affeq_rt.errors import AffeqError
from affeq_rt.method.null import NULL_MEASURES
from affeq_rt.method.reducers import PermutedCross, chunk_permutation
from affeq_rt.method.rows import CHUNK, ArraySource
from affeq_rt.method.similarity import SimilarityTable, similarity


def _feats(n: int = 5000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, 12)) + 1.0
    b = a[:, :8] @ rng.normal(size=(8, 10)) + 0.5 * rng.normal(size=(n, 10)) + 2.0
    return {"a": a.astype(np.float32), "b": b.astype(np.float32)}


def _permuted_b(b: np.ndarray, k: int) -> np.ndarray:
    """B's rows permuted within each chunk of the grid, as the reducer pairs them."""
    out = np.empty_like(b)
    for s in range(0, b.shape[0], CHUNK):
        rows = b[s:s + CHUNK]
        out[s:s + CHUNK] = rows[chunk_permutation(k, s, rows.shape[0])]
    return out


def test_null_equals_an_explicit_permutation_loop() -> None:
    feats = _feats()
    k_count = 5
    sim = similarity(feats, device="cpu", permutations=k_count)
    null = sim.null["measures"]
    assert sim.null["permutations"] == k_count
    draws = {m: [] for m in NULL_MEASURES}
    for k in range(k_count):
        direct = similarity({"a": feats["a"], "b": _permuted_b(feats["b"], k)}, device="cpu")
        for m in NULL_MEASURES:
            draws[m].append(getattr(direct, m)[0, 1])
    for m in NULL_MEASURES:
        z = np.array(draws[m])
        raw = getattr(sim, m)[0, 1]
        assert null[m]["mean"][0, 1] == pytest.approx(z.mean(), abs=1e-8), m
        assert null[m]["sd"][0, 1] == pytest.approx(z.std(ddof=1), abs=1e-8), m
        assert null[m]["calibrated"][0, 1] == pytest.approx(raw - z.mean(), abs=1e-8), m
        beyond = (z <= raw) if m == "procrustes" else (z >= raw)
        assert null[m]["p"][0, 1] == (1 + beyond.sum()) / (k_count + 1), m
    # related networks: every measure beyond all 5 permutations
    assert all(null[m]["p"][0, 1] == 1 / 6 for m in NULL_MEASURES)
    back = SimilarityTable.from_dict(sim.to_dict())
    np.testing.assert_array_equal(back.null["measures"]["cka"]["p"], null["cka"]["p"])


def test_permuted_cross_sharded_equals_one_pass() -> None:
    feats = _feats()
    src = ArraySource(feats)
    sl = {"a": slice(0, 12), "b": slice(12, 22)}
    one, sharded = PermutedCross(sl, 3), PermutedCross(sl, 3)
    run_pass(src, {"n": one})
    run_locally(src, {"n": sharded}, [(0, CHUNK), (CHUNK, 5000)])
    for key in one.sums:
        np.testing.assert_array_equal(one.sums[key], sharded.sums[key])
    with pytest.raises(AffeqError, match="--permutations must be ≥ 0"):
        similarity(feats, permutations=-1)


def test_cli_prints_the_null(tmp_path, capsys) -> None:
    from affeq_rt.cli.main import main
    from affeq_rt.data.readers import Sample
    from affeq_rt.io.store import StoreConfig, StoreWriter

    feats = _feats(600)
    cfg = StoreConfig(models=["a", "b"], dims={"a": 12, "b": 10},
                      specs={m: {"name": m, "label_offset": 0} for m in "ab"},
                      exports={m: "x" for m in "ab"},
                      data={"kind": "test", "n_samples": 600, "fingerprint": "f"},
                      dtype="float32", batch_size=600)
    w = StoreWriter(tmp_path / "s", cfg, {m: (np.ones((4, d), np.float32), np.zeros(4, np.float32))
                                         for m, d in (("a", 12), ("b", 10))})
    for m in "ab":
        w.write(m, 0, feats[m])
    w.commit(600, 600, [])
    w.finalise([Sample(f"/i/{i}.jpg", -1) for i in range(600)])
    assert main(["similarity", "-f", str(tmp_path / "s"), "--permutations", "3", "--quiet",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "permutation null (3 within-chunk row permutations" in out
    assert "cka        a ~ b: raw" in out
    assert "p 0.250" in out  # related networks: beyond all 3 permutations, p = 1/4
