"""Benchmark of the streaming Gram accumulator: throughput vs NumPy ``X.T @ X`` in the same run,
and accuracy vs a float64 reference on adversarial data (large offset, column scales 1e-3..1e3,
heavy tails).

    python bench/gram.py     # 2048 and 4320 columns, 16384 rows, 10^6-row accuracy check
    python bench/gram.py --rows 8192 --acc-rows 100000 --device cpu   # quicker
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from timing import interleaved, print_runs

from affeq_rt.core.gram import GramAccumulator, gram_reference


def throughput(rows: int, d: int, device: str, repeat: int, batch: int) -> None:
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((rows, d), dtype=np.float32) * 2 + 3).astype(np.float32)
    flops = rows * d * (d + 1)  # syrk: one multiply-add per upper-triangle entry and row

    def numpy_full() -> None:
        X.T @ X  # NumPy dispatches this transpose pair to BLAS ssyrk (+ a symmetric copy)

    # Steady state, what a long stream sees: one accumulator, its buffers already touched.
    warm = GramAccumulator(d, device=device)
    warm.update(X)
    warm.mean()

    def acc_full() -> None:
        warm.update(X)
        warm.mean()  # flushes the last partial block

    def acc_fresh() -> None:  # a new accumulator each time: buffer allocation and first touch timed
        g = GramAccumulator(d, device=device)
        g.update(X)
        g.mean()

    def acc_batched() -> None:
        for i in range(0, rows, batch):
            warm.update(X[i : i + batch])
        warm.mean()

    def numpy_batched() -> None:
        G = np.zeros((d, d))
        for i in range(0, rows, batch):
            Xb = X[i : i + batch]
            G += Xb.T @ Xb

    times, cpu = interleaved(
        {
            "numpy": numpy_full,
            "acc": acc_full,
            "acc_fresh": acc_fresh,
            "acc_batched": acc_batched,
            "numpy_batched": numpy_batched,
        },
        repeat,
    )
    t_np, t_acc, t_accb, t_npb = (
        min(times[k]) for k in ("numpy", "acc", "acc_batched", "numpy_batched")
    )
    print_runs(times, cpu, 3)
    paired = [a / b for a, b in zip(times["numpy"], times["acc"], strict=True)]
    print(
        "#   paired numpy/accumulator ratios (adjacent runs share the load): "
        + ", ".join(f"{r:.2f}" for r in paired),
        flush=True,
    )
    gf = lambda t: flops / t / 1e9  # noqa: E731
    print(
        f"| {rows}x{d} | numpy X.T@X {t_np:.3f}s ({gf(t_np):.1f} GF/s) | accumulator {t_acc:.3f}s "
        f"({gf(t_acc):.1f} GF/s) | ratio {t_np / t_acc:.2f} | new accumulator each time "
        f"{min(times['acc_fresh']):.3f}s, ratio {t_np / min(times['acc_fresh']):.2f} "
        f"| batches of {batch}: accumulator {t_accb:.3f}s,"
        f" numpy G+=Xb.T@Xb {t_npb:.3f}s, ratio {t_npb / t_accb:.2f} |",
        flush=True,
    )


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


def accuracy(rows: int, d: int, device: str) -> None:
    X = adversarial(rows, d)
    ref = gram_reference(X)
    dg = np.sqrt(np.diag(ref.scatter))
    norm = np.outer(dg, dg)

    def errs(S: np.ndarray) -> tuple[float, float]:
        e = np.abs(S - ref.scatter)
        return float((e / norm).max()), float(
            np.linalg.norm(S - ref.scatter) / np.linalg.norm(ref.scatter)
        )

    g = GramAccumulator(d, device=device)
    t0 = time.perf_counter()
    for i in range(0, rows, 4096):
        g.update(X[i : i + 4096])
    S = g.scatter()
    t = time.perf_counter() - t0
    X1 = np.hstack([X, np.ones((rows, 1), np.float32)])
    G32 = (X1.T @ X1).astype(np.float64)
    mu32 = G32[:d, d] / rows
    naive = G32[:d, :d] - rows * np.outer(mu32, mu32)
    mean_err = float((np.abs(g.mean() - ref.mean) / (dg / np.sqrt(rows))).max())
    a, b = errs(S)
    c, e = errs(naive)
    print(
        f"| adversarial {rows}x{d} | accumulator: max |ΔS|/sqrt(SiiSjj) {a:.2e}, "
        f"rel Frobenius {b:.2e}, "
        f"mean err {mean_err:.1e} σ ({t:.1f}s) | float32 X.T@X of [X 1]: {c:.2e}, {e:.2e} |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--dims", type=int, nargs="+", default=[2048, 4320])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--acc-rows", type=int, default=1_000_000)
    ap.add_argument("--acc-dim", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    from affeq_rt.core.backends import cpu_core

    print(
        f"# gram bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"{platform.processor() or ''}"
        f" device={a.device} blas={cpu_core().blas_config()} numpy={np.__version__}",
        flush=True,
    )
    for d in a.dims:
        throughput(a.rows, d, a.device, a.repeat, a.batch)
    if a.acc_rows:
        accuracy(a.acc_rows, a.acc_dim, a.device)


if __name__ == "__main__":
    main()
