"""The data-efficiency curve: Gram snapshots inside fit's one pass, scored on held-out rows.

Checks: a snapshot leaves the running accumulator bit for bit as it was (and equals a fresh
accumulator fed the same rows); the fitted maps are the same bytes with and without the curve;
each point equals an independent least-squares fit on the first p training rows; a resumed pass
keeps the points taken before the interruption; sizes, refusals and files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from affeq_rt.cli.main import main
from affeq_rt.cluster.worker import run_locally
from affeq_rt.core.gram import GramAccumulator
from affeq_rt.data.readers import Sample
from affeq_rt.engine import Chunk, PassCheckpoint, run_pass
from affeq_rt.errors import AffeqError
from affeq_rt.io.maps import load_maps
from affeq_rt.io.store import ArrayStore, StoreConfig, StoreWriter
from affeq_rt.method.curve import curve_sizes, load_curve
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.fit import FitOptions, fit, holdout_mask
from affeq_rt.method.reducers import GramReducer
from affeq_rt.method.rows import ArraySource, model_slices
from affeq_rt.report.curve import curve_paths, write_curve
from affeq_rt.report.similarity import similarity_paths

DIMS = {"a": 8, "b": 6, "c": 10}
K = 5


def _data(n: int = 2600, seed: int = 0) -> tuple[dict[str, np.ndarray], dict, np.ndarray]:
    """Features of three 'networks' sharing a class signal, least-squares heads, labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    z = np.eye(K)[labels] * 2 + rng.normal(size=(n, K))
    feats = {m: (z @ rng.normal(size=(K, d)) + 0.8 * rng.normal(size=(n, d))
                 + rng.normal(size=d)).astype(np.float32) for m, d in DIMS.items()}
    heads = {}
    for m, f in feats.items():
        w = np.linalg.lstsq(np.hstack([f, np.ones((n, 1))]), np.eye(K)[labels], rcond=None)[0]
        heads[m] = (w[:-1].T.astype(np.float32), w[-1].astype(np.float32))
    return feats, heads, labels


def _state(acc: GramAccumulator) -> tuple[np.ndarray, np.ndarray, int]:
    return acc.mean(), acc.scatter(), acc.n


def test_snapshot_leaves_the_accumulator_untouched() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(700, 5)) + 50.0).astype(np.float32)
    plain, snapped = (GramAccumulator(5, device="cpu", block_rows=64) for _ in range(2))
    for i in range(0, 700, 90):
        plain.update(x[i:i + 90])
    snaps = []
    for i in range(0, 700, 90):
        snapped.update(x[i:i + 90])
        snaps.append(snapped.snapshot())  # mid-block: 90 rows is not a multiple of 64
    for u, v in zip(_state(plain), _state(snapped), strict=True):
        np.testing.assert_array_equal(u, v)  # bit for bit: the snapshots moved no block boundary
    fresh = GramAccumulator(5, device="cpu", block_rows=64)
    fresh.update(x[:270])
    for u, v in zip(_state(fresh), _state(snaps[2]), strict=True):
        np.testing.assert_array_equal(u, v)  # = a fresh accumulator fed the same rows


def _store(feats, heads, labels) -> ArrayStore:
    return ArrayStore(feats, heads, labels)


def test_maps_are_the_same_bytes_with_and_without_the_curve() -> None:
    feats, heads, labels = _data()
    st = _store(feats, heads, labels)
    on = fit(st, None, "ols", options=FitOptions(holdout=0.2, device="cpu"))
    off = fit(st, None, "ols", options=FitOptions(holdout=0.2, device="cpu", curve="off"))
    assert off.curve is None
    assert [p["images"] for p in on.curve.points] == [1000, 2000, on.curve.points[-1]["images"]]
    for key, m in on.maps.items():
        assert m.weight.tobytes() == off.maps[key].weight.tobytes()
        assert m.bias.tobytes() == off.maps[key].bias.tobytes()


