"""Latency of a hybrid model vs A's own model vs chaining the parts, measured in one run.

Three ways to label images with network A's features, all through ``runtime.create_session``:
  * ``A own``    — one ONNX graph: A's features + A's own classifier (built by the same composer);
  * ``hybrid``   — one ONNX graph: A's features + the map folded into B's classifier (one Gemm);
  * ``chained``  — the naive pipeline: A's features session → map in NumPy → B's classifier.onnx
                   session → softmax in NumPy.
The target is hybrid / A-own ≤ 1.02 at batch 1 and 32. Calls are interleaved (one of each variant
per iteration, order rotating); times are medians, ratios the median of per-iteration ratios.

    python bench/hybrid_latency.py                                   # lite0 → mobilenet_v2
    python bench/hybrid_latency.py --src pnasnet --dst resnet152 --random-weights --seconds 120
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from affeq_rt.deploy.compose import compose_hybrid
from affeq_rt.deploy.hybrid import build_hybrid
from affeq_rt.io.maps import AffineMap, load_maps
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import get_spec


def _random_map(src: str, dst: str, d_src: int, d_dst: int, seed: int = 0) -> AffineMap:
    """A map with the right shapes (latency does not depend on its values)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_dst, d_src)) / np.sqrt(d_src)).astype(np.float32)
    return AffineMap(src, dst, w, np.zeros(d_dst, np.float32), "random", {"images": 0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="efficientnet_lite0")
    ap.add_argument("--dst", default="mobilenet_v2")
    ap.add_argument("--maps", default=None, help="maps file (default: a random map of the shape)")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seconds", type=float, default=40.0, help="time budget per batch size")
    ap.add_argument("--min-iters", type=int, default=15, help="at least this many iterations")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT default)")
    ap.add_argument("--export-root", default=None)
    args = ap.parse_args()

    sa, sb = get_spec(args.src), get_spec(args.dst)
    root = Path(args.export_root) if args.export_root else None
    ea = ensure_exported(sa.name, root=root, random_weights=args.random_weights)
    eb = ensure_exported(sb.name, root=root, random_weights=args.random_weights)
    amap = (load_maps(args.maps)[(sa.name, sb.name)] if args.maps
            else _random_map(sa.name, sb.name, sa.feature_dim, sb.feature_dim))
    threads = args.threads or None

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        hyb = build_hybrid(amap, ea, eb, out=Path(tmp) / "hyb.onnx")
        ha = ea.head()
        own = compose_hybrid(onnx.load(str(ea.features_path)), ha.weight, ha.bias,
                             sa.preprocessing)
        own_path = Path(tmp) / "own.onnx"
        own_path.write_bytes(own.SerializeToString())
        s_own = create_session(own_path, provider="cpu", threads=threads).session
        s_hyb = create_session(hyb, provider="cpu", threads=threads).session
        s_fa = create_session(ea.features_path, provider="cpu", threads=threads).session
        s_cb = create_session(eb.classifier_path, provider="cpu", threads=threads).session
        mw, mb = amap.weight.T.copy(), amap.bias

        def chained(x: np.ndarray) -> np.ndarray:
            f = s_fa.run(None, {"image": x})[0]
            logits = s_cb.run(None, {s_cb.get_inputs()[0].name: f @ mw + mb})[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        variants = {
            "A own": lambda x: s_own.run(None, {"image": x}),
            "hybrid": lambda x: s_hyb.run(None, {"image": x}),
            "chained": chained,
        }
        print(f"# {sa.name} -> {sb.name}  ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, threads={threads or 'ORT default'}, "
              f"random_weights={args.random_weights})")
        print(f"{'batch':>5}  {'iters':>5}  {'A own ms':>9}  {'hybrid ms':>9}  {'chained ms':>10}  "
              f"{'hybrid/A':>8}  {'chained/A':>9}")
        rng = np.random.default_rng(0)
        for bs in [int(b) for b in args.batches.split(",")]:
            x = rng.standard_normal((bs, 3, sa.input_size, sa.input_size)).astype(np.float32)
            for fn in variants.values():  # warm-up
                fn(x)
            times: dict[str, list[float]] = {k: [] for k in variants}
            t_end = time.perf_counter() + args.seconds
            # One call of each variant per iteration, in rotating order: load drifts hit all alike,
            # and the paired per-iteration ratios cancel them.
            it = 0
            while it < args.min_iters or time.perf_counter() < t_end:
                names = list(variants)
                names = names[it % 3:] + names[:it % 3]
                for k in names:
                    t0 = time.perf_counter()
                    variants[k](x)
                    times[k].append((time.perf_counter() - t0) * 1e3)
                it += 1
            med = {k: statistics.median(v) for k, v in times.items()}
            r_h = statistics.median(h / a for h, a in zip(times["hybrid"], times["A own"],
                                                          strict=True))
            r_c = statistics.median(c / a for c, a in zip(times["chained"], times["A own"],
                                                          strict=True))
            print(f"{bs:>5}  {it:>5}  {med['A own']:>9.2f}  {med['hybrid']:>9.2f}  "
                  f"{med['chained']:>10.2f}  {r_h:>8.3f}  {r_c:>9.3f}")


if __name__ == "__main__":
    main()
