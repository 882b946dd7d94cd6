"""The compiled core's kernels: one backend contract (the ``Backend`` Protocol), its CPU and CUDA
implementations, and ``backend_for(device)``. (Which compiled modules this install has, and the
device a name resolves to, is ``core.backends``.)

The algorithms' state lives once, in the drivers (``core.gram.GramAccumulator``,
``core.evaluate.evaluate_heads``); a backend only supplies the heavy steps behind identical
signatures. Arrays are the backend's own (``xp``: numpy for the CPU, cupy for CUDA); every
compiled call checks its arguments in C++ (the CUDA module through ``__cuda_array_interface__``)
and a rejection there is our bug, raised as :class:`InternalError`: the drivers validate the
user's input first and raise :class:`AffeqError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from affeq_rt.core.backends import cpu_core, cuda_core
from affeq_rt.core.checks import host
from affeq_rt.errors import AffeqError, InternalError

__all__ = ["Backend", "CpuBackend", "CudaBackend", "backend_for"]

NAN_FIX = "drop or repair the rows with NaN/Inf features"


class Backend(Protocol):
    """What the drivers need from a backend. Arrays are ``xp`` arrays, float64 unless stated."""

    name: str
    xp: Any  # the array module: numpy or cupy

    def asarray(self, X: Any) -> Any:
        """X as an array of this backend (no copy when it already is one)."""
        ...

    def to_host(self, a: Any) -> np.ndarray:
        """A NumPy copy (or view) of a backend array."""
        ...

    def ingest(self, buf: Any, nbuf: int, X: Any, start: int, ref: Any, colsum: Any
               ) -> tuple[int, int]:
        """Copy finite rows of X[start:] (float32/float16 [rows, d]) into ``buf[nbuf:]``
        ([cap, d]) as ``x − ref``, adding them to ``colsum`` [d], until ``buf`` is full or X is
        exhausted. Returns (next unread row of X, rows skipped for NaN/Inf)."""
        ...

    def syrk_update(self, S: Any, Y: Any, ybar: Any, delta: Any, f: float) -> None:
        """Upper triangle of S [d, d] += YᵀY − m·ȳȳᵀ + f·δδᵀ for the shifted block Y [m, d]
        (m may be 0), with float64 products."""
        ...

    def evaluate(self, X: Any, W: np.ndarray, b: np.ndarray, labels: np.ndarray, tile_rows: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(top1 [T], top5 [T], pred [T, n] int32, packed top-1 bits [T, ceil(n/8)]) of the
        checked heads W [T, K, d] float32, b [T, K] float32, labels [n] int64 on features X."""
        ...