def test_points_match_an_independent_fit_on_the_first_rows() -> None:
    feats, heads, labels = _data()
    st = _store(feats, heads, labels)
    res = fit(st, None, "ols", options=FitOptions(holdout=0.2, device="cpu", curve=(700, 1500)))
    cv = res.curve
    assert cv.measure == "top-1"
    mask = holdout_mask(len(labels), 0.2, 0)
    train, hold = np.flatnonzero(~mask), np.flatnonzero(mask)
    assert cv.eval_images == hold.size
    assert [p["images"] for p in cv.points] == [700, 1500, train.size]
    names = list(DIMS)
    for f in feats.values():
        c = f[train[:700]].astype(np.float64)
        lam = np.linalg.eigvalsh(np.cov(c.T))
        assert lam[-1] / lam[0] < 1e2  # the conditioning the tolerance below assumes
    for p in cv.points:
        rows = train[:p["images"]]
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i == j:
                    continue
                z = np.hstack([feats[a][rows].astype(np.float64), np.ones((rows.size, 1))])
                sol = np.linalg.lstsq(z, feats[b][rows].astype(np.float64), rcond=None)[0]
                ya = feats[b][hold].astype(np.float64)
                za = np.hstack([feats[a][hold].astype(np.float64), np.ones((hold.size, 1))])
                r2 = 1 - ((ya - za @ sol) ** 2).sum() / ((ya - ya.mean(0)) ** 2).sum()
                # Gram route vs lstsq, both float64 over the same float32 inputs: each off by
                # ≤ cond(S_AA)·γ ≈ 1e2·1e-13 (cond ≤ 1e2 for these features): 1e-8 has margin
                assert p["r2"][i][j] == pytest.approx(r2, abs=1e-8)
    # the last point IS the fitted maps, scored on the same held-out rows: identical numbers
    hold_store = ArrayStore({m: f[hold] for m, f in feats.items()}, heads, labels[hold])
    table = evaluate(hold_store, res.maps, device="cpu", overlap_pairs=[])
    assert np.array_equal(np.array(cv.points[-1]["score"], float).round(6), table.top1.round(6))
    # unlabelled: agreement instead of top-1
    res_u = fit(_store(feats, heads, None), None, "ols",
                options=FitOptions(holdout=0.2, device="cpu", curve=(1000,)))
    assert res_u.curve.measure == "agreement"
    # bare arrays (no heads): R² only
    res_r = fit(feats, None, "ols", options=FitOptions(holdout=0.2, device="cpu", curve=(1000,)))
    assert res_r.curve.measure == "R²"
    assert res_r.curve.points[0]["score"] is None


def test_curve_sizes_and_refusals() -> None:
    assert curve_sizes("auto", 5000) == [1000, 2000, 4000]
    assert curve_sizes("auto", 900) == []
    assert curve_sizes("off", 5000) == []
    assert curve_sizes("3000, 500,9000", 5000) == [500, 3000]
    with pytest.raises(AffeqError, match="not a list"):
        curve_sizes("1k", 5000)
    with pytest.raises(AffeqError, match="≥ 2"):
        curve_sizes("1", 5000)
    feats, heads, labels = _data(600)
    res = fit(_store(feats, heads, labels), None, "ols",
              options=FitOptions(holdout=0.2, device="cpu"))
    assert res.curve is None  # fewer training rows than the first point: off

    class Streamed(ArraySource):  # an image-like source: rows are not addressable
        def arrays(self) -> None:
            return None

    with pytest.raises(AffeqError, match="feature store"):
        fit(Streamed(feats), None, "ols", options=FitOptions(device="cpu", curve="100,200"))
    assert fit(Streamed(feats), None, "ols", options=FitOptions(device="cpu")).curve is None


class _Interrupting(ArraySource):
    """Raises KeyboardInterrupt once ``stop_at`` samples were delivered (a killed run)."""

    stop_at: int | None = None

    def chunks(self, start: int, stop: int | None = None) -> Iterator[Chunk]:
        for c in super().chunks(start, stop):
            if self.stop_at is not None and c.start >= self.stop_at:
                raise KeyboardInterrupt
            yield c


def _gram(mask: np.ndarray, sizes: list[int], score) -> GramReducer:
    return GramReducer(model_slices(list(DIMS), DIMS), mask, "cpu", sizes, score, row_norms=True)


def test_resume_keeps_the_points_and_the_bits(tmp_path: Path) -> None:
    feats, heads, labels = _data(12000)
    mask = holdout_mask(12000, 0.1, 0)
    sizes = [1000, 5000, 9000]
    src = _Interrupting(feats)

    def score(acc: GramAccumulator) -> dict:
        return {"images": acc.n, "trace": float(np.trace(acc.scatter()))}

    ident = {"test": 1}
    # the uninterrupted run checkpoints at the same data positions (saving flushes the blocks)
    whole = _gram(mask, sizes, score)
    run_pass(src, {"gram": whole}, checkpoint=PassCheckpoint(tmp_path / "ck0", ident, 4096),
             shard=4096)
    src.stop_at = 8192  # after the checkpoints at 4096 and 8192 and the 5000 point
    with pytest.raises(KeyboardInterrupt):
        run_pass(src, {"gram": _gram(mask, sizes, score)},
                 checkpoint=PassCheckpoint(tmp_path / "ck", ident, 4096), shard=4096)
    src.stop_at = None
    ck = PassCheckpoint(tmp_path / "ck", ident, 4096)
    assert ck.done == 8192
    resumed = _gram(mask, sizes, score)
    run_pass(src, {"gram": resumed}, checkpoint=ck, shard=4096)
    assert int((~mask).sum()) > 9000
    assert [p["images"] for p in resumed.points] == sizes
    assert resumed.points == whole.points  # the same numbers, to the bit
    np.testing.assert_array_equal(resumed.train.scatter(), whole.train.scatter())
    # the similarity row statistics resume exactly too (their state round-trips through the npz)
    assert resumed.norms.n == whole.norms.n == 12000
    np.testing.assert_array_equal(resumed.norms.t, whole.norms.t)
    np.testing.assert_array_equal(resumed.norms.u, whole.norms.u)
    # a checkpoint of another pass is refused with one line
    with pytest.raises(AffeqError, match="belongs to a different run"):
        PassCheckpoint(tmp_path / "ck0", {"test": 2})


