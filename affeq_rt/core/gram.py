"""Python face of the compiled core: streaming Gram accumulation and batched folded-head evaluation.

Two operations, each with a CPU backend (``affeq_rt._core``: OpenBLAS + OpenMP), a CUDA backend
(cupy/cuBLAS for the products, ``affeq_rt._core_cuda`` kernels for the rest) and a NumPy float64
reference used by the tests:

* :class:`GramAccumulator` keeps ``n``, the float64 mean and the float64 centred scatter of streamed
  feature rows. Rows holding NaN or Inf are **skipped and counted** (``skipped``), never
  accumulated.
* :func:`evaluate_heads` scores T stacked folded heads on n feature rows (top-1 / top-5 counts,
  argmax, packed top-1 correctness bits) tile by tile, never holding the n x T x K logits. Ties
  go to the lowest class index. Features with NaN or Inf are rejected.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.core.backends import cpu_core, resolve_device
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path

__all__ = [
    "GramAccumulator",
    "GramReference",
    "HeadsResult",
    "evaluate_heads",
    "evaluate_reference",
    "gram_reference",
]

_FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

# State file: header, mean (float64[d]), packed upper scatter (float64[d(d+1)/2]),
# then the SHA-256 of everything before it.
_MAGIC = b"AFFEQGRM"
_VERSION = 1
_HEADER = struct.Struct("<8sIIqqq")  # magic, version, flags, dim, n, skipped
_DIGEST = 32


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _host(x: Any) -> np.ndarray:
    """A NumPy view of x, copying a cupy array to the host."""
    return x.get() if _is_cupy(x) else np.asarray(x)


def _check_features(X: Any, dim: int | None, what: str = "features") -> None:
    """Raise AffeqError unless X is a C-contiguous float32/float16 [rows, dim] numpy/cupy array."""
    if not (isinstance(X, np.ndarray) or _is_cupy(X)):
        raise AffeqError(
            f"{what} must be a numpy or cupy array, got {type(X).__name__}",
            "pass np.asarray(features, dtype=np.float32)",
        )
    if X.dtype not in _FEATURE_DTYPES:
        raise AffeqError(
            f"{what} have dtype {X.dtype}, expected float32 or float16",
            "convert with X.astype(np.float32)",
        )
    if X.ndim != 2:
        raise AffeqError(
            f"{what} have shape {tuple(X.shape)}, expected [rows, dim]",
            "reshape to a 2-D [rows, dim] array",
        )
    if dim is not None and X.shape[1] != dim:
        raise AffeqError(
            f"{what} have {X.shape[1]} columns, the accumulator has {dim}",
            "feed features of the width the accumulator was created with",
        )
    if not X.flags.c_contiguous:
        raise AffeqError(f"{what} are not C-contiguous", "pass np.ascontiguousarray(X)")


def _range_of(s: slice | int, dim: int, what: str) -> tuple[int, int, int]:
    if isinstance(s, (int, np.integer)):
        i = int(s) + (dim if s < 0 else 0)
        if not 0 <= i < dim:
            raise AffeqError(
                f"{what} index {s} outside 0..{dim - 1}", "use an index inside the width"
            )
        return i, i + 1, 1
    if not isinstance(s, slice):
        raise AffeqError(
            f"{what} must be a slice or an int, got {type(s).__name__}", "pass e.g. slice(0, 2048)"
        )
    return s.indices(dim)


def _gram_from(n: int, mean: np.ndarray, scatter: np.ndarray) -> np.ndarray:
    """ZᵀZ for Z = [X 1] from count, mean and centred scatter: [[S + nμμᵀ, nμ], [nμᵀ, n]]."""
    d = mean.shape[0]
    G = np.empty((d + 1, d + 1))
    G[:d, :d] = scatter + float(n) * np.outer(mean, mean)
    G[:d, d] = G[d, :d] = float(n) * mean
    G[d, d] = n
    return G


# --------------------------------------------------------------------------------------------------
# Gram accumulator


class _CudaGram:
    """CUDA state: same algorithm as the CPU core (float32 blocks shifted by a float32 mean,
    cuBLAS product, float64 Chan merge in ``_core_cuda``), state kept on the device."""

    def __init__(self, dim: int, block_rows: int = 0) -> None:
        import cupy as cp

        from affeq_rt import _core_cuda

        self._cp, self._k = cp, _core_cuda
        self.dim = dim
        self.block_rows = block_rows if block_rows > 0 else 8192
        self._n = 0
        self.skipped = 0
        self._mean = cp.zeros(dim, dtype=cp.float64)
        self._S = cp.zeros((dim, dim), dtype=cp.float64)
        self._buf = None
        self._nbuf = 0

    @property
    def n(self) -> int:
        return self._n + self._nbuf

    def update(self, X: Any) -> int:
        cp = self._cp
        X = cp.asarray(X)  # numpy input is copied to the device once
        if X.shape[0] == 0:
            return 0
        ok = cp.isfinite(X).all(axis=1)
        good = int(ok.sum())
        skipped = X.shape[0] - good
        if skipped:
            X = X[ok]
        pos, rows = 0, X.shape[0]
        while pos < rows:
            if self._nbuf == 0 and rows - pos >= self.block_rows:
                self._reduce(X[pos : pos + self.block_rows].astype(cp.float32, copy=False))
                pos += self.block_rows
                continue
            if self._buf is None:
                self._buf = cp.empty((self.block_rows, self.dim), dtype=cp.float32)
            take = min(self.block_rows - self._nbuf, rows - pos)
            self._buf[self._nbuf : self._nbuf + take] = X[pos : pos + take]
            self._nbuf += take
            pos += take
            if self._nbuf == self.block_rows:
                self.flush()
        self.skipped += skipped
        return skipped

    def flush(self) -> None:
        if self._nbuf:
            m, self._nbuf = self._nbuf, 0
            self._reduce(self._buf[:m])

    def _reduce(self, Xb: Any) -> None:
        cp = self._cp
        m = Xb.shape[0]
        c = (Xb.sum(axis=0, dtype=cp.float64) / m).astype(cp.float32)
        Y = Xb - c  # float32, nearly exact
        ybar = Y.sum(axis=0, dtype=cp.float64) / m
        C = cp.ascontiguousarray(Y.T @ Y)  # cuBLAS sgemm
        bm = c.astype(cp.float64) + ybar
        n = self._n
        if n == 0:
            self._S.fill(0)
            delta, f = cp.zeros_like(bm), 0.0
            self._mean = bm
        else:
            delta = bm - self._mean
            f = n * m / (n + m)
            self._mean = self._mean + delta * (m / (n + m))
        stream = cp.cuda.get_current_stream().ptr
        self._k.chan_update(
            self._S.data.ptr,
            C.data.ptr,
            ybar.data.ptr,
            delta.data.ptr,
            float(m),
            f,
            self.dim,
            stream,
        )
        self._n = n + m

    def mean(self) -> np.ndarray:
        self.flush()
        return self._cp.asnumpy(self._mean)

    def scatter_block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        self.flush()
        return self._cp.asnumpy(self._S[r0:r1, c0:c1])

    def packed_upper(self) -> np.ndarray:
        self.flush()
        iu = np.triu_indices(self.dim)
        return self._cp.asnumpy(self._S)[iu]

    def set_state(self, n: int, skipped: int, mean: np.ndarray, packed: np.ndarray) -> None:
        cp = self._cp
        S = np.zeros((self.dim, self.dim))
        S[np.triu_indices(self.dim)] = packed
        S = S + np.triu(S, 1).T
        self._S = cp.asarray(S)
        self._mean = cp.asarray(np.asarray(mean, dtype=np.float64))
        self._n, self.skipped, self._nbuf = int(n), int(skipped), 0

    def merge(self, other: _CudaGram) -> None:
        cp = self._cp
        self.flush()
        other.flush()
        if other._n:
            if self._n == 0:
                self._S = other._S.copy()
                self._mean = other._mean.copy()
            else:
                n, m = self._n, other._n
                delta = other._mean - self._mean
                self._S += other._S + (n * m / (n + m)) * cp.outer(delta, delta)
                self._mean = self._mean + delta * (m / (n + m))
            self._n += other._n
        self.skipped += other.skipped


class GramAccumulator:
    """Streaming, mergeable Gram state of Z = [X 1] for float32/float16 feature rows.

    Kept as ``n``, float64 mean and float64 centred scatter (see :meth:`scatter`); :meth:`gram`
    forms ZᵀZ. For joint features of k networks concatenated column-wise,
    ``scatter(rows=slice_i, cols=slice_j)`` reads any (network i, network j) block.
    ``device`` is ``auto|cpu|cuda``; ``.device`` says which backend runs.
    """

    def __init__(self, dim: int, device: str = "auto", block_rows: int = 0) -> None:
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise AffeqError(
                f"Gram dimension must be a positive integer, got {dim!r}", "pass the feature width"
            )
        self.device = resolve_device(device)
        self._impl: Any
        if self.device == "cuda":
            self._impl = _CudaGram(int(dim), block_rows)
        else:
            self._impl = cpu_core().Gram(int(dim), int(block_rows))

    # ---- properties
    @property
    def dim(self) -> int:
        """Feature width (without the implicit bias column)."""
        return int(self._impl.dim)

    @property
    def n(self) -> int:
        """Rows accumulated (skipped rows excluded)."""
        return int(self._impl.n)

    @property
    def skipped(self) -> int:
        """Rows dropped because they held NaN or Inf."""
        return int(self._impl.skipped)

    def __repr__(self) -> str:
        return (
            f"GramAccumulator(dim={self.dim}, n={self.n}, skipped={self.skipped}, "
            f"device={self.device!r})"
        )

    # ---- accumulation
    def update(self, X: Any) -> int:
        """Add a C-contiguous float32/float16 batch ``[rows, dim]``; returns rows skipped."""
        _check_features(X, self.dim)
        return int(self._impl.update(X if self.device == "cuda" else _host(X)))

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add another accumulator's rows into this one (in place); returns self."""
        if not isinstance(other, GramAccumulator):
            raise AffeqError(
                f"cannot merge a GramAccumulator with {type(other).__name__}",
                "merge two GramAccumulator objects",
            )
        if other.dim != self.dim:
            raise AffeqError(
                f"cannot merge Gram states of widths {self.dim} and {other.dim}",
                "merge accumulators built over the same features",
            )
        if other is self or other.device != self.device:  # across backends: through the host
            other = other._on(self.device)
        self._impl.merge(other._impl)
        return self

    def __add__(self, other: GramAccumulator) -> GramAccumulator:
        if not isinstance(other, GramAccumulator):
            return NotImplemented
        return self.copy().merge(other)

    def __iadd__(self, other: GramAccumulator) -> GramAccumulator:
        return self.merge(other)

    def copy(self) -> GramAccumulator:
        """An independent accumulator with the same state and backend."""
        return self._on(self.device)

    def _on(self, device: str) -> GramAccumulator:
        """A new accumulator on ``device`` holding this state."""
        out = GramAccumulator(self.dim, device=device)
        out._impl.set_state(self.n, self.skipped, self.mean(), self._impl.packed_upper())
        return out

    # ---- read-out
    def mean(self) -> np.ndarray:
        """Column means, float64 ``[dim]`` (zeros while empty)."""
        return np.asarray(self._impl.mean(), dtype=np.float64)

    def scatter(
        self, rows: slice | int = slice(None), cols: slice | int = slice(None)
    ) -> np.ndarray:
        """Block of the centred scatter Σ(x−μ)(x−μ)ᵀ, float64. Covariance = scatter / (n − 1)."""
        r0, r1, rs = _range_of(rows, self.dim, "rows")
        c0, c1, cs = _range_of(cols, self.dim, "cols")
        if rs < 0 or cs < 0:
            raise AffeqError("negative slice steps are not supported", "use a forward slice")
        r1, c1 = max(r0, r1), max(c0, c1)
        out = self._impl.scatter_block(r0, r1, c0, c1)
        return np.asarray(out)[::rs, ::cs]

    def gram(self) -> np.ndarray:
        """ZᵀZ for Z = [X 1], float64 ``[(dim+1), (dim+1)]`` (last row/column: sums and n).

        Formed from the scatter and mean (ZᵀZ = S + n μμᵀ); solvers should prefer scatter()/mean(),
        which keep the precision that the raw second moment loses for features with large means.
        """
        return _gram_from(self.n, self.mean(), self.scatter())

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the state (header, mean, packed scatter, SHA-256) atomically; returns the path."""
        d = self.dim
        mean = np.ascontiguousarray(self.mean(), dtype="<f8")
        packed = np.ascontiguousarray(self._impl.packed_upper(), dtype="<f8")
        header = _HEADER.pack(_MAGIC, _VERSION, 0, d, self.n, self.skipped)
        h = hashlib.sha256()
        dest = Path(path)
        with atomic_path(dest) as tmp, open(tmp, "wb") as f:
            for part in (header, memoryview(mean).cast("B"), memoryview(packed).cast("B")):
                h.update(part)
                f.write(part)
            f.write(h.digest())
        return dest

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> GramAccumulator:
        """Read a state written by :meth:`save`; AffeqError if missing, truncated or corrupt."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise AffeqError(f"Gram state {p} does not exist", "check the path") from None
        except OSError as e:
            raise AffeqError(
                f"cannot read Gram state {p}: {e.strerror}", "check the path"
            ) from None
        fix = "the file is damaged: re-run the accumulation or restore the checkpoint"
        if len(data) < _HEADER.size + _DIGEST:
            raise AffeqError(f"Gram state {p} is truncated ({len(data)} bytes)", fix)
        magic, version, _flags, d, n, skipped = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise AffeqError(
                f"{p} is not an affeq-rt Gram state (bad magic)", "pass a file written by save()"
            )
        if version != _VERSION:
            raise AffeqError(
                f"Gram state {p} has format version {version}, this build reads {_VERSION}",
                "upgrade affeq-rt",
            )
        if d < 1 or n < 0 or skipped < 0 or d > 1 << 20:
            raise AffeqError(f"Gram state {p} has an invalid header (dim={d}, n={n})", fix)
        npk = d * (d + 1) // 2
        expected = _HEADER.size + 8 * (d + npk) + _DIGEST
        if len(data) != expected:
            raise AffeqError(
                f"Gram state {p} has {len(data)} bytes, expected {expected} (truncated?)", fix
            )
        body = memoryview(data)[: expected - _DIGEST]
        if hashlib.sha256(body).digest() != data[expected - _DIGEST :]:
            raise AffeqError(f"Gram state {p} fails its checksum (corrupt)", fix)
        mean = np.frombuffer(data, dtype="<f8", count=d, offset=_HEADER.size)
        packed = np.frombuffer(data, dtype="<f8", count=npk, offset=_HEADER.size + 8 * d)
        out = cls(int(d), device=device)
        out._impl.set_state(int(n), int(skipped), mean, packed)
        return out


