"""fit: all ordered pairs from one joint Gram pass, on arrays and feature stores; every method."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.data.readers import Sample
from affeq_rt.errors import AffeqError
from affeq_rt.io.heads import Head, load_head
from affeq_rt.io.maps import load_maps
from affeq_rt.io.store import FeatureStore, StoreConfig, StoreWriter
from affeq_rt.method.extract import ExtractOptions, ImageOptions, extract
from affeq_rt.method.fit import FitOptions, fit, holdout_mask
from affeq_rt.method.rows import ArraySource

sys.path.insert(0, str(Path(__file__).parent / "data"))
import photos  # noqa: E402
from recording import RecordingProgress  # noqa: E402

DIMS = {"a": 6, "b": 4, "c": 9}
MODELS = photos.E2E_MODELS
env = photos.e2e_env  # module-scoped fixture: small registry, cached exports, photos


def _features(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Three 'networks' seeing the same latent content, plus noise (like CNN features)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    return {m: (z @ rng.normal(size=(5, d)) + rng.normal(size=d) + 0.05 * rng.normal(size=(n, d)))
            .astype(np.float32) for m, d in DIMS.items()}


def _store(path, feats, heads_k=12, offsets=None):
    """A float32 store of ``feats``; ``offsets[m]`` = 1 gives m a TF-slim background row."""
    n = len(next(iter(feats.values())))
    rng = np.random.default_rng(9)
    offsets = offsets or {}
    cfg = StoreConfig(models=list(feats), dims={m: f.shape[1] for m, f in feats.items()},
                      specs={m: {"name": m, "label_offset": offsets.get(m, 0)} for m in feats},
                      exports={m: "x" for m in feats},
                      data={"kind": "test", "n_samples": n, "fingerprint": "f"},
                      dtype="float32", batch_size=n)
    heads = {m: (rng.normal(size=(heads_k + offsets.get(m, 0), f.shape[1])).astype(np.float32),
                 rng.normal(size=heads_k + offsets.get(m, 0)).astype(np.float32))
             for m, f in feats.items()}
    w = StoreWriter(path, cfg, heads)
    for m, f in feats.items():
        w.write(m, 0, f)
    w.commit(n, n, [])
    w.finalise([Sample(f"/i/{i}.jpg", i % 3) for i in range(n)])
    return FeatureStore.open(path)


def _lstsq(xa: np.ndarray, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.hstack([xa.astype(np.float64), np.ones((len(xa), 1))])
    sol = np.linalg.lstsq(z, xb.astype(np.float64), rcond=None)[0]
    return sol[:-1].T, sol[-1]


def test_fit_maps_on_arrays_matches_lstsq_for_every_pair():
    feats = _features(500)
    maps = fit(feats, method="ols", options=FitOptions(holdout=0.2, seed=3)).maps.values()
    assert sorted(m.key for m in maps) == sorted(f"{a}->{b}" for a in DIMS for b in DIMS if a != b)
    train = ~holdout_mask(500, 0.2, 3)
    for m in maps:
        w, b = _lstsq(feats[m.src][train], feats[m.dst][train])
        # Bound from float64 arithmetic, for any BLAS kernel: the Gram's products are float64, so
        # each scatter entry is off by ≤ γ_400·sqrt(S_ii S_jj) (γ_m = m·eps64 ≈ 4.4e-14 for any
        # summation order), ≤ d·γ ≈ 4e-13 in norm; the solve amplifies that by ≤ 2·cond(S_AA)
        # (≤ 2e4 here): ≤ 1e-8 of the largest entry; eigh adds ~d·eps64·cond ≈ 3e-11. The map is
        # stored as float32 (≤ 2⁻²⁴ ≈ 6e-8 of each entry). 1e-6 of the largest entry (the issue's
        # bound) leaves 14x margin; the old float32-product Gram was off by up to 1.6e-3.
        scale = np.abs(w).max()
        np.testing.assert_allclose(m.weight, w, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(m.bias, b, rtol=0, atol=1e-6 * max(scale, np.abs(b).max()))
        assert m.stats["images"] == train.sum()
        assert m.stats["holdout_images"] == (~train).sum()
        y = feats[m.dst][~train].astype(np.float64)
        pred = feats[m.src][~train].astype(np.float64) @ m.weight.T.astype(np.float64) + m.bias
        r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert m.stats["r2_holdout"] == pytest.approx(r2, abs=1e-4)  # float32-stored map
        if m.src != "b":  # b (4 dims) cannot carry all 5 latent factors; the others can
            assert m.stats["r2_holdout"] > 0.95


def test_fit_from_store_every_method(tmp_path):
    feats = _features(300)
    st = _store(tmp_path / "store", feats)
    for method in ("ols", "ridge", "logit-pinv", "naive", "adam"):
        out = tmp_path / f"{method}.safetensors"
        res = fit(tmp_path / "store", ["a", "b", "c"], method, out=out,
                  options=FitOptions(holdout=0.1, adam_iterations=5))
        ms = load_maps(out)
        assert len(ms) == 6
        assert ms.meta["method"] == method
        for (s, d), m in ms.items():
            assert m.weight.shape == (DIMS[d], DIMS[s])
            assert np.isfinite(m.weight).all()
            assert m.method == method
        assert res.images == 300
    ms = load_maps(tmp_path / "logit-pinv.safetensors")
    # heads have K=12 > every d: not lossless, and the stats say so
    assert ms["a", "c"].stats["logits_exact"] is False
    wa, wc = st.head("a").weight, st.head("c").weight
    m = ms["a", "c"]
    # logit-pinv is least squares in logit space: W_c M = W_c W_c⁺ W_a (projection onto W_c's range)
    proj = wc.astype(np.float64) @ np.linalg.pinv(wc.astype(np.float64))
    np.testing.assert_allclose(wc @ m.weight, proj @ wa, atol=1e-4)
    ridge = load_maps(tmp_path / "ridge.safetensors")["a", "b"].stats
    assert ridge["lambda"] == ridge["lambda_path"][ridge["lambda_index"]]


def test_rank_deficient_fit_is_finite_and_reported():
    feats = _features(8)  # 8 images, up to 9 dims
    feats["c"][:, 2] = 0.0  # a dead feature
    m = fit(feats, method="ols", options=FitOptions(holdout=0.0)).maps["c", "a"]
    assert np.isfinite(m.weight).all()
    assert m.stats["rank_deficient"]
    assert m.stats["dead_features"] == 1
    assert m.stats["rank"] <= 7
    assert m.stats["r2_holdout"] is None


def test_bad_inputs(tmp_path):
    store = tmp_path / "store"
    _store(store, _features(40))
    out = tmp_path / "m.safetensors"
    with pytest.raises(AffeqError, match="not in feature store"):
        fit(store, ["a", "zzz"], out=out)
    with pytest.raises(AffeqError, match="cannot fit maps from a NoneType"):
        fit(None, ["a", "b"], out=out)
    with pytest.raises(AffeqError, match="unknown fit method"):
        fit(store, ["a", "b"], "svd", out=out)
    with pytest.raises(AffeqError, match="at least two"):
        fit(store, ["a"], out=out)
    with pytest.raises(AffeqError, match="holdout"):
        fit(store, "a,b", out=out, options=FitOptions(holdout=1.5))
    with pytest.raises(AffeqError, match="logit-pinv needs the classifier heads"):
        fit(_features(40), method="logit-pinv")
    with pytest.raises(AffeqError, match="different row counts"):
        fit({"a": np.zeros((5, 2), np.float32), "b": np.zeros((6, 2), np.float32)})
    assert not out.exists()


def test_one_front_door_same_maps_from_arrays_and_store(tmp_path):
    """Arrays and the store holding them give the same bits; the result is a MapSet that
    save/load round-trips; progress counts every sample once."""
    feats = _features(5000)  # more than one 4096-row chunk
    st = _store(tmp_path / "store", feats)
    rec = RecordingProgress()
    from_store = fit(st, method="ols", out=tmp_path / "m.safetensors",
                     options=FitOptions(holdout=0.2, seed=1), progress=rec)
    from_arrays = fit(feats, method="ols", options=FitOptions(holdout=0.2, seed=1))
    assert rec.calls == [("start", "fit", 5000, 0, "img"), ("advance", 4096), ("advance", 904),
                         ("done",)]
    assert from_store.images == 5000
    assert from_store.images_per_s > 0
    assert set(from_store.maps) == {(a, b) for a in DIMS for b in DIMS if a != b}
    loaded = load_maps(tmp_path / "m.safetensors")
    assert loaded.meta["source"]["kind"] == "feature-store"
    assert loaded.meta["method"] == "ols"
    for key, m in from_store.maps.items():
        # same rows, same chunks, same accumulator: bit-identical
        np.testing.assert_array_equal(m.weight, from_arrays.maps[key].weight)
        np.testing.assert_array_equal(m.bias, from_arrays.maps[key].bias)
        np.testing.assert_array_equal(loaded[key].weight, m.weight)
        assert loaded[key].stats["r2_holdout"] == m.stats["r2_holdout"]
    assert from_arrays.maps.meta["source"] == {"kind": "arrays", "n": 5000}
    # max_images cuts every source to the first rows
    cut = fit(st, method="ols", options=FitOptions(max_images=10, holdout=0.0))
    assert cut.images == 10
    assert cut.maps["a", "c"].stats["images"] == 10


def test_logit_pinv_uses_heads_stripped_once(tmp_path):
    """A TF-slim head (background row 0, label_offset 1) is stripped when the store is read;
    logit-pinv then maps the 12 shared classes, and C_c(M x) reproduces C_a(x) up to the
    projection onto W_c's row space."""
    feats = _features(30)
    st = _store(tmp_path / "store", feats, heads_k=12, offsets={"c": 1})
    ms = fit(st, method="logit-pinv").maps
    # the reference reads the head files themselves and drops row 0 by hand
    wa, ba = (x.astype(np.float64) for x in load_head(tmp_path / "store/a/head.safetensors"))
    wc, bc = (x[1:].astype(np.float64) for x in load_head(tmp_path / "store/c/head.safetensors"))
    assert st.head("c").num_classes == 12
    assert st.head("c").label_offset == 1
    m = ms["a", "c"]
    assert m.stats["classes"] == 12
    x = feats["a"][:5].astype(np.float64)
    got = (x @ m.weight.T.astype(np.float64) + m.bias) @ wc.T + bc
    proj = wc @ np.linalg.pinv(wc)  # W_c has rank 9 < 12: logits are projected onto its range
    want = proj @ (x @ wa.T + ba - bc).T + bc[:, None]
    # float32-stored map (rel. 6e-8) times logits of size ~10: 1e-4 is generous and still far
    # below the background logit's effect (a whole extra row shifts every class by O(1))
    np.testing.assert_allclose(got, want.T, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# end to end on photos with three networks


def _images(env, workers: int) -> ImageOptions:
    return ImageOptions(batch_size=2, workers=workers, random_weights=True,
                        export_root=env["exports"])


@pytest.mark.slow  # ~30-60 s on 2 shared cores: three 1024-1280-dim eigendecompositions + export
def test_fit_from_photos_ols_matches_float64_lstsq(env, tmp_path):
    out = tmp_path / "maps.safetensors"
    res = fit(env["photos"], MODELS, "ols", out=out, options=FitOptions(holdout=0.0),
              images=_images(env, 0))
    n = len(env["good"])
    assert res.images == n
    assert len(res.skipped) == 2
    # the reference features: the same networks and batches, stored in float32
    st = FeatureStore.open(extract(MODELS, env["photos"], tmp_path / "store",
                                   options=ExtractOptions(dtype="float32"),
                                   images=_images(env, 0)).path)
    ms = load_maps(out)
    assert len(ms) == 6
    assert ms.meta["source"]["n_samples"] == n + 2
    for (src, dst), m in ms.items():
        a = st.features(src).astype(np.float64)
        b = st.features(dst).astype(np.float64)
        ac, bc = a - a.mean(0), b - b.mean(0)
        # 21 images, 1024-1280 dims: rank-deficient, so the reference is the minimum-norm
        # least-squares solution (cut-off 1e-3·σmax ⇔ the solver's ≥1e-7·λmax eigen cut-off;
        # the 20 real singular values lie within 1e-3 of σmax, the null ones below 1e-12)
        ref = np.linalg.lstsq(ac, bc, rcond=1e-3)[0].T
        ref_b = b.mean(0) - ref @ a.mean(0)
        # The Gram is float64 (core/gram.py): the eigen-solve of S_AA over the kept directions
        # errs by ≲ d·eps64·κ(S_AA) ≈ 1280·2.2e-16·7e4 ≈ 2e-8 of max|W|, and the stored map is
        # rounded to float32 (≤ 2⁻²⁴ ≈ 6e-8 of each entry): ≤ 8e-8 of max|W|, asserted 2e-7
        # (measured ≤ 4.6e-8). The bias adds the same errors carried through W·μ_A (at most d
        # terms): asserted 1e-6 of max|b| (measured ≤ 2e-8). A map rounded to 11 mantissa bits
        # (2⁻¹² ≈ 2.4e-4) fails both.
        scale = np.abs(ref).max()
        np.testing.assert_allclose(m.weight, ref, rtol=0, atol=2e-7 * scale)
        np.testing.assert_allclose(m.bias, ref_b, rtol=0, atol=1e-6 * np.abs(b).max())
        assert m.stats["rank"] == n - 1
        assert m.stats["rank_deficient"]
        assert m.stats["images"] == n
        assert m.stats["r2_holdout"] is None
        # underdetermined: the fit reproduces the training targets
        pred = a @ m.weight.T.astype(np.float64) + m.bias
        assert np.abs(pred - b).max() < 1e-3 * np.abs(bc).max()


def _fit_cli(env, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "affeq_rt.cli.main", "fit", "--models", ",".join(MODELS),
            "--data", str(env["photos"]), "--out", str(out), "--random-weights",
            "--export-root", env["exports"], "--batch-size", "2", "--workers", "1",
            "--checkpoint-every", "4", "--holdout", "0.25", "--method", "ols", *extra]


@pytest.mark.slow  # ~60-80 s: three CLI processes (torch import) plus two full fits
def test_kill9_mid_fit_then_resume_is_identical(env, tmp_path):
    ref = tmp_path / "ref.safetensors"
    fit(env["photos"], MODELS, "ols", out=ref,
        options=FitOptions(holdout=0.25, checkpoint_every=4),
        images=_images(env, 1))
    out = tmp_path / "killed.safetensors"
    proc = subprocess.Popen(_fit_cli(env, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ})
    ckpt = Path(str(out) + ".partial") / "pass.json"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            done = int(json.loads(ckpt.read_text())["done"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done = -1
        if done >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert done < 23
    # a rerun with other settings must not mix into this checkpoint
    bad = subprocess.run(_fit_cli(env, out, "--seed", "7"), capture_output=True, text=True)
    assert bad.returncode == 1
    assert "belongs to a different run (seed differs)" in bad.stderr
    r = subprocess.run(_fit_cli(env, out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from image" in r.stdout
    assert out.read_bytes() == ref.read_bytes()
    assert not Path(str(out) + ".partial").exists()
    ms = load_maps(out)
    assert all(m.stats["holdout_images"] > 0 and m.stats["r2_holdout"] is not None
               for m in ms.values())


def test_adam_on_an_executor_is_refused_before_any_work() -> None:
    """Adam draws random batches from addressable rows in this process: on another executor it is
    refused with one line, before the executor is called."""
    class Unused:
        name, shard_size = "unused", None

        def run(self, *_: object, **__: object) -> None:
            raise AssertionError("the executor must not be called")

    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(AffeqError, match="does not run on an executor"):
        fit({"a": x, "b": x[:, :3].copy()}, method="adam",
            options=FitOptions(executor=Unused()))


@pytest.mark.parametrize("method", ["prior-ridge", "prior-pca"])
def test_few_data_methods_run_on_the_worker_path(method: str) -> None:
    """The few-data methods gather their rows with a reducer, so they run on any executor: the
    worker path in this process (fresh reducers per shard, states merged in shard order) gives
    the in-place maps bit for bit (rows are copied and concatenated in order, never summed)."""
    from affeq_rt.cluster.worker import run_locally

    class ByShards:
        name, shard_size = "by-shards", 64

        def run(self, rows, reducers, shards, on_commit, progress) -> None:
            for a, b in shards:
                run_locally(rows, reducers, [(a, b)])
                progress.advance(b - a)
                on_commit(b)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    heads = {m: Head.from_raw(rng.standard_normal((5, d)).astype(np.float32),
                              np.zeros(5, np.float32)) for m, d in (("a", 6), ("b", 4))}
    feats = {"a": x, "b": np.tanh(x[:, :4] @ rng.standard_normal((4, 4))).astype(np.float32)}
    here = fit(ArraySource(feats, heads=heads), method=method, options=FitOptions(curve="off"))
    there = fit(ArraySource(feats, heads=heads), method=method,
                options=FitOptions(curve="off", executor=ByShards()))
    for key, m in here.maps.items():
        np.testing.assert_array_equal(there.maps[key].weight, m.weight)
        np.testing.assert_array_equal(there.maps[key].bias, m.bias)


def test_a_second_fit_into_the_same_maps_file_is_refused(tmp_path: Path) -> None:
    """Two runs writing one maps file: the second is refused at once with one line naming the
    holder (issue 23: both exited 0 and one result was silently lost); released after the run."""
    from affeq_rt.io.fsio import output_lock

    out = tmp_path / "maps.safetensors"
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    feats = {"a": x, "b": x[:, :3].copy()}
    with output_lock(out, "maps file"), pytest.raises(AffeqError, match="being written by"):
        fit(feats, method="ols", out=out)
    assert not out.exists()
    fit(feats, method="ols", out=out)
    assert out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.safetensors"]