def test_shards_merged_in_order_equal_one_pass() -> None:
    """The cluster path (a fresh reducer per shard, its state loaded and merged in shard order,
    cluster.worker.run_locally) against the in-place pass: snapshots, Grams and row norms.

    Bounds: the same rows reach the same float64 Gram code, but a shard's rows are reduced in their
    own blocks and joined by Chan's update, so each scatter entry moves by at most a few
    γ_m·Σ|y_i||y_j| (m ≤ 4096 rows: ≈ 1e-12 relative to the entry's scale, core/gram.py); the row
    norms' sums are plain float64 sums of the same terms in another grouping (≈ n·eps ≈ 3e-12)."""
    feats, _heads, _labels = _data(12000)
    mask = holdout_mask(12000, 0.1, 0)
    sizes = [1000, 5000, 9000]

    def score(acc: GramAccumulator) -> dict:
        return {"images": acc.n, "trace": float(np.trace(acc.scatter()))}

    one = _gram(mask, sizes, score)
    run_pass(ArraySource(feats), {"gram": one})
    merged = _gram(mask, sizes, score)
    run_locally(ArraySource(feats), {"gram": merged}, [(0, 4096), (4096, 8192), (8192, 12000)])
    assert [p["images"] for p in merged.points] == sizes
    for p, q in zip(merged.points, one.points, strict=True):
        assert p["trace"] == pytest.approx(q["trace"], rel=1e-10)
    s1, s2 = one.train.scatter(), merged.train.scatter()
    np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-10 * np.abs(s1).max())
    assert merged.holdout.n == one.holdout.n
    assert merged.train.n == one.train.n
    np.testing.assert_allclose(merged.norms.t, one.norms.t, rtol=1e-10)
    np.testing.assert_allclose(merged.norms.u, one.norms.u, rtol=1e-10, atol=1e-8)


def test_files_beside_the_maps(tmp_path: Path) -> None:
    feats, heads, labels = _data()
    out = tmp_path / "maps.safetensors"
    res = fit(_store(feats, heads, labels), None, "ols", out=out,
              options=FitOptions(holdout=0.2, device="cpu"))
    paths = write_curve(res.curve, out)
    assert paths == curve_paths(out)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].startswith("images,source,target,score_top-1")
    assert len(lines) == 1 + 3 * 6  # 3 points × 6 hybrids
    back = load_curve(paths["json"])
    assert back.points == json.loads(json.dumps(res.curve.to_dict()))["points"]
    assert load_maps(out)  # the maps file is untouched by the curve files
    assert not list(tmp_path.glob(".*.tmp"))


def _disk_store(path: Path, feats: dict, heads: dict, labels: np.ndarray) -> None:
    n = len(labels)
    cfg = StoreConfig(models=list(feats), dims={m: f.shape[1] for m, f in feats.items()},
                      specs={m: {"name": m, "label_offset": 0} for m in feats},
                      exports={m: "x" for m in feats},
                      data={"kind": "test", "n_samples": n, "fingerprint": "f"},
                      dtype="float32", batch_size=n)
    w = StoreWriter(path, cfg, heads)
    for m, f in feats.items():
        w.write(m, 0, f)
    w.commit(n, n, [])
    w.finalise([Sample(f"/i/{i}.jpg", int(labels[i])) for i in range(n)])


def test_cli_fit_writes_the_curve_and_evaluate_shows_it(tmp_path: Path) -> None:
    """As a user runs it: fit --features STORE writes MAPS.curve.*; evaluate puts it in the report.
    (Registry names: the CLI resolves --models through the registry.)"""
    feats, heads, labels = _data()
    names = {"a": "alexnet", "b": "vgg16", "c": "resnet50"}
    feats = {names[m]: f for m, f in feats.items()}
    heads = {names[m]: h for m, h in heads.items()}
    _disk_store(tmp_path / "store", feats, heads, labels)
    maps = tmp_path / "maps.safetensors"
    models = ",".join(feats)
    assert main(["fit", "--features", str(tmp_path / "store"), "--models", models, "--method",
                 "ols", "--holdout", "0.2", "--out", str(maps), "--device", "cpu", "-q",
                 "--similarity"]) == 0
    assert similarity_paths(maps)["json"].is_file()
    paths = curve_paths(maps)
    assert all(p.is_file() for p in paths.values())
    assert [p["images"] for p in load_curve(paths["json"]).points][:2] == [1000, 2000]
    assert main(["evaluate", "--features", str(tmp_path / "store"), "--maps", str(maps), "--out",
                 str(tmp_path / "rep"), "--device", "cpu", "-q"]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Data efficiency" in page
    assert "Similarity of the networks" in page
    other = tmp_path / "plain.safetensors"
    # without --models: every network of the store
    assert main(["fit", "--features", str(tmp_path / "store"), "--method",
                 "ols", "--out", str(other), "--device", "cpu", "-q", "--no-curve"]) == 0
    assert not any(p.exists() for p in curve_paths(other).values())
    assert len(load_maps(other)) == 6  # 3 networks: every ordered pair