@dataclass
class GramReference:
    """Float64 reference statistics of a feature matrix (finite rows only)."""

    n: int
    skipped: int
    mean: np.ndarray
    scatter: np.ndarray

    def gram(self) -> np.ndarray:
        """ZᵀZ for Z = [X 1] in float64."""
        return _gram_from(self.n, self.mean, self.scatter)


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


# --------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class HeadsResult:
    """Per-head results of :func:`evaluate_heads`.

    ``top1``/``top5``: int64 ``[T]`` hit counts over labelled rows; ``pred``: int32 ``[T, n]``;
    ``correct``: uint8 ``[T, ceil(n/8)]`` top-1 hits packed with ``np.packbits`` bit order
    (``np.unpackbits(correct, axis=1, count=n)`` restores them); ``labeled``: rows with label ≥ 0.
    """

    top1: np.ndarray
    top5: np.ndarray
    pred: np.ndarray
    correct: np.ndarray
    n: int
    labeled: int
    device: str

    @property
    def top1_acc(self) -> np.ndarray:
        """Top-1 accuracy per head over the labelled rows (NaN when none are labelled)."""
        return self.top1 / self.labeled if self.labeled else np.full(self.top1.shape, np.nan)

    @property
    def top5_acc(self) -> np.ndarray:
        """Top-5 accuracy per head over the labelled rows (NaN when none are labelled)."""
        return self.top5 / self.labeled if self.labeled else np.full(self.top5.shape, np.nan)

    def correct_bits(self) -> np.ndarray:
        """Unpacked top-1 correctness, bool ``[T, n]``."""
        return np.unpackbits(self.correct, axis=1, count=self.n).astype(bool)


