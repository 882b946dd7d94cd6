"""Tests of the Gram accumulator (CPU always, CUDA where present) vs the float64 reference."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from affeq_rt.core import GramAccumulator, gram_reference
from affeq_rt.core.backends import cuda_status
from affeq_rt.core.kernels import CpuBackend
from affeq_rt.errors import AffeqError, InternalError

CUDA = cuda_status()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not CUDA.available, reason=f"CUDA backend unavailable: {CUDA.reason}"
)


def adversarial(rows: int, d: int, seed: int = 0, offset: float = 1e4) -> np.ndarray:
    """Large common offset, column scales 1e-3..1e3, heavy tails: float32 X.T @ X loses it all."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-3, 3, d)
    z = rng.standard_t(df=3, size=(rows, d))
    return (offset + scales * z + rng.uniform(-1, 1, d) * offset * 0.1).astype(np.float32)


def corr_err(S: np.ndarray, ref: np.ndarray) -> float:
    """Max |ΔS_ij| / sqrt(S_ii S_jj): scale-free, so mixed column scales weigh equally.

    Constant columns (zero variance, e.g. tiny scales lost to float16) must come out exactly 0."""
    dg = np.sqrt(np.diag(ref))
    ok = dg > 0
    assert not S[~ok].any()
    assert not S[:, ~ok].any()
    return float((np.abs(S - ref)[np.ix_(ok, ok)] / np.outer(dg[ok], dg[ok])).max())


def feed(acc: GramAccumulator, X: np.ndarray, sizes: list[int]) -> None:
    i, k = 0, 0
    while i < len(X):
        s = sizes[k % len(sizes)]
        acc.update(X[i : i + s])
        i, k = i + s, k + 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_random_matches_reference(dtype: type) -> None:
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((3000, 40)) * 3 + 5).astype(dtype)
    acc = GramAccumulator(40, device="cpu", block_rows=256)  # small blocks: many flushes and merges
    feed(acc, X, [1, 0, 7, 300, 64, 1000])
    ref = gram_reference(X)
    assert acc.n == 3000
    assert acc.skipped == 0
    assert acc.device == "cpu"
    # float64 products over <=256 rows: |ΔS_ij| ≤ γ_256·Σ|y_i||y_j| ≤ 256·eps64·sqrt(S_ii S_jj)
    # (Cauchy-Schwarz, any summation order) ≈ 5.7e-14, plus ~12 merges of eps64 each: 1e-12 is a
    # worst-case bound (float32 products, the old numerics, give ~1e-6).
    assert corr_err(acc.scatter(), ref.scatter) < 1e-12
    np.testing.assert_allclose(acc.mean(), ref.mean, rtol=1e-9, atol=1e-9)
    G = acc.gram()
    assert G.shape == (41, 41)
    assert G[40, 40] == 3000
    np.testing.assert_allclose(G, ref.gram(), rtol=1e-6, atol=1e-6 * np.abs(ref.gram()).max())
    np.testing.assert_array_equal(G, G.T)


def test_adversarial_accuracy_beats_float32_gram() -> None:
    X = adversarial(20000, 24)
    ref = gram_reference(X)
    acc = GramAccumulator(24, device="cpu")
    feed(acc, X, [4096, 33, 5000])
    err = corr_err(acc.scatter(), ref.scatter)
    # The naive float32 route (X.T@X, then subtract n μμᵀ) is what the shift exists to avoid.
    X1 = np.hstack([X, np.ones((len(X), 1), np.float32)])
    G32 = (X1.T @ X1).astype(np.float64)
    mu = G32[:24, 24] / len(X)
    naive = G32[:24, :24] - len(X) * np.outer(mu, mu)
    assert corr_err(naive, ref.scatter) > 1e-2  # the data really is adversarial
    # Shifted float64 blocks of <=4096 rows: worst case γ_4096 ≈ 4096·eps64 ≈ 9.1e-13 of
    # sqrt(S_ii S_jj) for any summation order, + a few merges; the block's residual mean (shift =
    # running mean) adds m·ȳ² ≪ S to the sums. 2e-12 is a worst-case bound (float32: ~2e-6).
    assert err < 2e-12
    rel_mean = np.abs(acc.mean() - ref.mean) / np.sqrt(np.diag(ref.scatter) / ref.n)
    assert rel_mean.max() < 1e-6  # mean error in units of each column's standard deviation


