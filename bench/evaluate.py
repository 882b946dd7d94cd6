"""Benchmark of batched folded-head evaluation against the bare matrix product (the floor) and a
straightforward chunked NumPy implementation (matmul, argmax, argpartition), all in the same run.

    python bench/evaluate.py                      # n=50,000, d in {1536, 4320}, K=1000, T=9
    python bench/evaluate.py --n 10000 --dims 1536  # quicker
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from timing import interleaved, print_runs

from affeq_rt.core import evaluate_heads
from affeq_rt.core.backends import cpu_core


def numpy_chunked(
    X: np.ndarray, W: np.ndarray, b: np.ndarray, labels: np.ndarray, chunk: int = 1024
):
    """The plain NumPy way: per chunk and head, logits = X W^T + b, argmax, argpartition top-5."""
    T = W.shape[0]
    top1 = np.zeros(T, np.int64)
    top5 = np.zeros(T, np.int64)
    pred = np.empty((T, len(X)), np.int32)
    for i in range(0, len(X), chunk):
        Xc, lc = X[i : i + chunk], labels[i : i + chunk]
        for t in range(T):
            lg = Xc @ W[t].T
            lg += b[t]
            p = lg.argmax(axis=1)
            pred[t, i : i + chunk] = p
            top1[t] += int(((p == lc) & (lc >= 0)).sum())
            t5 = np.argpartition(-lg, 5, axis=1)[:, :5]
            top5[t] += int(((t5 == lc[:, None]).any(axis=1) & (lc >= 0)).sum())
    return top1, top5, pred


def run(n: int, d: int, K: int, T: int, repeat: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    X = np.abs(rng.standard_normal((n, d), dtype=np.float32)).astype(dtype)  # ReLU-like features
    W = (rng.standard_normal((T, K, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    b = rng.standard_normal((T, K), dtype=np.float32) * 0.1
    labels = rng.integers(0, K, n)
    Xf = X.astype(np.float32) if X.dtype != np.float32 else X
    buf = np.empty((n, K), np.float32)
    core = cpu_core()
    flops = 2.0 * n * d * K * T

    def bare_numpy() -> None:  # the product alone, full height per head (NumPy's BLAS)
        for t in range(T):
            np.matmul(Xf, W[t].T, out=buf)

    def bare_core() -> (
        None
    ):  # the product alone, tiled exactly as the evaluation tiles it (our BLAS)
        core.evaluate(X, W, b, labels, 0, False)

    def ours() -> None:
        evaluate_heads(X, W, b, labels, device="cpu")

    def chunked() -> None:
        numpy_chunked(Xf, W, b, labels)

    # Interleaved repeats (A B C D A B C D ...), best of each: the machine is shared, load drifts.
    times, cpu = interleaved(
        {"bare_numpy": bare_numpy, "bare_core": bare_core, "ours": ours, "chunked": chunked}, repeat
    )
    t_bn, t_bc, t_us, t_np = (min(times[k]) for k in ("bare_numpy", "bare_core", "ours", "chunked"))
    print_runs(times, cpu, 2)
    floors = [min(a, b) for a, b in zip(times["bare_numpy"], times["bare_core"], strict=True)]
    print(
        "#   paired ours/floor: "
        + ", ".join(f"{u / f:.3f}" for u, f in zip(times["ours"], floors, strict=True))
        + "; paired chunked/ours: "
        + ", ".join(f"{c / u:.2f}" for c, u in zip(times["chunked"], times["ours"], strict=True)),
        flush=True,
    )
    res = evaluate_heads(X, W, b, labels, device="cpu")
    ref = numpy_chunked(Xf, W, b, labels)
    agree = float((res.pred == ref[2]).mean())
    floor = min(t_bn, t_bc)
    print(
        f"| n={n} d={d} K={K} T={T} {dtype} | bare numpy matmul {t_bn:.2f}s "
        f"({flops / t_bn / 1e9:.0f} GF/s) | bare tiled core sgemm {t_bc:.2f}s "
        f"| evaluate_heads {t_us:.2f}s ({flops / t_us / 1e9:.0f} GF/s) "
        f"| chunked numpy {t_np:.2f}s | ours/floor {t_us / floor:.3f} "
        f"| numpy/ours {t_np / t_us:.2f} "
        f"| argmax agreement {agree:.5f} |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dims", type=int, nargs="+", default=[1536, 4320])
    ap.add_argument("--K", type=int, default=1000)
    ap.add_argument("--T", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    a = ap.parse_args()
    print(
        f"# evaluate bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"threads={cpu_core().num_threads()}"
        f" blas={cpu_core().blas_config()} numpy={np.__version__}",
        flush=True,
    )
    for d in a.dims:
        run(a.n, d, a.K, a.T, a.repeat, a.dtype)


if __name__ == "__main__":
    main()
