"""Benchmark of the streaming Gram accumulator: its numerics options, side by side in one run.

Options (same blocks of rows, same float64 shift by the running mean, same float64 Chan merge; only
the block product differs):

* ``f64``: what GramAccumulator does — float64 blocks, OpenBLAS ``dsyrk`` (the default).
* ``f32``: float32 blocks, ``ssyrk`` (the old default; NumPy's float32 ``Y.T @ Y`` is ssyrk).
* ``ozaki``: float32 blocks with an exact compensation: each float64 block is split per column into
  ``--slices`` float32 slices of 8 bits (a shared power-of-two scale per column), so every float32
  product of two slices summed over ≤ 256 rows is exact; slice pairs with p + q ≤ slices + 1 are
  multiplied with float32 GEMMs and added in float64 (an Ozaki-scheme Gram, in NumPy).

Throughput is the ratio to NumPy's float32 ``X.T @ X`` (the ssyrk baseline) in the same run;
accuracy is the scatter against a float64 two-pass reference on adversarial data, and the OLS map
against float64 lstsq on a source with cond(X) = 1e6 (the issue's case).

    python bench/gram.py                       # 16384 rows x {1024, 2048}; accuracy checks
    python bench/gram.py --rows 8192 --dims 512 --acc-rows 50000   # quicker
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections.abc import Callable

import numpy as np
from timing import interleaved, print_runs

from affeq_rt.core import GramAccumulator, gram_reference
from affeq_rt.core.backends import cpu_core
from affeq_rt.method import solvers

EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)


# ---- block products of the three options: Y (m x d float64, shifted) -> Y^T Y (float64, full)
def prod_f32(Y: np.ndarray) -> np.ndarray:
    Y32 = Y.astype(np.float32)
    return (Y32.T @ Y32).astype(np.float64)


def prod_f64(Y: np.ndarray) -> np.ndarray:
    return Y.T @ Y


def ozaki_slices(Y: np.ndarray, slices: int, bits: int = 8) -> list[np.ndarray]:
    """float32 slices s_1..s_k of Y with Σ s_t ≈ Y: per column, s_t holds bits (t-1)·b..t·b of
    the value scaled by 2^-e_j (e_j = the column's max exponent), each exactly a float32."""
    mx = np.abs(Y).max(axis=0)
    e = np.ceil(np.log2(np.where(mx > 0, mx, 1.0)))
    scale = np.exp2(e)
    r = Y / scale  # |r| <= 1, exact (power of two)
    out = []
    for t in range(1, slices + 1):
        q = np.exp2(bits * t)
        s = np.trunc(r * q) / q  # integer multiple of 2^-bt, |s| < 2^-b(t-1): <= b+1 bits
        out.append((s * scale).astype(np.float32))
        r = r - s
    return out


def prod_ozaki(Y: np.ndarray, slices: int, chunk: int = 256) -> np.ndarray:
    """Σ over slice pairs (p + q <= slices + 1) of exact float32 products over 256-row chunks."""
    d = Y.shape[1]
    C = np.zeros((d, d))
    for i in range(0, Y.shape[0], chunk):
        S = ozaki_slices(Y[i : i + chunk], slices)
        for p in range(slices):
            for q in range(slices - p):
                C += (S[p].T @ S[q]).astype(np.float64)  # 8+8 bits x 256 rows: exact in float32
    return C


def blocked_scatter(X: np.ndarray, prod: Callable[[np.ndarray], np.ndarray], block: int = 4096
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The accumulator's algorithm with a pluggable block product: (mean, scatter)."""
    d = X.shape[1]
    n, mean, S = 0, np.zeros(d), np.zeros((d, d))
    for i in range(0, len(X), block):
        Xb = X[i : i + block].astype(np.float64)
        m = len(Xb)
        c = mean if n else Xb.mean(axis=0)
        Y = Xb - c
        ybar = Y.mean(axis=0)
        bm = c + ybar
        Cb = prod(Y) - m * np.outer(ybar, ybar)
        if n == 0:
            S, mean = Cb, bm
        else:
            delta = bm - mean
            S += Cb + (n * m / (n + m)) * np.outer(delta, delta)
            mean = mean + delta * (m / (n + m))
        n += m
    return mean, S


class Moments:
    """Moments of a fixed scatter for the solvers (``eps`` = precision of its products)."""

    def __init__(self, n: int, mean: np.ndarray, S: np.ndarray, eps: float) -> None:
        self.n, self._mean, self._S, self.eps = n, mean, S, eps

    def mean(self) -> np.ndarray:
        return self._mean

    def scatter(self, rows: slice, cols: slice) -> np.ndarray:
        return self._S[rows, cols]


# ---- throughput
def throughput(rows: int, d: int, repeat: int, slices: int) -> None:
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((rows, d), dtype=np.float32) * 2 + 3).astype(np.float32)
    Y64 = X.astype(np.float64) - 3.0
    flops = rows * d * (d + 1)  # syrk: one multiply-add per upper-triangle entry and row

    warm = GramAccumulator(d, device="cpu")
    warm.update(X)
    warm.mean()

    def acc() -> None:  # steady state: one accumulator, buffers touched
        warm.update(X)
        warm.mean()

    fns: dict[str, Callable[[], object]] = {
        "numpy_f32": lambda: X.T @ X,  # NumPy: ssyrk (+ symmetric copy), the float32 baseline
        "numpy_f64": lambda: Y64.T @ Y64,  # NumPy: dsyrk
        "acc_f64": acc,
    }
    if slices and d <= 1024:  # NumPy Ozaki is slow: time 1024 rows, scale to the block
        blk = Y64[:1024]
        fns["ozaki_1024rows"] = lambda: prod_ozaki(blk, slices)
    times, cpu = interleaved(fns, repeat)
    print_runs(times, cpu, 3)
    best = {k: min(v) for k, v in times.items()}
    gf = lambda t: flops / t / 1e9  # noqa: E731
    line = (f"| {rows}x{d} | NumPy f32 X.T@X (ssyrk) {best['numpy_f32']:.3f}s "
            f"({gf(best['numpy_f32']):.1f} GF/s) | NumPy f64 {best['numpy_f64']:.3f}s | "
            f"accumulator (f64 dsyrk) {best['acc_f64']:.3f}s ({gf(best['acc_f64']):.1f} GF/s), "
            f"time ratio to ssyrk baseline {best['acc_f64'] / best['numpy_f32']:.2f}, "
            f"to NumPy f64 {best['acc_f64'] / best['numpy_f64']:.2f}")
    if "ozaki_1024rows" in best:
        t_oz = best["ozaki_1024rows"] * rows / 1024
        line += (f" | ozaki({slices} slices, NumPy) ≈{t_oz:.2f}s, ratio to ssyrk "
                 f"{t_oz / best['numpy_f32']:.1f}")
    print(line + " |", flush=True)


# ---- accuracy
def adversarial(rows: int, d: int, seed: int = 0, offset: float = 1e4) -> np.ndarray:
    """Offset ~1e4, column scales logspace(-3, 3), Student-t(3) tails, float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, d), np.float32)
    scales = np.logspace(-3, 3, d)
    shift = offset * (1 + 0.1 * rng.uniform(-1, 1, d))
    for i in range(0, rows, 100_000):
        z = rng.standard_t(df=3, size=(min(100_000, rows - i), d))
        out[i : i + len(z)] = shift + scales * z
    return out


def ill_conditioned(n: int, d: int, db: int, cond: float, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Source with singular values log-spaced over [1, 1/cond]; target = linear image + noise."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d))
    g -= g.mean(0)
    q = g @ np.linalg.inv(np.linalg.cholesky(g.T @ g).T)
    v = np.linalg.qr(rng.standard_normal((d, d)))[0]
    a = ((q * np.logspace(0, -np.log10(cond), d) * np.sqrt(n)) @ v.T
         + rng.uniform(-1, 1, d)).astype(np.float32)
    y = (a.astype(np.float64) @ rng.standard_normal((db, d)).T
         + 0.01 * rng.standard_normal((n, db)) + 2).astype(np.float32)
    return a, y


def accuracy(rows: int, d: int, slices: int) -> None:
    X = adversarial(rows, d)
    ref = gram_reference(X)
    dg = np.sqrt(np.diag(ref.scatter))

    def errs(S: np.ndarray) -> str:
        e = np.abs(S - ref.scatter)
        return (f"{(e / np.outer(dg, dg)).max():.1e}, "
                f"{np.linalg.norm(S - ref.scatter) / np.linalg.norm(ref.scatter):.1e}")

    g = GramAccumulator(d, device="cpu")
    for i in range(0, rows, 4096):
        g.update(X[i : i + 4096])
    out = [f"accumulator (f64 dsyrk) {errs(g.scatter())}",
           f"f32 ssyrk blocks {errs(blocked_scatter(X, prod_f32)[1])}"]
    if slices:
        oz = blocked_scatter(X, lambda Y: prod_ozaki(Y, slices))[1]
        out.append(f"ozaki({slices}) {errs(oz)}")
    head = f"| adversarial {rows}x{d}: max |ΔS|/sqrt(SiiSjj), rel. Frobenius | "
    print(head + " | ".join(out) + " |", flush=True)


def map_accuracy(n: int, d: int, slices: int) -> None:
    db = 8
    a, y = ill_conditioned(n + 2000, d, db, 1e6)
    a_tr, y_tr, a_te = a[:n], y[:n], a[n:].astype(np.float64)
    z = np.hstack([a_tr.astype(np.float64), np.ones((n, 1))])
    sol = np.linalg.lstsq(z, y_tr.astype(np.float64), rcond=None)[0]
    ref = a_te @ sol[:-1] + sol[-1]
    yc = np.linalg.norm(y[n:] - y[n:].mean(0))
    x = np.hstack([a_tr, y_tr])
    sa, sb = slice(0, d), slice(d, d + db)
    opts: dict[str, Moments] = {}
    g = GramAccumulator(d + db, device="cpu")
    for i in range(0, n, 4096):
        g.update(np.ascontiguousarray(x[i : i + 4096]))
    opts["accumulator (f64 dsyrk)"] = Moments(n, g.mean(), g.scatter(), g.eps)
    opts["f32 ssyrk blocks"] = Moments(n, *blocked_scatter(x, prod_f32), EPS32)
    if slices:
        mu, S = blocked_scatter(x, lambda Y: prod_ozaki(Y, slices))
        opts[f"ozaki({slices})"] = Moments(n, mu, S, 2.0 ** (-8 * slices))
    out = []
    for name, m in opts.items():
        for rc, lab in ((None, "rcond=d·eps"), (1e-7, "old 1e-7")):
            w, b, st = solvers.ols(m, sa, sb, rcond=rc)
            err = np.linalg.norm(a_te @ w.T + b - ref) / yc
            out.append(f"{name} {lab}: rank {st['rank']}/{d}, held-out Δpred {err:.1e}")
    print(f"| OLS map, cond(X)=1e6, n={n}, d={d}, vs float64 lstsq | " + " | ".join(out) + " |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slices", type=int, default=7, help="Ozaki slices of 8 bits (0: skip)")
    ap.add_argument("--acc-rows", type=int, default=200_000)
    ap.add_argument("--acc-dim", type=int, default=256)
    ap.add_argument("--map-rows", type=int, default=20_000)
    a = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                  if ln.startswith("Model name")), platform.processor())
    print(f"# gram bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} cpu={model!r} "
          f"threads={cpu_core().num_threads()} blas={cpu_core().blas_config()} "
          f"numpy={np.__version__}", flush=True)
    for d in a.dims:
        throughput(a.rows, d, a.repeat, a.slices)
    if a.acc_rows:
        accuracy(a.acc_rows, a.acc_dim, a.slices)
    if a.map_rows:
        map_accuracy(a.map_rows, a.acc_dim, a.slices)


if __name__ == "__main__":
    main()
