"""Tests of folded-head evaluation (CPU always, CUDA where present) vs the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from affeq_rt.core import HeadsResult, evaluate_heads, evaluate_reference
from affeq_rt.core.backends import cuda_status
from affeq_rt.errors import AffeqError

CUDA = cuda_status()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not CUDA.available, reason=f"CUDA backend unavailable: {CUDA.reason}"
)


def problem(n: int, d: int, T: int, K: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) + 0.5).astype(np.float32)
    W = (rng.standard_normal((T, K, d)) / np.sqrt(d)).astype(np.float32)
    b = rng.standard_normal((T, K)).astype(np.float32)
    labels = rng.integers(-1, K, n)
    return X, W, b, labels


def assert_matches(res: HeadsResult, ref: HeadsResult, X, W, b, tol_gap: float) -> None:
    """Equal to the float64 reference except rows whose top-6 logits lie within tol_gap."""
    X64, W64, b64 = (np.asarray(a, np.float64) for a in (X, W, b))
    ambiguous = np.zeros(res.pred.shape, bool)
    for t in range(W.shape[0]):
        lg = np.sort(X64 @ W64[t].T + b64[t], axis=1)[:, ::-1][:, :6]
        ambiguous[t] = (np.diff(lg, axis=1) > -tol_gap).any(axis=1) if lg.shape[1] > 1 else False
    assert ambiguous.mean() < 0.01  # the comparison still covers nearly every row
    np.testing.assert_array_equal(res.pred[~ambiguous], ref.pred[~ambiguous])
    bits, rbits = res.correct_bits(), ref.correct_bits()
    np.testing.assert_array_equal(bits[~ambiguous], rbits[~ambiguous])
    n_amb = ambiguous.sum(axis=1)
    assert (np.abs(res.top1 - ref.top1) <= n_amb).all()
    assert (
        np.abs(res.top5 - ref.top5) <= n_amb
    ).all()
    assert (
        res.top1.dtype == np.int64
    )
    assert (
        res.pred.dtype == np.int32
    )
    assert (
        res.correct.dtype == np.uint8
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("tile", [0, 8, 40, 1000])
def test_random_matches_reference(dtype: type, tile: int) -> None:
    X, W, b, labels = problem(1003, 96, 4, 130)
    X = X.astype(dtype)
    res = evaluate_heads(X, W, b, labels, device="cpu", tile_rows=tile)
    ref = evaluate_reference(X, W, b, labels)
    assert res.device == "cpu"
    assert res.n == 1003
    assert res.correct.shape == (4, 126)
    assert res.labeled == ref.labeled == int((labels >= 0).sum())
    # float32 products over d=96 terms of O(1): error ~1e-6; gaps below 1e-4 are undecidable.
    assert_matches(res, ref, X, W, b, tol_gap=1e-4)
    assert (res.top5 >= res.top1).all()
    np.testing.assert_allclose(res.top1_acc, res.top1 / res.labeled)


def test_exact_ties_go_to_lowest_class() -> None:
    # Small integers: every logit is exact in float32, so ties are real ties on both sides.
    rng = np.random.default_rng(1)
    n, d, K = 257, 16, 12
    X = rng.integers(-2, 3, (n, d)).astype(np.float32)
    W = rng.integers(-1, 2, (2, K, d)).astype(np.float32)
    W[:, 7] = W[:, 2]  # class 7 duplicates class 2, class 9 duplicates class 4, ...
    W[:, 9] = W[:, 4]
    W[:, 11] = W[:, 0]
    b = np.zeros((2, K), np.float32)
    labels = np.where(rng.random(n) < 0.5, 7, 2)
    res = evaluate_heads(X, W, b, labels, device="cpu")
    ref = evaluate_reference(X, W, b, labels)
    np.testing.assert_array_equal(res.pred, ref.pred)
    np.testing.assert_array_equal(res.correct, ref.correct)
    np.testing.assert_array_equal(res.top1, ref.top1)
    np.testing.assert_array_equal(res.top5, ref.top5)
    assert not np.isin(res.pred, [7, 9, 11]).any()  # duplicates never win over the lower index
    Xz = np.zeros((9, d), np.float32)  # all logits equal: class 0 everywhere
    r0 = evaluate_heads(Xz, W, b, np.arange(9) % K, device="cpu")
    assert (r0.pred == 0).all()
    assert list(r0.top1) == [1, 1]
    assert list(r0.top5) == [5, 5]


def test_near_ties_resolved_like_float64() -> None:
    # Gaps of 1e-3 between the leading classes, far above float32 rounding of these O(10) logits.
    rng = np.random.default_rng(2)
    n, d, K = 400, 8, 20
    X = rng.integers(0, 4, (n, d)).astype(np.float32)
    W = np.zeros((1, K, d), np.float32)
    W[0, :6] = 1.0
    b = np.zeros((1, K), np.float32)
    b[0, :6] = np.array([0.0, 2e-3, 1e-3, 3e-3, 2.5e-3, 4e-3], np.float32)[rng.permutation(6)]
    labels = rng.integers(0, K, n)
    res = evaluate_heads(X, W, b, labels, device="cpu")
    ref = evaluate_reference(X, W, b, labels)
    np.testing.assert_array_equal(res.pred, ref.pred)
    np.testing.assert_array_equal(res.top5, ref.top5)
    assert len(np.unique(res.pred)) == 1
    assert res.pred[0, 0] == int(np.argmax(b[0]))


@pytest.mark.parametrize("K", [1, 3, 5])
def test_fewer_than_five_classes(K: int) -> None:
    X, W, b, labels = problem(77, 10, 2, K, seed=3)
    res = evaluate_heads(X, W, b, labels, device="cpu")
    ref = evaluate_reference(X, W, b, labels)
    np.testing.assert_array_equal(res.pred, ref.pred)
    np.testing.assert_array_equal(res.top5, ref.top5)
    assert (res.top5 == res.labeled).all()  # with K <= 5 every known label is in the top 5


def test_unknown_labels_never_hit() -> None:
    X, W, b, _ = problem(64, 10, 2, 7, seed=4)
    res = evaluate_heads(X, W, b, np.full(64, -1), device="cpu")
    assert (
        res.labeled == 0
    )
    assert (
        (res.top1 == 0).all()
    )
    assert (
        (res.top5 == 0).all()
    )
    assert (
        not res.correct.any()
    )
    assert np.isnan(res.top1_acc).all()


def test_bad_inputs_are_clear() -> None:
    X, W, b, labels = problem(32, 6, 2, 9, seed=5)
    with pytest.raises(AffeqError, match="dtype"):
        evaluate_heads(X.astype(np.float64), W, b, labels, device="cpu")
    with pytest.raises(AffeqError, match="contiguous"):
        evaluate_heads(np.asfortranarray(X), W, b, labels, device="cpu")
    with pytest.raises(AffeqError, match="heads have shape"):
        evaluate_heads(X, W[:, :, :5], b, labels, device="cpu")
    with pytest.raises(AffeqError, match="biases"):
        evaluate_heads(X, W, b[:, :4], labels, device="cpu")
    with pytest.raises(AffeqError, match="labels have shape"):
        evaluate_heads(X, W, b, labels[:5], device="cpu")
    with pytest.raises(AffeqError, match="outside"):
        evaluate_heads(X, W, b, np.full(32, 9), device="cpu")
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(AffeqError, match="NaN"):
        evaluate_heads(Xn, W, b, labels, device="cpu")
    with pytest.raises(AffeqError, match="NaN"):
        evaluate_heads(Xn.astype(np.float16), W, b, labels, device="cpu")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_matches_reference(dtype: type) -> None:
    import cupy as cp

    X, W, b, labels = problem(5003, 256, 9, 1000, seed=6)
    X = X.astype(dtype)
    res = evaluate_heads(cp.asarray(X), W, b, labels, device="cuda", tile_rows=2048)
    assert res.device == "cuda"
    ref = evaluate_reference(X, W, b, labels)
    assert_matches(res, ref, X, W, b, tol_gap=1e-4)  # float32 products as on the CPU
    cpu = evaluate_heads(X, W, b, labels, device="cpu")
    assert (res.pred != cpu.pred).mean() < 1e-3
