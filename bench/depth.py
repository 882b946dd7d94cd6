"""Benchmark: the layer-by-layer analysis of two networks costs one pass over the images.

One run (issue 26) on views of scikit-image's photos (``demo.photos``: fit photos and unseen test
photos), real weights, decoding in this process so every decode is counted:

1. plain extraction (``features.onnx``) of the fit views, then stage extraction (``stages.onnx``:
   every stage and the features) of the same views — decodes counted and wall time of each, the
   ratio stages / plain in the same run;
2. the stage extraction of the test views, then ``layer_analysis`` (every measure of every pair
   of stages, both depth curves with their controls) from the stores: its decodes (must be 0)
   and its time; with ``--compare TREE`` also the same analysis by the code in TREE (a checkout
   with its compiled core, run in a subprocess on the same stores, alternating), for the ratio.

    python bench/depth.py --models efficientnet_lite0,mobilenet_v2 --views 6 --out /tmp/depth
    python bench/depth.py --random --method ols --compare /tmp/old   # with lite0~random stages

Prints a JSON record (and writes the analysis's files into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import affeq_rt.data.loader as loader
from affeq_rt.demo.photos import FIT_PHOTOS, TEST_PHOTOS, write_views
from affeq_rt.method.depth import layer_analysis
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
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
    ap.add_argument("--random", action="store_true",
                    help="also extract the first network with random weights (its control)")
    ap.add_argument("--compare", default=None,
                    help="a checkout whose layer_analysis to time on the same stores")
    ap.add_argument("--rounds", type=int, default=2, help="analysis rounds (with --compare)")
    args = ap.parse_args()
    models = args.models.split(",")
    extracted = models + ([f"{models[0]}~random"] if args.random else [])
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
        # exports and sessions warm before timing
        extract(models, t / "test", t / "warm",
                options=ExtractOptions(dtype="float32", max_images=args.batch_size), images=opt)
        runs = {}
        for kind, stages in (("plain", False), ("stages", True)):
            decodes.clear()
            t0 = time.perf_counter()
            extract(extracted, t / "fit", t / f"fit_{kind}",
                    options=ExtractOptions(dtype="float32", stages=stages), images=opt)
            runs[kind] = {"seconds": time.perf_counter() - t0, "decodes": len(decodes),
                          "images": n_fit}
        extract(extracted, t / "test", t / "test_stages",
                options=ExtractOptions(dtype="float32", stages=True), images=opt)
        seconds, old = [], []
        for _ in range(args.rounds if args.compare else 1):
            if args.compare:
                old.append(_old_analysis(args.compare, t, models, args))
            decodes.clear()
            t0 = time.perf_counter()
            la = layer_analysis(t / "fit_stages", models[0], models[-1], test=t / "test_stages",
                                method=args.method, options=FitOptions(holdout=args.holdout))
            seconds.append(time.perf_counter() - t0)
        runs["analysis"] = {"seconds": min(seconds), "all": seconds, "decodes": len(decodes),
                            "rows": la.n, "stages": len(la.models), "test_images": n_test}
        if old:
            runs["analysis_compare"] = {"tree": args.compare, "seconds": min(old), "all": old}
            rec["analysis_over_compare"] = min(seconds) / min(old)
    rec["runs"] = runs
    rec["stages_over_plain_time"] = runs["stages"]["seconds"] / runs["plain"]["seconds"]
    rec["curves"] = [{"source": c.source, "target": c.target, "metric": c.metric,
                      "scores": [round(p.score, 2) for p in c.points]} for c in la.curves]
    print(depth_text(la))
    print(cka_text(la))
    if args.out:
        rec["files"] = {k: str(v) for k, v in write_depth(la, args.out).items()}
    print(json.dumps(rec, indent=1))


def _old_analysis(tree: str, t: Path, models: list[str], args: argparse.Namespace) -> float:
    """Seconds of ``layer_analysis`` by the code in ``tree`` on the same stores (subprocess)."""
    code = ("import sys, time; sys.path.insert(0, " + repr(tree) + "); "  # the tree, not an
            # editable install's finder (which would load this checkout)
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
            "type(f).__module__.lower()]; from affeq_rt.method.depth import layer_analysis; "
            "from affeq_rt.method.fit import FitOptions; t0 = time.perf_counter(); "
            f"layer_analysis({str(t / 'fit_stages')!r}, {models[0]!r}, {models[-1]!r}, "
            f"test={str(t / 'test_stages')!r}, method={args.method!r}, "
            f"options=FitOptions(holdout={args.holdout!r})); print(time.perf_counter() - t0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
