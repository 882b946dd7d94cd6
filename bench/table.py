"""Benchmark of the whole N×N evaluation (``evaluate.evaluate``: folded heads, one compiled pass per
source) on a float16 feature store with the thesis's 10 feature widths, against the baseline of
evaluating every pair unfolded in NumPy (map the features, then classify, then top-1/top-5).

    python bench/table.py                          # n = 5000 and 10000, extrapolated to 50,000
    python bench/table.py --n 50000 --device cpu   # the full size directly
    python bench/table.py --n 2000 --baseline-n 500 --dims 1024,2048,1536   # a quick look

The fixed cost (loading the maps file, folding N·(N−1) heads in float64) does not depend on n and
the passes are linear in n; the extrapolation to --target (50,000) is printed beside the
measurements (folded: fixed cost + passes scaled by n; unfolded: linear in n). The store and
maps file are written under --work (several GB at full size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from affeq_rt.core.backends import resolve_device
from affeq_rt.data.readers import Sample
from affeq_rt.io.maps import AffineMap, MapSet, load_maps, save_maps
from affeq_rt.io.store import ArrayStore, FeatureStore, StoreConfig, StoreWriter
from affeq_rt.method.evaluate import evaluate

THESIS_DIMS = (1024, 1024, 1792, 2048, 2048, 2048, 1536, 1536, 4032, 4320)
K = 1000


def make_store(path: Path, dims: list[int], n: int, seed: int = 0) -> list[str]:
    """A float16 FeatureStore of ``n`` synthetic rows per network (written chunk by chunk)."""
    rng = np.random.default_rng(seed)
    names = [f"net{i}_{d}" for i, d in enumerate(dims)]
    heads = {}
    for m, d in zip(names, dims, strict=True):
        heads[m] = ((rng.standard_normal((K, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32),
                    (0.1 * rng.standard_normal(K)).astype(np.float32))
    cfg = StoreConfig(models=names, dims=dict(zip(names, dims, strict=True)),
                      specs={m: {"name": m, "label_offset": 0} for m in names},
                      exports={m: "synthetic" for m in names},
                      data={"n_samples": n, "fingerprint": f"synthetic-{seed}-{n}",
                            "source": "bench/table.py synthetic"}, dtype="float16",
                      batch_size=4096)
    w = StoreWriter(path, cfg, heads)
    for row0 in range(0, n, 4096):
        r = min(4096, n - row0)
        for m, d in zip(names, dims, strict=True):
            w.write(m, row0, rng.standard_normal((r, d), dtype=np.float32))
        w.commit(row0 + r, row0 + r, [])
    labels = rng.integers(0, K, n)
    w.finalise([Sample(f"synthetic/{i}", int(labels[i])) for i in range(n)])
    return names


def make_maps(path: Path, names: list[str], dims: list[int], seed: int = 1) -> None:
    """Random maps for every ordered pair, in the maps file format."""
    rng = np.random.default_rng(seed)
    maps = []
    for a, da in zip(names, dims, strict=True):
        for b, db in zip(names, dims, strict=True):
            if a != b:
                wt = (rng.standard_normal((db, da), dtype=np.float32) / np.sqrt(da))
                maps.append(AffineMap(a, b, wt.astype(np.float32),
                                      rng.standard_normal(db).astype(np.float32), "random"))
    save_maps(path, MapSet(maps))


def run_folded(store_path: Path, maps_path: Path, n: int, device: str) -> dict[str, float]:
    """Time ``evaluate`` on the first n rows: maps loading and the table separately."""
    st = FeatureStore.open(store_path)
    view = st if n == st.n else ArrayStore(
        {m: st.features(m)[:n] for m in st.models},
        {m: (st.head(m).weight, st.head(m).bias) for m in st.models},  # offsets are 0 here
        st.labels[:n], {m: st.spec(m) for m in st.models})
    t0 = time.perf_counter()
    maps = load_maps(maps_path)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = evaluate(view, maps, device=device)
    t_eval = time.perf_counter() - t0
    assert table.top1.shape == (len(st.models),) * 2
    return {"n": n, "load_maps_s": t_load, "table_s": t_eval, "total_s": t_load + t_eval,
            "fold_s": table.timings["fold_s"], "pass_s": table.timings["pass_s"]}


def run_unfolded(store_path: Path, maps_path: Path, n: int, chunk: int = 2048) -> dict[str, float]:
    """Baseline: per pair, map then classify in NumPy float32, top-1/top-5 by argpartition."""
    st = FeatureStore.open(store_path)
    t0 = time.perf_counter()
    maps = load_maps(maps_path)
    t_load = time.perf_counter() - t0
    labels = st.labels[:n]
    t0 = time.perf_counter()
    hits = 0
    for a in st.models:
        x_all = st.features(a)
        for b in st.models:
            head = st.head(b)
            w, bias = head.weight, head.bias
            for s in range(0, n, chunk):
                x = np.asarray(x_all[s:min(n, s + chunk)], np.float32)
                if a != b:
                    x = maps[a, b](x)
                logits = x @ w.T + bias
                y = labels[s:s + len(x)]
                top5 = np.argpartition(-logits, 5, axis=1)[:, :5]
                hits += int((top5 == y[:, None]).any(1).sum() + (logits.argmax(1) == y).sum())
    t_eval = time.perf_counter() - t0
    return {"n": n, "load_maps_s": t_load, "table_s": t_eval, "total_s": t_load + t_eval}


def _fit(points: list[dict[str, float]], key: str, target: int) -> float:
    """Extrapolate ``key`` to n = target: t = a + b·n from two or more points, t ∝ n from one."""
    ns = np.array([p["n"] for p in points], float)
    ts = np.array([p[key] for p in points], float)
    if len(points) == 1:
        return float(ts[0] / ns[0] * target)
    b, a = np.polyfit(ns, ts, 1)
    return float(a + b * target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", default="5000,10000", help="row counts to time (comma separated)")
    ap.add_argument("--baseline-n", default="500,1000", help="row counts for the NumPy baseline")
    ap.add_argument("--dims", default=",".join(map(str, THESIS_DIMS)))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--target", type=int, default=50000, help="n to extrapolate to")
    ap.add_argument("--work", default=None, help="folder for the synthetic store and maps")
    ap.add_argument("--keep", action="store_true", help="keep the store and maps afterwards")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    ns = [int(x) for x in args.n.split(",") if x]
    bns = [int(x) for x in args.baseline_n.split(",") if x]
    work = Path(args.work or tempfile.mkdtemp(prefix="affeq-bench-table-"))
    work.mkdir(parents=True, exist_ok=True)
    store_path, maps_path = work / "store", work / "maps.safetensors"
    t0 = time.perf_counter()
    if not (store_path / "manifest.json").is_file():
        names = make_store(store_path, dims, max(ns + bns))
    else:
        names = FeatureStore.open(store_path).models
    if not maps_path.is_file():
        make_maps(maps_path, names, dims)
    print(f"# synthetic float16 store {len(dims)} nets × {max(ns + bns)} rows, dims {dims}, "
          f"K={K}; built in {time.perf_counter() - t0:.1f}s under {work}", flush=True)
    dev = resolve_device(args.device)
    folded = []
    for n in ns:
        r = run_folded(store_path, maps_path, n, dev)
        folded.append(r)
        print(f"folded   n={n:6d}: load maps {r['load_maps_s']:.1f}s, table {r['table_s']:.1f}s "
              f"(float64 folds {r['fold_s']:.1f}s, compiled passes {r['pass_s']:.1f}s)",
              flush=True)
    base = []
    for n in bns:
        r = run_unfolded(store_path, maps_path, n)
        base.append(r)
        print(f"unfolded n={n:6d}: load maps {r['load_maps_s']:.1f}s, table {r['table_s']:.1f}s",
              flush=True)
    # folded: the float64 folds do not depend on n; the compiled passes are linear in n
    est_f = (np.mean([p["fold_s"] + p["load_maps_s"] for p in folded]) +
             _fit(folded, "pass_s", args.target))
    est_b = (_fit(base, "table_s", args.target) + np.mean([p["load_maps_s"] for p in base])
             if base else float("nan"))
    out = {"device": dev, "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "dims": dims, "K": K,
           "folded": folded, "unfolded": base, "target": args.target,
           "folded_estimate_s": est_f, "unfolded_estimate_s": est_b,
           "speedup_estimate": est_b / est_f}
    print(f"estimate for n={args.target}: folded {est_f:.0f}s (incl. maps loading), "
          f"unfolded NumPy {est_b:.0f}s, speed-up {est_b / est_f:.1f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