def _check_eval(
    X: Any, W: Any, b: Any, labels: Any
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    _check_features(X, None)
    n, d = X.shape
    W, b, labels = _host(W), _host(b), _host(labels)
    if W.ndim != 3 or W.shape[2] != d:
        raise AffeqError(
            f"heads have shape {W.shape}, expected [T, K, {d}] for features of width {d}",
            "stack the folded heads as W[T, K, d]",
        )
    T, K = W.shape[:2]
    if K < 1:
        raise AffeqError("heads have no classes (K = 0)", "pass heads with at least one class")
    if b.shape != (T, K):
        raise AffeqError(f"biases have shape {b.shape}, expected {(T, K)}", "pass b[T, K]")
    if labels.shape != (n,):
        raise AffeqError(
            f"labels have shape {labels.shape}, expected ({n},)", "pass one label per row"
        )
    if not np.issubdtype(W.dtype, np.floating) or not np.issubdtype(b.dtype, np.floating):
        raise AffeqError("heads and biases must be floating point", "pass float32 arrays")
    if not np.issubdtype(labels.dtype, np.integer):
        raise AffeqError(
            f"labels have dtype {labels.dtype}, expected integers", "pass int64 labels"
        )
    W = np.ascontiguousarray(W, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < -1 or labels.max() >= K):
        raise AffeqError(
            f"labels span {labels.min()}..{labels.max()}, outside -1..{K - 1}",
            "use class indices 0..K-1 and -1 for unknown",
        )
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise AffeqError("heads or biases contain NaN or Inf", "refit the maps that produced them")
    return X, W, b, labels


def evaluate_heads(
    X: Any, W: Any, b: Any, labels: Any, device: str = "auto", tile_rows: int = 0
) -> HeadsResult:
    """Top-1/top-5 hits, argmax and packed top-1 bits of heads ``W[T,K,d]``, ``b[T,K]`` on X.

    Labels ``-1`` are unknown (never a hit). Ties resolve to the lowest class index. Work is tiled
    over rows (and head groups), so memory is bounded by the tile, not by n x T x K.
    """
    X, W, b, labels = _check_eval(X, W, b, labels)
    dev = resolve_device(device)
    n = X.shape[0]
    labeled = int((labels >= 0).sum())
    if dev == "cuda":
        top1, top5, pred, correct = _evaluate_cuda(X, W, b, labels, tile_rows)
    else:
        try:
            top1, top5, pred, correct = cpu_core().evaluate(
                _host(X), W, b, labels, int(tile_rows), True)
        except ValueError as e:
            raise AffeqError(
                f"cannot evaluate: {e}", "drop or repair the rows with NaN/Inf features"
            ) from None
    return HeadsResult(
        top1=np.asarray(top1),
        top5=np.asarray(top5),
        pred=np.asarray(pred),
        correct=np.asarray(correct),
        n=n,
        labeled=labeled,
        device=dev,
    )


def _evaluate_cuda(
    X: Any, W: np.ndarray, b: np.ndarray, labels: np.ndarray, tile_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CUDA path: cuBLAS sgemm per row tile (all heads at once), fused warp top-5 scan kernel."""
    import cupy as cp

    from affeq_rt import _core_cuda as k

    Xd = cp.asarray(X)
    n, d = Xd.shape
    T, K = W.shape[:2]
    if not bool(cp.isfinite(Xd).all()):
        raise AffeqError(
            "cannot evaluate: features contain NaN or Inf",
            "drop or repair the rows with NaN/Inf features",
        )
    Wd = cp.asarray(W.reshape(T * K, d))
    bd = cp.asarray(b)
    ld = cp.asarray(labels)
    R = tile_rows if tile_rows > 0 else max(8, min(8192, (256 << 20) // max(1, 4 * T * K)) // 8 * 8)
    L = cp.empty((R, T * K), dtype=cp.float32)
    pred = cp.empty((T, n), dtype=cp.int32)
    flags = cp.zeros((T, n), dtype=cp.uint8)
    hits1 = cp.zeros(T, dtype=cp.uint64)
    hits5 = cp.zeros(T, dtype=cp.uint64)
    stream = cp.cuda.get_current_stream().ptr
    for row0 in range(0, n, R):
        r = min(R, n - row0)
        Xt = Xd[row0 : row0 + r]
        if Xt.dtype != cp.float32:
            Xt = Xt.astype(cp.float32)
        Lt = L[:r]
        cp.matmul(Xt, Wd.T, out=Lt)
        k.topk_scan(
            Lt.data.ptr,
            T * K,
            bd.data.ptr,
            ld.data.ptr,
            r,
            T,
            K,
            0,
            n,
            row0,
            pred.data.ptr,
            flags.data.ptr,
            hits1.data.ptr,
            hits5.data.ptr,
            stream,
        )
    correct = cp.empty((T, (n + 7) // 8), dtype=cp.uint8)
    k.pack_bits(flags.data.ptr, T, n, correct.data.ptr, stream)
    return (
        cp.asnumpy(hits1).astype(np.int64),
        cp.asnumpy(hits5).astype(np.int64),
        cp.asnumpy(pred),
        cp.asnumpy(correct),
    )


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
