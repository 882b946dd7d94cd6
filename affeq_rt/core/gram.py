"""GramAccumulator: the one driver of the streaming Gram state, over either backend (core.kernels).

The accumulator keeps ``n``, the float64 mean and the float64 centred scatter of streamed feature
rows. Rows holding NaN or Inf are **skipped and counted** (``skipped``), never accumulated.

Numerics (docs/BENCHMARKS.md, "Gram"): rows are buffered as float64 blocks (4096–8192 rows),
shifted by a reference (the running mean; the first block by its own mean), reduced with float64
``dsyrk`` (cuBLAS dgemm on CUDA) and merged with Chan's update. Every product is float64, so the
state's accuracy does not depend on the CPU's BLAS kernel: for any summation order each entry's
error is at most γ_m·Σ|y_i||y_j| (γ_m = m·eps64/(1−m·eps64), m = block rows), ~1e-12 relative.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.core.backends import resolve_device
from affeq_rt.core.checks import check_features, range_of
from affeq_rt.core.kernels import Backend, backend_for
from affeq_rt.core.reference import gram_from
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import atomic_path

__all__ = ["GramAccumulator"]

# State file: header, mean (float64[d]), packed upper scatter (float64[d(d+1)/2]),
# then the SHA-256 of everything before it. Content unchanged since version 1.
_MAGIC = b"AFFEQGRM"
_VERSION = 1
_HEADER = struct.Struct("<8sIIqqq")  # magic, version, flags, dim, n, skipped
_DIGEST = 32


def default_block_rows(d: int) -> int:
    """Rows per block: the O(d²) merge stays a few % of the O(m d²) dsyrk; buffer ≤ ~256 MiB."""
    m = 8192 if d >= 1024 else 4096
    cap = (256 << 20) // (8 * d)
    return max(64, min(m, cap))


class GramAccumulator:
    """Streaming, mergeable Gram state of Z = [X 1] for float32/float16 feature rows.

    Kept as ``n``, float64 mean and float64 centred scatter (see :meth:`scatter`); :meth:`gram`
    forms ZᵀZ. For joint features of k networks concatenated column-wise,
    ``scatter(rows=slice_i, cols=slice_j)`` reads any (network i, network j) block.
    ``device`` is ``auto|cpu|cuda``; ``.device`` says which backend runs.
    """

    #: Unit roundoff of the products the state is built from (float64 on every backend); the
    #: solvers derive their default eigenvalue cut-off (``rcond``) from it.
    eps: float = float(np.finfo(np.float64).eps)

    def __init__(self, dim: int, device: str = "auto", block_rows: int = 0) -> None:
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise AffeqError(
                f"Gram dimension must be a positive integer, got {dim!r}", "pass the feature width"
            )
        if not isinstance(block_rows, (int, np.integer)) or block_rows < 0:
            raise AffeqError(f"block_rows must be >= 0, got {block_rows!r}", "pass 0 (automatic)")
        self.device = resolve_device(device)
        self._be: Backend = backend_for(self.device)
        xp = self._be.xp
        d = int(dim)
        self._dim = d
        self.block_rows = int(block_rows) if block_rows > 0 else default_block_rows(d)
        self._n = 0  # rows reduced into _mean/_S
        self._skipped = 0
        self._mean = xp.zeros(d)
        self._S = xp.zeros((d, d))  # upper triangle (j >= i) valid
        self._buf = xp.empty((self.block_rows, d))  # up front: no first-update stall
        self._nbuf = 0  # rows waiting in _buf
        self._colsum = xp.zeros(d)  # column sums of the buffered (shifted) rows
        self._ref = xp.zeros(d)  # shift of the buffered rows
        self._shifted = False  # the buffered rows were stored as x - running mean

    # ---- properties
    @property
    def dim(self) -> int:
        """Feature width (without the implicit bias column)."""
        return self._dim

    @property
    def n(self) -> int:
        """Rows accumulated (skipped rows excluded)."""
        return self._n + self._nbuf

    @property
    def skipped(self) -> int:
        """Rows dropped because they held NaN or Inf."""
        return self._skipped

    def __repr__(self) -> str:
        return (
            f"GramAccumulator(dim={self.dim}, n={self.n}, skipped={self.skipped}, "
            f"device={self.device!r})"
        )

    # ---- accumulation
    def update(self, X: Any) -> int:
        """Add a C-contiguous float32/float16 batch ``[rows, dim]``; returns rows skipped."""
        check_features(X, self.dim)
        X = self._be.asarray(X)
        rows, pos, skipped = int(X.shape[0]), 0, 0
        while pos < rows:
            if self._nbuf == 0:  # a new block: fix its shift while it fills
                self._shifted = self._n > 0
                self._ref[...] = self._mean if self._shifted else 0.0
                self._colsum[...] = 0.0
            stop, s = self._be.ingest(self._buf, self._nbuf, X, pos, self._ref, self._colsum)
            self._nbuf += stop - pos - s
            skipped += s
            pos = stop
            if self._nbuf == self.block_rows:
                self.flush()
        self._skipped += skipped
        return skipped

    def flush(self) -> None:
        """Reduce the buffered rows into the float64 state (Chan's parallel update)."""
        m = self._nbuf
        if m == 0:
            return
        xp = self._be.xp
        Y = self._buf[:m]
        if self._shifted:
            c, ybar = self._ref, self._colsum / m
        else:  # first block: shift by its own mean, so the products stay small
            c = self._colsum / m
            Y -= c
            ybar = Y.sum(axis=0) / m
        n = self._n
        if n == 0:
            delta, f = xp.zeros(self._dim), 0.0
            self._mean = c + ybar  # block mean
        else:
            # The shift c is the running mean itself (same float64 values), so delta = block mean
            # − running mean = ybar exactly: no cancellation against |μ| (features with large
            # offsets and small spreads keep their scatter to γ_m, independent of |μ|/σ).
            delta = (c - self._mean) + ybar
            f = n * m / (n + m)
            self._mean = self._mean + delta * (m / (n + m))
        self._be.syrk_update(self._S, Y, ybar, delta, f)
        self._n, self._nbuf = n + m, 0

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
        self.flush()
        other.flush()
        if other._n:
            if self._n == 0:
                self._S[...] = other._S
                self._mean = other._mean.copy()
            else:
                n, m = self._n, other._n
                delta = other._mean - self._mean
                self._S += other._S
                empty = self._be.xp.zeros((0, self._dim))
                self._be.syrk_update(self._S, empty, self._be.xp.zeros(self._dim), delta,
                                     n * m / (n + m))
                self._mean = self._mean + delta * (m / (n + m))
            self._n += other._n
        self._skipped += other._skipped
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

    def snapshot(self) -> GramAccumulator:
        """An independent, flushed accumulator holding every row added so far, taken WITHOUT
        flushing this one: its block buffer, and so every later sum, stays exactly as if no
        snapshot had been taken (``copy()`` flushes first, which moves block boundaries)."""
        out = GramAccumulator(self.dim, device=self.device, block_rows=self.block_rows)
        out._S = self._S.copy()
        out._mean = self._mean.copy()
        out._n, out._skipped, out._nbuf = self._n, self._skipped, self._nbuf
        out._buf[: self._nbuf] = self._buf[: self._nbuf]
        out._colsum[...] = self._colsum
        out._ref[...] = self._ref
        out._shifted = self._shifted
        out.flush()
        return out

    def _on(self, device: str) -> GramAccumulator:
        """A new accumulator on ``device`` holding this state."""
        out = GramAccumulator(self.dim, device=device, block_rows=self.block_rows)
        out._set_state(self.n, self.skipped, self.mean(), self._packed_upper())
        return out

    # ---- state as host arrays (persistence, cross-backend copies, other processes)
    def state(self) -> tuple[int, int, np.ndarray, np.ndarray]:
        """The exact state as host arrays (n, skipped, mean, packed upper scatter), O(d²): what
        a worker process sends back (e.g. through Ray) and :meth:`from_state` rebuilds."""
        return int(self.n), int(self.skipped), self.mean(), self._packed_upper()

    @classmethod
    def from_state(cls, dim: int, state: tuple[int, int, np.ndarray, np.ndarray],
                   device: str = "auto") -> GramAccumulator:
        """The accumulator :meth:`state` described (the same float64 values)."""
        n, skipped, mean, packed = state
        out = cls(int(dim), device=device)
        out._set_state(int(n), int(skipped), mean, packed)
        return out

    def _packed_upper(self) -> np.ndarray:
        """Upper triangle of the scatter packed row by row, float64 [d(d+1)/2]."""
        self.flush()
        S = self._be.to_host(self._S)
        return np.concatenate([S[i, i:] for i in range(self._dim)])

    def _set_state(self, n: int, skipped: int, mean: np.ndarray, packed: np.ndarray) -> None:
        d = self._dim
        S = np.zeros((d, d))
        o = 0
        for i in range(d):
            S[i, i:] = packed[o : o + d - i]
            o += d - i
        xp = self._be.xp
        self._S = xp.asarray(S)
        self._mean = xp.asarray(np.array(mean, dtype=np.float64))
        self._n, self._skipped, self._nbuf = int(n), int(skipped), 0

    # ---- read-out
    def mean(self) -> np.ndarray:
        """Column means, float64 ``[dim]`` (zeros while empty)."""
        self.flush()
        return np.array(self._be.to_host(self._mean), dtype=np.float64)

    def scatter(
        self, rows: slice | int = slice(None), cols: slice | int = slice(None)
    ) -> np.ndarray:
        """Block of the centred scatter Σ(x−μ)(x−μ)ᵀ, float64. Covariance = scatter / (n − 1)."""
        r0, r1, rs = range_of(rows, self.dim, "rows")
        c0, c1, cs = range_of(cols, self.dim, "cols")
        if rs < 0 or cs < 0:
            raise AffeqError("negative slice steps are not supported", "use a forward slice")
        r1, c1 = max(r0, r1), max(c0, c1)
        self.flush()
        xp = self._be.xp
        upper = self._S[r0:r1, c0:c1]
        lower = self._S[c0:c1, r0:r1].T
        i = xp.arange(r0, r1)[:, None]
        j = xp.arange(c0, c1)[None, :]
        out = self._be.to_host(xp.where(j >= i, upper, lower))
        return np.ascontiguousarray(out[::rs, ::cs])

    def gram(self) -> np.ndarray:
        """ZᵀZ for Z = [X 1], float64 ``[(dim+1), (dim+1)]`` (last row/column: sums and n).

        Formed from the scatter and mean (ZᵀZ = S + n μμᵀ); solvers should prefer scatter()/mean(),
        which keep the precision that the raw second moment loses for features with large means.
        """
        return gram_from(self.n, self.mean(), self.scatter())

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the state (header, mean, packed scatter, SHA-256) atomically; returns the path."""
        d = self.dim
        mean = np.ascontiguousarray(self.mean(), dtype="<f8")
        packed = np.ascontiguousarray(self._packed_upper(), dtype="<f8")
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
        out._set_state(int(n), int(skipped), mean, packed)
        return out