def test_nan_inf_rows_are_skipped_and_counted() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((500, 8)).astype(np.float32)
    X[3, 1], X[10, 0], X[499, 7] = np.nan, np.inf, -np.inf
    acc = GramAccumulator(8, device="cpu")
    assert acc.update(X[:250]) == 2
    assert acc.update(X[250:]) == 1
    ref = gram_reference(X)
    assert (acc.n, acc.skipped) == (497, 3) == (ref.n, ref.skipped)
    assert corr_err(acc.scatter(), ref.scatter) < 1e-12  # 500 rows: ≤ 500·eps64 ≈ 1.1e-13
    H = X.astype(np.float16)
    acc16 = GramAccumulator(8, device="cpu")
    assert acc16.update(H) == 3
    assert acc16.n == 497


def test_merge_equals_single_pass_and_joint_blocks() -> None:
    X = adversarial(6000, 30, seed=3)
    ref = gram_reference(X)
    parts = [GramAccumulator(30, device="cpu", block_rows=512) for _ in range(3)]
    for p, sl in zip(parts, np.array_split(np.arange(6000), 3), strict=True):
        p.update(np.ascontiguousarray(X[sl]))
    before = parts[0].scatter().copy()
    total = parts[0] + parts[1]
    np.testing.assert_array_equal(parts[0].scatter(), before)  # `+` leaves operands alone
    total.merge(parts[2])
    assert total.n == 6000
    # Within a part: ≤ 512·eps64 (blocks of 512 rows). Merging parts uses δ = μ_b − μ_a, and each
    # part's float64 mean is off by ≤ K·eps64·|μ| (K ≤ 4 block updates): per merge the cross term
    # adds ≤ 2K·eps64·κ of sqrt(S_ii S_jj), κ = max |μ_j|/σ_j (≈6e6 here: offset 1e4, scale 1e-3).
    eps = np.finfo(np.float64).eps
    kappa = float((np.abs(ref.mean) / np.sqrt(np.diag(ref.scatter) / ref.n)).max())
    bound = 512 * eps + 2 * 2 * 4 * eps * kappa  # two merges
    assert bound < 1e-7  # still far below float32 products' ~2e-6
    assert corr_err(total.scatter(), ref.scatter) < bound
    np.testing.assert_allclose(total.mean(), ref.mean, rtol=1e-10)
    # Joint use: columns 0..9 from "network A", 10..29 from "network B"; read the cross block.
    blk = total.scatter(rows=slice(0, 10), cols=slice(10, 30))
    assert blk.shape == (10, 20)
    np.testing.assert_array_equal(blk, total.scatter()[0:10, 10:30])
    np.testing.assert_array_equal(total.scatter(rows=slice(10, 30), cols=slice(0, 10)), blk.T)
    empty = GramAccumulator(30, device="cpu")
    empty.merge(total)
    np.testing.assert_array_equal(empty.scatter(), total.scatter())


def test_save_load_roundtrip_and_corruption(tmp_path) -> None:
    rng = np.random.default_rng(4)
    X = rng.standard_normal((700, 12)).astype(np.float32)
    X[5, 5] = np.nan
    acc = GramAccumulator(12, device="cpu")
    acc.update(X)
    p = acc.save(tmp_path / "state.gram")
    back = GramAccumulator.load(p, device="cpu")
    assert (back.n, back.skipped, back.dim) == (699, 1, 12)
    np.testing.assert_array_equal(back.scatter(), acc.scatter())
    np.testing.assert_array_equal(back.mean(), acc.mean())
    back.update(X[:10])  # a loaded state keeps accumulating
    assert back.n == 708
    raw = p.read_bytes()
    (tmp_path / "short.gram").write_bytes(raw[:-100])
    with pytest.raises(AffeqError, match="truncated"):
        GramAccumulator.load(tmp_path / "short.gram")
    flipped = bytearray(raw)
    flipped[200] ^= 0x01
    (tmp_path / "flip.gram").write_bytes(bytes(flipped))
    with pytest.raises(AffeqError, match="checksum"):
        GramAccumulator.load(tmp_path / "flip.gram")
    (tmp_path / "junk.gram").write_bytes(b"x" * len(raw))
    with pytest.raises(AffeqError, match="magic"):
        GramAccumulator.load(tmp_path / "junk.gram")
    with pytest.raises(AffeqError, match="does not exist"):
        GramAccumulator.load(tmp_path / "missing.gram")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((4, 6), np.float64), "dtype"),
        (np.zeros((4, 7), np.float32), "columns"),
        (np.zeros(6, np.float32), "shape"),
        (np.zeros((6, 4), np.float32).T, "contiguous"),
        ([[0.0] * 6], "numpy or cupy"),
        (np.zeros((4, 6), np.int32), "dtype"),
    ],
)
def test_bad_batches_leave_state_unchanged(bad: object, match: str) -> None:
    rng = np.random.default_rng(5)
    acc = GramAccumulator(6, device="cpu")
    acc.update(rng.standard_normal((50, 6)).astype(np.float32))
    S, n = acc.scatter().copy(), acc.n
    with pytest.raises(AffeqError, match=match):
        acc.update(bad)
    assert acc.n == n
    np.testing.assert_array_equal(acc.scatter(), S)


