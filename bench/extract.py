"""Benchmark: decode-once extraction for k networks vs running the networks one by one.

Both modes run in the same process on the same images with the same sessions, so the only
difference is how often each image is decoded and preprocessed (once vs k times):

    python bench/extract.py --models mobilenet_v2,efficientnet_lite0,googlenet --images 96 \
        --random-weights --workers 2 --batch-size 16

Without ``--data`` it writes ``--images`` JPEGs made from scikit-image's sample photos (random
crops, so no two files are equal) into a temporary folder. Prints a JSON record and a Markdown row
for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from affeq_rt.data.loader import iter_batches
from affeq_rt.data.readers import discover
from affeq_rt.method.extract import feature_batches, open_networks, parse_models


def make_photos(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct JPEGs (random crops of scikit-image's sample photos, 400-640 px)."""
    import skimage.data as d
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
             "immunohistochemistry", "camera", "coins", "moon", "brick", "grass", "clock"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = [np.asarray(getattr(d, n)()) for n in names]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        a = base[i % len(base)]
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        Image.fromarray(a[y:y + ch, x:x + cw]).save(folder / f"img_{i:05d}.jpg", quality=90)


def run(nets: list, samples: list, batch_size: int, workers: int) -> tuple[float, int]:
    """Seconds to push every sample through ``nets`` with one shared decode; rows produced."""
    t0 = time.perf_counter()
    rows = 0
    for batch, feats in feature_batches(nets, samples, batch_size, workers):
        rows += int(batch.ok.sum())
        assert all(f.shape[0] == int(batch.ok.sum()) for f in feats.values())
    return time.perf_counter() - t0, rows


def run_loader(specs: list, samples: list, batch_size: int, workers: int) -> float:
    """Seconds for the decode-once loader alone (decode + preprocess for ``specs``, no network)."""
    t0 = time.perf_counter()
    for _ in iter_batches(samples, specs, batch_size=batch_size, workers=workers):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_lite0,googlenet")
    ap.add_argument("--data", default=None, help="image folder (default: generated photos)")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--export-root", default=None)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the modes this many times")
    args = ap.parse_args()

    names = parse_models(args.models)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "photos"
        if not args.data:
            make_photos(data, args.images)
        samples = discover(data).head(args.images).samples
        nets = open_networks(names, provider=args.provider, export_root=args.export_root,
                             random_weights=args.random_weights)
        run(nets, samples[: args.batch_size], args.batch_size, 0)  # warm up sessions
        once, separate, l_once, l_sep = [], [], [], []
        specs = [n.spec for n in nets]
        for _ in range(args.repeats):
            once.append(run(nets, samples, args.batch_size, args.workers)[0])
            separate.append(sum(run([n], samples, args.batch_size, args.workers)[0]
                                for n in nets))
            l_once.append(run_loader(specs, samples, args.batch_size, args.workers))
            l_sep.append(sum(run_loader([s], samples, args.batch_size, args.workers)
                             for s in specs))
    n = len(samples)
    t1, t2 = min(once), min(separate)
    rec = {"models": names, "images": n, "batch_size": args.batch_size, "workers": args.workers,
           "provider": getattr(nets[0].session, "provider", args.provider),
           "decode_once_s": t1, "one_by_one_s": t2, "decode_once_img_s": n / t1,
           "one_by_one_img_s": n / t2, "speedup": t2 / t1,
           "loader_only_decode_once_img_s": n / min(l_once),
           "loader_only_one_by_one_img_s": n / min(l_sep),
           "distinct_preprocessings": len({n.key for n in nets}), "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(),
           "random_weights": args.random_weights}
    print(json.dumps(rec, indent=2))
    print(f"| {len(names)} ({', '.join(names)}) | {n} | {args.batch_size} | {args.workers} | "
          f"{rec['decode_once_img_s']:.1f} | {rec['one_by_one_img_s']:.1f} | "
          f"{rec['speedup']:.2f}× | {rec['loader_only_decode_once_img_s']:.1f} | "
          f"{rec['loader_only_one_by_one_img_s']:.1f} |")


if __name__ == "__main__":
    main()