def _checked(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a compiled kernel; its argument checks failing means the driver broke an invariant."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        raise InternalError(f"{getattr(fn, '__name__', fn)} rejected its arguments: {e}") from e


class CpuBackend:
    """OpenBLAS + OpenMP kernels of ``affeq_rt._core``."""

    name = "cpu"
    xp = np

    def __init__(self) -> None:
        self._k = cpu_core()

    def asarray(self, X: Any) -> np.ndarray:
        return host(X)

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def ingest(self, buf: np.ndarray, nbuf: int, X: np.ndarray, start: int, ref: np.ndarray,
               colsum: np.ndarray) -> tuple[int, int]:
        stop, skipped = _checked(self._k.gram_ingest, buf, int(nbuf), X, int(start), ref, colsum)
        return int(stop), int(skipped)

    def syrk_update(self, S: np.ndarray, Y: np.ndarray, ybar: np.ndarray, delta: np.ndarray,
                    f: float) -> None:
        _checked(self._k.gram_syrk_update, S, Y, ybar, delta, float(f))

    def evaluate(self, X: Any, W: np.ndarray, b: np.ndarray, labels: np.ndarray, tile_rows: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        try:
            out = self._k.evaluate(host(X), W, b, labels, int(tile_rows), True)
        except ValueError as e:
            if "NaN" in str(e):
                raise AffeqError(f"cannot evaluate: {e}", NAN_FIX) from None
            raise InternalError(f"evaluate rejected its arguments: {e}") from e
        return tuple(np.asarray(a) for a in out)  # type: ignore[return-value]


class CudaBackend:
    """cuBLAS products through cupy, checked kernels of ``affeq_rt._core_cuda`` for the rest."""

    name = "cuda"

    def __init__(self) -> None:
        import cupy as cp

        self.xp = cp
        self._k = cuda_core()

    def _stream(self) -> int:
        return int(self.xp.cuda.get_current_stream().ptr)

    def asarray(self, X: Any) -> Any:
        return self.xp.asarray(X)  # numpy input is copied to the device once

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)

    def ingest(self, buf: Any, nbuf: int, X: Any, start: int, ref: Any, colsum: Any
               ) -> tuple[int, int]:
        cp = self.xp
        cap, rows = buf.shape[0], X.shape[0]
        pos, skipped = start, 0
        while pos < rows and nbuf < cap:  # each pass reads at most the free rows: linear overall
            chunk = X[pos : pos + (cap - nbuf)]
            good = chunk[cp.isfinite(chunk).all(axis=1)]
            k = good.shape[0]
            Y = buf[nbuf : nbuf + k]
            Y[...] = good  # float32/float16 -> float64, exact
            Y -= ref
            colsum += Y.sum(axis=0)
            skipped += chunk.shape[0] - k
            nbuf += k
            pos += chunk.shape[0]
        return pos, skipped

    def syrk_update(self, S: Any, Y: Any, ybar: Any, delta: Any, f: float) -> None:
        d = S.shape[0]
        # cuBLAS dgemm in float64; a merge (no rows) has only the rank-1 Chan term
        C = self.xp.ascontiguousarray(Y.T @ Y) if Y.shape[0] else self.xp.zeros((d, d))
        _checked(self._k.chan_update, S, C, ybar, delta, float(Y.shape[0]), float(f),
                 self._stream())

    def evaluate(self, X: Any, W: np.ndarray, b: np.ndarray, labels: np.ndarray, tile_rows: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """cuBLAS sgemm per row tile (all heads at once), fused warp top-5 scan kernel."""
        cp = self.xp
        Xd = cp.asarray(X)
        n, d = Xd.shape
        T, K = W.shape[:2]
        if not bool(cp.isfinite(Xd).all()):
            raise AffeqError("cannot evaluate: features contain NaN or Inf", NAN_FIX)
        Wd = cp.asarray(W.reshape(T * K, d))
        bd, ld = cp.asarray(b), cp.asarray(labels)
        auto = max(8, min(8192, (256 << 20) // max(1, 4 * T * K)) // 8 * 8)
        R = tile_rows if tile_rows > 0 else auto
        L = cp.empty((R, T * K), dtype=cp.float32)
        pred = cp.empty((T, n), dtype=cp.int32)
        flags = cp.zeros((T, n), dtype=cp.uint8)
        hits1 = cp.zeros(T, dtype=cp.uint64)
        hits5 = cp.zeros(T, dtype=cp.uint64)
        stream = self._stream()
        for row0 in range(0, n, R):
            r = min(R, n - row0)
            Xt = Xd[row0 : row0 + r]
            if Xt.dtype != cp.float32:
                Xt = Xt.astype(cp.float32)
            Lt = L[:r]
            cp.matmul(Xt, Wd.T, out=Lt)
            _checked(self._k.topk_scan, Lt, bd, ld, 0, row0, pred, flags, hits1, hits5, stream)
        correct = cp.empty((T, (n + 7) // 8), dtype=cp.uint8)
        _checked(self._k.pack_bits, flags, correct, stream)
        return (cp.asnumpy(hits1).astype(np.int64), cp.asnumpy(hits5).astype(np.int64),
                cp.asnumpy(pred), cp.asnumpy(correct))


def backend_for(device: str) -> Backend:
    """The backend object of a resolved device name (``cpu`` or ``cuda``)."""
    if device == "cuda":
        return CudaBackend()
    if device == "cpu":
        return CpuBackend()
    raise InternalError(f"backend_for got an unresolved device {device!r}")