def test_merge_width_mismatch_and_bad_dims() -> None:
    a, b = GramAccumulator(5, device="cpu"), GramAccumulator(6, device="cpu")
    a.update(np.ones((3, 5), np.float32))
    with pytest.raises(AffeqError, match="widths 5 and 6"):
        a.merge(b)
    assert a.n == 3
    with pytest.raises(AffeqError):
        GramAccumulator(0)
    with pytest.raises(AffeqError, match="unknown device"):
        GramAccumulator(3, device="tpu")


@pytest.mark.skipif(CUDA.available, reason="checks the message shown where CUDA is absent")
def test_cuda_requested_but_absent_is_clear() -> None:
    with pytest.raises(AffeqError, match="CUDA backend requested but unavailable"):
        GramAccumulator(4, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_matches_reference_and_cpu(dtype: type) -> None:
    import cupy as cp

    X = adversarial(20000, 48, seed=6).astype(dtype)
    X[7, 3] = np.nan
    ref = gram_reference(X)
    g = GramAccumulator(48, device="cuda", block_rows=4096)
    assert g.device == "cuda"
    feed(g, cp.asarray(X), [3000, 1, 9000])  # device arrays: no host round trip
    assert (g.n, g.skipped) == (ref.n, 1)
    assert corr_err(g.scatter(), ref.scatter) < 2e-12  # float64 cuBLAS products: CPU's bound
    c = GramAccumulator(48, device="cpu")
    c.update(X)
    assert corr_err(g.scatter(), c.scatter()) < 4e-12
    both = c + g  # cross-backend merge goes through the host
    assert both.n == 2 * ref.n


def test_readout_forms_copy_and_empty_state(tmp_path) -> None:
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 9)).astype(np.float32)
    acc = GramAccumulator(9, device="cpu")
    acc.update(X)
    S = acc.scatter()
    np.testing.assert_array_equal(acc.scatter(rows=3), S[3:4])
    np.testing.assert_array_equal(acc.scatter(rows=slice(None, None, 2), cols=-1), S[::2, 8:9])
    dup = acc.copy()
    dup += acc
    assert dup.n == 600
    assert acc.n == 300
    np.testing.assert_allclose(dup.scatter(), 2 * S, rtol=1e-12)  # same mean: the scatters add
    empty = GramAccumulator(9, device="cpu")
    assert empty.n == 0
    assert not empty.mean().any()
    assert not empty.scatter().any()
    back = GramAccumulator.load(empty.save(tmp_path / "empty.gram"), device="cpu")
    assert back.n == 0
    assert back.dim == 9
    with pytest.raises(AffeqError, match="outside"):
        acc.scatter(rows=9)


class _FakeDeviceArray:
    """Exposes __cuda_array_interface__ without any GPU memory behind it (never dereferenced)."""

    def __init__(self, shape: tuple, typestr: str = "<f8", strides: tuple | None = None,
                 readonly: bool = False) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "version": 3,
                                         "data": (4096, readonly), "strides": strides}


def _core_cuda_or_skip():
    try:
        from affeq_rt import _core_cuda
    except ImportError as e:
        pytest.skip(f"affeq_rt._core_cuda not built here: {e}")
    return _core_cuda


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((np.zeros((4, 4)), (4, 4), (4,), (4,)), TypeError, "__cuda_array_interface__"),
        (((4, 4), (4, 4), (4,), (5,)), ValueError, "delta has size 5"),
        (((4, 5), (4, 4), (4,), (4,)), ValueError, "square"),
        (((4, 4), (4, 3), (4,), (4,)), ValueError, "C has size 3"),
        (((4, 4), (4, 4, 1), (4,), (4,)), ValueError, "C must be 2-D"),
        (((4, 4), {"shape": (4, 4), "typestr": "<f4"}, (4,), (4,)), TypeError, "dtype f8"),
        (((4, 4), {"shape": (4, 4), "typestr": ">f8"}, (4,), (4,)), TypeError, "dtype f8"),
        (({"shape": (4, 4), "strides": (8, 32)}, (4, 4), (4,), (4,)), ValueError, "C-contiguous"),
        (({"shape": (4, 4), "readonly": True}, (4, 4), (4,), (4,)), ValueError, "read-only"),
    ],
)
def test_cuda_binding_checks_arrays_before_any_cuda_call(args, exc, match) -> None:
    """The CUDA launchers check shape, dtype, layout and writability in C++ (no GPU needed):
    a wrong array is an exception, never a kernel writing past a buffer."""
    k = _core_cuda_or_skip()

    def make(a):
        if isinstance(a, np.ndarray):
            return a
        if isinstance(a, dict):
            return _FakeDeviceArray(a["shape"], a.get("typestr", "<f8"), a.get("strides"),
                                    a.get("readonly", False))
        return _FakeDeviceArray(a)

    with pytest.raises(exc, match=match):
        k.chan_update(*(make(a) for a in args), 10.0, 0.0, 0)


