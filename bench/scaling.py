"""Benchmark: ``extract`` on a local Ray cluster with 1 and 2 workers against ``--executor local``
on this machine, and the per-image cost of the networks in FLOP (for docs/SCALING.md's estimate).

    python bench/scaling.py --models mobilenet_v2,efficientnet_lite0 --images 192 \
        --random-weights --batch-size 16

Every run extracts the same JPEGs (crops of scikit-image's photos, ``bench/extract.py``) into a
fresh store, alternated (local, ray×1, ray×2, local, …), best of ``--repeats``; the Ray cluster is
started once before timing (as a real cluster would be), so the Ray figures include starting the
worker actors and opening their sessions, the fixed cost of a run. Every Ray store is checked byte
for byte against the local one. Prints a JSON record and Markdown rows for docs/BENCHMARKS.md.
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

from extract import make_photos

from affeq_rt.cluster.ray import RayExecutor, import_ray
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract, parse_models
from affeq_rt.registry.spec import get_spec


def gflop_per_image(name: str) -> float:
    """Forward FLOP of one image through the network (torch's FlopCounterMode, meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from affeq_rt.model.build import build_arch

    spec = get_spec(name)
    with torch.device("meta"):
        model = build_arch(spec, False).eval()
    s = spec.preprocessing.input_size
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, s, s, device="meta"))
    return counter.get_total_flops() / 1e9


def store_bytes(path: Path) -> dict[str, bytes]:
    """Every data file of a store (the manifest holds run timings)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--export-root", default=None)
    args = ap.parse_args()
    ray = import_ray()
    names = parse_models(args.models)
    tmp = Path(tempfile.mkdtemp(prefix="affeq-scaling-"))
    make_photos(tmp / "photos", args.images)
    opts = ImageOptions(batch_size=args.batch_size, workers=0, random_weights=args.random_weights,
                        export_root=args.export_root)
    extract(names, tmp / "photos", tmp / "warm", options=ExtractOptions(dtype="float32"),
            images=opts)  # exports, caches
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    runs = {"local": None, "ray-1": 1, "ray-2": 2}
    best: dict[str, float] = {}
    start: dict[str, float] = {}
    ref = store_bytes(tmp / "warm")
    for rep in range(args.repeats):
        for label, workers in runs.items():
            out = tmp / f"{label}-{rep}"
            ex = (None if workers is None else
                  RayExecutor(workers=workers, shard_size=args.shard_size))
            t0 = time.perf_counter()
            extract(names, tmp / "photos", out,
                    options=ExtractOptions(dtype="float32", executor=ex), images=opts)
            dt = time.perf_counter() - t0
            if store_bytes(out) != ref:
                raise SystemExit(f"{label}: the store differs from the local one")
            if dt < best.get(label, float("inf")):
                best[label], start[label] = dt, ex.start_s if ex is not None else 0.0
            print(f"# {label} repeat {rep}: {dt:.2f} s (workers started in "
                  f"{ex.start_s if ex is not None else 0.0:.2f} s)", flush=True)
            shutil.rmtree(out)
    ray.shutdown()
    shutil.rmtree(tmp)
    rate = {k: args.images / v for k, v in best.items()}
    flops = {m: gflop_per_image(m) for m in names}
    rec = {"models": names, "images": args.images, "batch_size": args.batch_size,
           "shard_size": args.shard_size, "cores": os.cpu_count(), "machine": platform.machine(),
           "img_per_s": rate, "ratio_vs_local": {k: rate[k] / rate["local"] for k in rate},
           "ray1_overhead": best["ray-1"] / best["local"] - 1.0,
           "worker_start_s": start,
           "ray1_overhead_after_start": (best["ray-1"] - start["ray-1"]) / best["local"] - 1.0,
           "gflop_per_image": flops,
           "effective_gflop_per_s_local": rate["local"] * sum(flops.values())}
    print(json.dumps(rec, indent=1))
    print(f"| {len(names)} ({', '.join(names)}) | {args.images} | {args.batch_size} | "
          f"{rate['local']:.2f} | {rate['ray-1']:.2f} ({rec['ratio_vs_local']['ray-1']:.2f}×) | "
          f"{rate['ray-2']:.2f} ({rec['ratio_vs_local']['ray-2']:.2f}×) | "
          f"{100 * rec['ray1_overhead']:+.0f} % | {start['ray-1']:.1f} s | "
          f"{100 * rec['ray1_overhead_after_start']:+.0f} % |")


if __name__ == "__main__":
    main()
