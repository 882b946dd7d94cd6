"""Benchmark: the layer-by-layer analysis of two networks costs one pass over the images.

One run (issue 26) on views of scikit-image's photos (``demo.photos``: fit photos and unseen test
photos), real weights, decoding in this process so every decode is counted:

1. plain extraction (``features.onnx``) of the fit views, then stage extraction (``stages.onnx``:
   every stage and the features) of the same views — decodes counted and wall time of each, the
   ratio stages / plain in the same run;
2. the stage extraction of the test views, then ``layer_analysis`` (CKA of every pair of stages,
   both depth curves) from the stores: its decodes (must be 0) and its time.

    python bench/depth.py --models efficientnet_lite0,mobilenet_v2 --views 6 --out /tmp/depth

Prints a JSON record (and writes the analysis's files into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import affeq_rt.data.loader as loader
from affeq_rt.demo.photos import FIT_PHOTOS, TEST_PHOTOS, write_views
from affeq_rt.method.depth import layer_analysis
from affeq_rt.method.extract import ImageOptions, extract
from affeq_rt.method.fit import FitOptions
from affeq_rt.report.depth import cka_text, depth_text, write_depth


def main() -> None:
    """Run the benchmark and print its record."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,mobilenet_v2")
    ap.add_argument("--views", type=int, default=6, help="views per photo")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--export-root", default=None)
    ap.add_argument("--out", default=None, help="folder for the analysis's files")
    ap.add_argument("--method", default="ridge", help="ols | ridge (λ on --holdout)")
    ap.add_argument("--holdout", type=float, default=0.2)
    args = ap.parse_args()
    models = args.models.split(",")
    decodes: list[str] = []
    real = loader.prepare_crops

    def counted(path, *a, **k):  # noqa: ANN001, ANN202 - the loader's own signature
        decodes.append(path)
        return real(path, *a, **k)

    loader.prepare_crops = counted
    opt = ImageOptions(batch_size=args.batch_size, workers=0, provider="cpu",
                       export_root=args.export_root)
    rec: dict = {"machine": platform.processor() or platform.machine(),
                 "load": os.getloadavg(), "models": models, "views": args.views,
                 "method": args.method, "holdout": args.holdout}
    with tempfile.TemporaryDirectory(prefix="affeq-depth-bench-") as tmp:
        t = Path(tmp)
        n_fit = write_views(t / "fit", FIT_PHOTOS, args.views, 0)
        n_test = write_views(t / "test", TEST_PHOTOS, args.views, 1)
        extract(models, t / "test", t / "warm", dtype="float32", images=opt,
                max_images=args.batch_size)  # exports and sessions warm before timing
        runs = {}
        for kind, stages in (("plain", False), ("stages", True)):
            decodes.clear()
            t0 = time.perf_counter()
            extract(models, t / "fit", t / f"fit_{kind}", dtype="float32", images=opt,
                    stages=stages)
            runs[kind] = {"seconds": time.perf_counter() - t0, "decodes": len(decodes),
                          "images": n_fit}
        extract(models, t / "test", t / "test_stages", dtype="float32", images=opt, stages=True)
        decodes.clear()
        t0 = time.perf_counter()
        la = layer_analysis(t / "fit_stages", models[0], models[-1], test=t / "test_stages",
                            method=args.method, options=FitOptions(holdout=args.holdout))
        runs["analysis"] = {"seconds": time.perf_counter() - t0, "decodes": len(decodes),
                            "rows": la.n, "stages": len(la.models), "test_images": n_test}
    rec["runs"] = runs
    rec["stages_over_plain_time"] = runs["stages"]["seconds"] / runs["plain"]["seconds"]
    rec["curves"] = [{"source": c.source, "target": c.target, "metric": c.metric,
                      "scores": [round(p.score, 2) for p in c.points]} for c in la.curves]
    print(depth_text(la))
    print(cka_text(la))
    if args.out:
        rec["files"] = {k: str(v) for k, v in write_depth(la, args.out).items()}
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