def test_cuda_binding_checks_scan_and_pack_shapes() -> None:
    k = _core_cuda_or_skip()
    f = _FakeDeviceArray
    T, K, n = 2, 5, 10
    ok = dict(L=f((3, T * K), "<f4"), bias=f((T, K), "<f4"), labels=f((n,), "<i8"),
              pred=f((T, n), "<i4"), flags=f((T, n), "|u1"), hits1=f((T,), "<u8"),
              hits5=f((T,), "<u8"))

    def scan(row0=0, **bad):
        a = {**ok, **bad}
        k.topk_scan(a["L"], a["bias"], a["labels"], 0, row0, a["pred"], a["flags"],
                    a["hits1"], a["hits5"], 0)

    with pytest.raises(ValueError, match="G\\*K"):
        scan(L=f((3, 7), "<f4"))
    with pytest.raises(ValueError, match="outside the n labels"):
        scan(row0=8)
    with pytest.raises(ValueError, match="pred has size 9"):
        scan(pred=f((T, 9), "<i4"))
    with pytest.raises(TypeError, match="labels must have dtype i8"):
        scan(labels=f((n,), "<i4"))
    with pytest.raises(ValueError, match="hits5 is read-only"):
        scan(hits5=f((T,), "<u8", readonly=True))
    with pytest.raises(ValueError, match="out has size 1"):
        k.pack_bits(f((T, n), "|u1"), f((T, 1), "|u1"), 0)
    # Well-formed arrays get as far as the device check, which a host address fails (with or
    # without a GPU): still an exception, and no kernel is launched.
    with pytest.raises(ValueError, match="CUDA|device"):
        scan()


def test_cpu_kernel_rejections_are_internal_errors() -> None:
    """The CPU kernels check every array (dtype, shape, layout, writability, never a silent copy);
    the driver validated the user's input, so a rejection there is a bug: InternalError."""
    be = CpuBackend()
    S, y, z = np.zeros((4, 4)), np.zeros((3, 4)), np.zeros(4)
    with pytest.raises(InternalError, match="Y has 5 columns"):
        be.syrk_update(S, np.zeros((3, 5)), z, z, 0.0)
    with pytest.raises(InternalError, match="S must be float64"):
        be.syrk_update(S.astype(np.float32), y, z, z, 0.0)
    with pytest.raises(InternalError, match="C-contiguous"):
        be.syrk_update(np.zeros((4, 8))[:, ::2], y, z, z, 0.0)
    ro = np.zeros((4, 4))
    ro.flags.writeable = False
    with pytest.raises(InternalError, match="writable"):
        be.syrk_update(ro, y, z, z, 0.0)
    with pytest.raises(InternalError, match="nbuf"):
        be.ingest(np.zeros((8, 4)), 9, np.zeros((2, 4), np.float32), 0, z, z.copy())
    with pytest.raises(InternalError, match="features must have shape"):
        be.ingest(np.zeros((8, 4)), 0, np.zeros((2, 5), np.float32), 0, z, z.copy())


def test_cpu_binding_compares_dtypes_by_value_and_refuses_other_byte_orders() -> None:
    """An equal float64 dtype that is a distinct object (arrays unpickled in another process,
    e.g. a Ray worker's) is accepted; big-endian float64 and float32 are refused (ValueError)."""
    from affeq_rt import _core

    d = 3
    unpickled = pickle.loads(pickle.dumps(np.zeros(d)))
    assert unpickled.dtype is not np.dtype(np.float64)  # the case the check must accept
    x = np.ones((2, d), np.float32)
    stop, skipped = _core.gram_ingest(np.zeros((4, d)), 0, x, 0, unpickled,
                                      pickle.loads(pickle.dumps(np.zeros(d))))
    assert (stop, skipped) == (2, 0)
    for bad in (np.zeros(d, ">f8"), np.zeros(d, np.float32)):
        with pytest.raises(ValueError, match="ref must be float64"):
            _core.gram_ingest(np.zeros((4, d)), 0, x, 0, bad, np.zeros(d))
