"""evaluate.py: the N×N table equals a plain NumPy computation with materialised logits; overlap,
agreement mode, validate, and clear errors on mismatched inputs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from affeq_rt.errors import AffeqError
from affeq_rt.io.maps import AffineMap, MapSet
from affeq_rt.io.store import ArrayStore
from affeq_rt.method.evaluate import evaluate, validate
from affeq_rt.method.overlap import default_overlap_pairs, overlap

sys.path.insert(0, str(Path(__file__).parent / "data"))
from recording import RecordingProgress  # noqa: E402

DIMS = {"alpha": 24, "beta": 32, "gamma": 16}
K = 12
N = 700


def _problem(seed: int = 0, offset_model: str | None = "beta", labelled: bool = True,
             dtype: type = np.float16) -> tuple[ArrayStore, dict]:
    """Synthetic features that share a latent class signal, heads that read it, maps between them.

    One network gets a TF-slim style 1001-class head (a background row 0 and label_offset 1).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, N)
    proto = rng.standard_normal((K, 8))
    latent = proto[labels] + 0.9 * rng.standard_normal((N, 8))
    feats, heads, specs = {}, {}, {}
    for m, d in DIMS.items():
        mix = rng.standard_normal((8, d))
        f = latent @ mix + 0.3 * rng.standard_normal((N, d))
        feats[m] = f.astype(dtype)
        w = np.linalg.lstsq(f, np.eye(K)[labels] - 1.0 / K, rcond=None)[0].T  # [K, d]
        b = 0.1 * rng.standard_normal(K)
        off = 1 if m == offset_model else 0
        if off:
            w = np.vstack([rng.standard_normal((1, d)), w])
            b = np.concatenate([[5.0], b])  # a large background logit that must be dropped
        heads[m] = (w.astype(np.float32), b.astype(np.float32))
        specs[m] = {"name": m, "label_offset": off, "expected_top1": 50.0}
    maps = {}
    for a in DIMS:
        for b in DIMS:
            if a != b:
                fa = feats[a].astype(np.float64)
                z = np.hstack([fa, np.ones((N, 1))])
                sol = np.linalg.lstsq(z, feats[b].astype(np.float64), rcond=None)[0]
                maps[f"{a}->{b}"] = (sol[:-1].T.astype(np.float32), sol[-1].astype(np.float32))
    return ArrayStore(feats, heads, labels if labelled else None, specs), maps


def _mapset(maps: dict) -> MapSet:
    """The test's ``{"a->b": (W, b)}`` as the one maps type."""
    return MapSet([AffineMap(*k.split("->"), w, b, "lstsq") for k, (w, b) in maps.items()])


def _reference(store: ArrayStore, maps: dict) -> dict:
    """Materialised float64 logits per (source, target): top-1/5 hits, predictions, margins."""
    out = {}
    labels = store.labels
    for a in store.models:
        xa = store.features(a).astype(np.float64)
        for b in store.models:
            w, bias = (x.astype(np.float64) for x in store.heads_[b])  # the raw file rows
            off = store.spec(b)["label_offset"]
            w, bias = w[off:], bias[off:]
            if a == b:
                logits = xa @ w.T + bias
            else:
                mw, mb = (x.astype(np.float64) for x in maps[f"{a}->{b}"])
                logits = (xa @ mw.T + mb) @ w.T + bias
            srt = np.sort(logits, axis=1)
            rec = {"pred": logits.argmax(1), "margin": srt[:, -1] - srt[:, -2]}
            if labels is not None:
                ly = logits[np.arange(N), labels][:, None]
                rank = (logits > ly).sum(1) + ((logits == ly) &
                                               (np.arange(K)[None] < labels[:, None])).sum(1)
                ly5 = np.sort(logits, axis=1)[:, -5][:, None]
                rec.update(hit1=rank == 0, hit5=rank < 5,
                           near5=np.abs(logits[np.arange(N), labels][:, None] - ly5)[:, 0])
            out[(a, b)] = rec
    return out


# float32 evaluation of a float64 reference can only disagree where two logits are this close
# (relative to the logit scale ~1): float32 rounding of folded heads and features is ~1e-6.
NEAR_TIE = 1e-4


def test_table_equals_materialised_numpy() -> None:
    store, maps = _problem()
    table = evaluate(store, _mapset(maps), device="cpu")
    ref = _reference(store, maps)
    assert table.labelled
    assert table.models == list(DIMS)
    for i, a in enumerate(table.models):
        for j, b in enumerate(table.models):
            r = ref[(a, b)]
            sure = r["margin"] > NEAR_TIE
            assert sure.mean() > 0.99
            np.testing.assert_array_equal(table.pred[i, j][sure], r["pred"][sure])
            hits = table.hits(a, b)
            np.testing.assert_array_equal(hits[sure], r["hit1"][sure])
            # counts may differ only by images whose deciding logits are near-tied
            assert abs(round(table.top1[i, j] * N / 100) - r["hit1"].sum()) <= (~sure).sum()
            close5 = r["near5"] <= NEAR_TIE
            assert abs(round(table.top5[i, j] * N / 100) - r["hit5"].sum()) <= close5.sum()
    # the problem is built so that hybrids are meaningful: far above chance (1/K) everywhere
    assert np.all(table.top1 > 300.0 / K)
    # conventions: Table 5.2 change relative to the source; the paper's Loss_{A,B}
    t1 = table.top1
    assert table.change_top1[0, 1] == pytest.approx((t1[0, 1] - t1[0, 0]) / t1[0, 0] * 100)
    assert table.loss_top1[0, 1] == pytest.approx(t1[0, 0] - t1[1, 0])
    # the loss of the hybrid row→column, aligned with top1 (the CSV's per-row loss)
    assert table.hybrid_loss_top1[0, 1] == pytest.approx(t1[1, 1] - t1[0, 1])
    assert np.all(np.diag(table.change_top1) == 0)
    assert np.all(np.diag(table.loss_top1) == 0)


def test_label_offset_drops_background_row() -> None:
    """The background logit (5.0, far above the others) would win everywhere if it were kept."""
    store, maps = _problem(offset_model="beta")
    table = evaluate(store, _mapset(maps), device="cpu")
    j = table.index("beta")
    assert table.label_offsets["beta"] == 1
    assert table.top1[j, j] > 300.0 / K  # chance is 100/K; with the row kept it would be ~0
    assert (table.pred[:, j] < K).all()


def test_overlap_regions_match_sets() -> None:
    store, maps = _problem(seed=1)
    table = evaluate(store, _mapset(maps), device="cpu")
    o = overlap(table, "alpha", "gamma")
    ra, rb, rh = table.hits("alpha", "alpha"), table.hits("gamma", "gamma"), \
        table.hits("alpha", "gamma")
    assert sum(o.regions.values()) == N
    assert o.right_a == ra.sum()
    assert o.right_b == rb.sum()
    assert o.right_hybrid == rh.sum()
    assert o.fixed == (rh & ~rb).sum()
    assert o.fixed_a_right == (ra & rh & ~rb).sum()
    assert o.broken == (rb & ~rh).sum()
    assert o.regions["ABH"] == (ra & rb & rh).sum()
    assert o.regions["none"] == (~ra & ~rb & ~rh).sum()
    assert o.right_hybrid == round(table.top1[0, 2] * N / 100)


def test_agreement_mode_without_labels() -> None:
    store, maps = _problem(seed=2, labelled=False)
    table = evaluate(store, _mapset(maps), device="cpu")
    ref = _reference(store, maps)
    assert not table.labelled
    assert table.correct is None
    assert np.isnan(table.top1).all()
    for i, a in enumerate(table.models):
        for j, b in enumerate(table.models):
            sure = (ref[(a, b)]["margin"] > NEAR_TIE) & (ref[(b, b)]["margin"] > NEAR_TIE)
            want = 100 * (ref[(a, b)]["pred"] == ref[(b, b)]["pred"]).mean()
            assert abs(table.agree[i, j] - want) <= 100 * (~sure).mean() + 1e-9
            want_u = 100 * (ref[(a, a)]["pred"] == ref[(b, b)]["pred"]).mean()
            sure_u = (ref[(a, a)]["margin"] > NEAR_TIE) & (ref[(b, b)]["margin"] > NEAR_TIE)
            assert abs(table.agree_unmapped[i, j] - want_u) <= 100 * (~sure_u).mean() + 1e-9
    assert np.all(np.diag(table.agree) == 100.0)
    with pytest.raises(AffeqError, match="no labels"):
        table.hits("alpha", "beta")
    with pytest.raises(AffeqError, match="no labels"):
        validate(store, device="cpu")


def test_subset_of_models_and_bad_inputs() -> None:
    store, maps = _problem(seed=4)
    sub = evaluate(store, _mapset(maps), device="cpu", models=["gamma", "alpha"])
    full = evaluate(store, _mapset(maps), device="cpu")
    assert sub.models == ["gamma", "alpha"]
    assert sub.top1[0, 1] == full.top1[2, 0]
    other = {k.replace("alpha", "x").replace("beta", "y").replace("gamma", "z"): v
             for k, v in maps.items()}
    with pytest.raises(AffeqError, match="different network sets"):
        evaluate(store, _mapset(other), device="cpu")
    no_gamma = {k: v for k, v in maps.items() if "gamma" not in k}
    with pytest.raises(AffeqError, match="gamma have no maps"):
        evaluate(store, _mapset(no_gamma), device="cpu")
    one_missing = {k: v for k, v in maps.items() if k != "beta->alpha"}
    with pytest.raises(AffeqError, match="lacks pair"):
        evaluate(store, _mapset(one_missing), device="cpu")
    swapped = dict(maps)
    swapped["alpha->beta"] = maps["alpha->gamma"]
    with pytest.raises(AffeqError, match="alpha->beta has shape"):
        evaluate(store, _mapset(swapped), device="cpu")
    with pytest.raises(AffeqError, match="not in the feature store"):
        evaluate(store, _mapset(maps), device="cpu", models=["alpha", "delta"])
    partial = ArrayStore(store.features_, store.heads_,
                         np.where(np.arange(N) < 5, -1, store.labels), store.specs_)
    with pytest.raises(AffeqError, match="have no label"):
        evaluate(partial, _mapset(maps), device="cpu")


def test_validate_flags_mismatch() -> None:
    store, maps = _problem(seed=5)
    table = evaluate(store, _mapset(maps), device="cpu")
    rows = {r.model: r for r in validate(store, device="cpu")}
    for i, m in enumerate(table.models):
        assert rows[m].top1 == pytest.approx(table.top1[i, i])
        assert rows[m].top5 == pytest.approx(table.top5[i, i])
    own = rows["alpha"].top1
    store.specs_["alpha"]["expected_top1"] = own + 0.5 * rows["alpha"].tolerance
    store.specs_["gamma"]["expected_top1"] = rows["gamma"].top1 + 20.0
    store.specs_["beta"].pop("expected_top1")
    rows = {r.model: r for r in validate(store, device="cpu")}
    assert rows["alpha"].ok is True
    assert rows["gamma"].ok is False
    assert rows["gamma"].delta == pytest.approx(-20.0)
    assert rows["beta"].ok is None


def test_results_carry_overlaps_and_progress_counts_images(tmp_path, monkeypatch) -> None:
    store, maps = _problem(seed=6)
    rec = RecordingProgress()
    monkeypatch.chdir(tmp_path)
    table = evaluate(store, _mapset(maps), device="cpu", progress=rec)
    assert list(tmp_path.iterdir()) == []  # evaluate computes; report.write_report writes
    # one pass over the store's rows, in chunks of the store source (all 700 rows in one here)
    assert rec.calls == [("start", "evaluate", store.n, 0, "img"), ("advance", store.n),
                         ("done",)]
    pairs = default_overlap_pairs(table)
    assert [(o.a, o.b) for o in table.overlaps] == pairs
    assert len(pairs) == 2
    assert table.overlaps[0].regions == overlap(table, *pairs[0]).regions
    chosen = evaluate(store, _mapset(maps), device="cpu", overlap_pairs=[("gamma", "beta")])
    assert [(o.a, o.b) for o in chosen.overlaps] == [("gamma", "beta")]
    unlabelled, maps_u = _problem(seed=6, labelled=False)
    assert evaluate(unlabelled, _mapset(maps_u), device="cpu").overlaps == []


# ---------------------------------------------------------------- issue 11, item 9
# A logit-pinv hybrid reproduces its source only when the target head is folded into the map in
# float64 (``maps.fold_head``): ARCHITECTURE.md, "Logit-pinv hybrids and float64".

PINV_S, PINV_K, PINV_DB = 16, 1000, 1024  # A's features = the 3·16·16 = 768 pixels of the image
PINV_DA = 3 * PINV_S * PINV_S


def _onnx_file(path: Path, node: Any, inits: list, inp: str, in_shape: list, out: str,
               out_shape: list) -> Path:
    """A one-node float32 ONNX model (opset 13)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _classifier_onnx(path: Path, w: np.ndarray, b: np.ndarray) -> Path:
    """``classifier.onnx`` as an export writes it: features [N, d] → Gemm → logits [N, K]."""
    from onnx import helper, numpy_helper

    return _onnx_file(path, helper.make_node("Gemm", ["features", "W", "b"], ["logits"],
                                             transB=1),
                      [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
                      "features", ["N", w.shape[1]], "logits", ["N", w.shape[0]])


def _near_ties(wa: np.ndarray, ba: np.ndarray, n: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """float32 features whose top-2 logits under A's head are 1e-8 … 1e-4 of the logit scale
    apart (log-spaced), and those margins (relative, recomputed in float64 after the cast)."""
    x = rng.standard_normal((n, wa.shape[1]))
    lg = x @ wa.T.astype(np.float64) + ba
    order = np.argsort(lg, axis=1)
    t1, t2, rows = order[:, -1], order[:, -2], np.arange(n)
    u = wa[t1].astype(np.float64) - wa[t2]
    gap = lg[rows, t1] - lg[rows, t2]
    target = np.abs(lg).max() * np.logspace(-8, -4, n)
    x32 = (x - ((gap - target) / (u * u).sum(1))[:, None] * u).astype(np.float32)
    ref = x32.astype(np.float64) @ wa.T.astype(np.float64) + ba
    top2 = np.sort(ref, axis=1)[:, -2:]
    return x32, (top2[:, 1] - top2[:, 0]) / np.abs(ref).max()


def test_logit_pinv_hybrid_agrees_with_its_source_on_near_ties(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hybrid built (``build_from_parts``) from the logit-pinv map that ``fit`` writes (float32
    weights, as in a maps file) predicts what the source's own classifier.onnx predicts on every
    image whose top-2 logits are ≥ 5e-7 of the logit scale apart: its head, folded in float64, is
    A's head to ~5e-8, below the float32 rounding of evaluating A's head at all (measured: the
    float64 fold disagrees only below 2.3e-7, where A's own ONNX head and a float64 evaluation of
    it disagree too). Folded in float32 instead, the same hybrid flips near-ties up to ~1.2e-6."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("skimage.data")  # build_from_parts verifies on scikit-image's photos
    from onnx import helper, numpy_helper

    import affeq_rt.deploy.hybrid as hybrid_mod
    from affeq_rt.deploy.hybrid import HybridOptions, HybridParts, build_from_parts
    from affeq_rt.io.heads import Head
    from affeq_rt.method.fit import fit
    from affeq_rt.registry.spec import BackboneSpec, WeightsSource

    rng = np.random.default_rng(1)
    k, da, db = PINV_K, PINV_DA, PINV_DB
    wa = (0.03 * rng.standard_normal((k, da))).astype(np.float32)
    ba = (0.1 * rng.standard_normal(k)).astype(np.float32)
    wb = (0.03 * rng.standard_normal((k, db))).astype(np.float32)
    bb = (0.1 * rng.standard_normal(k)).astype(np.float32)
    store = ArrayStore({"a": np.zeros((2, da), np.float32), "b": np.zeros((2, db), np.float32)},
                       {"a": (wa, ba), "b": (wb, bb)})
    amap = fit(store, method="logit-pinv").maps["a", "b"]
    assert amap.weight.dtype == np.float32
    assert amap.stats["logits_exact"]

    def spec(name: str, dim: int) -> BackboneSpec:
        return BackboneSpec(name=name, library="affeq", arch=name, weights=WeightsSource(),
                            input_size=PINV_S, crop_pct=1.0, interpolation="bilinear",
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), feature_dim=dim,
                            num_classes=k)

    features = _onnx_file(tmp_path / "a_features.onnx",
                          helper.make_node("Reshape", ["image", "shape"], ["features"]),
                          [numpy_helper.from_array(np.array([-1, da], np.int64), "shape")],
                          "image", ["N", 3, PINV_S, PINV_S], "features", ["N", da])
    parts = HybridParts(spec("a", da), spec("b", db), features, Head(wb, bb),
                        _classifier_onnx(tmp_path / "b_classifier.onnx", wb, bb))
    x, margin = _near_ties(wa, ba, 1500, rng)
    own = ort.InferenceSession(str(_classifier_onnx(tmp_path / "a_classifier.onnx", wa, ba)),
                               providers=["CPUExecutionProvider"]).run(None, {"features": x})[0]

    def hybrid_top1(out: Path) -> np.ndarray:
        path = build_from_parts(parts, amap, out, HybridOptions(force=True))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(["logits"], {"image": x.reshape(-1, 3, PINV_S, PINV_S)})[0].argmax(1)

    clear = margin >= 5e-7
    assert clear.sum() > 500
    assert (margin[clear] < 2e-6).sum() > 50  # near-ties in the range that matters
    top1 = hybrid_top1(tmp_path / "h64.onnx")
    np.testing.assert_array_equal(top1[clear], own.argmax(1)[clear])

    # control: the same hybrid with the head folded in float32 flips some of those near-ties
    def fold32(m: AffineMap, h: Head) -> Head:
        w32 = np.asarray(h.weight, np.float32)
        return Head(w32 @ m.weight.astype(np.float32), w32 @ m.bias.astype(np.float32) + h.bias)

    monkeypatch.setattr(hybrid_mod, "fold_head", fold32)
    top1_32 = hybrid_top1(tmp_path / "h32.onnx")
    assert (top1_32[clear] != own.argmax(1)[clear]).sum() > 0


def test_heads_are_folded_in_float64() -> None:
    """docs/ARCHITECTURE.md: W_B·W_M is formed in float64 before the compiled float32 pass. Here
    the fold cancels exactly: W_B = [1, 1, 1] (class 0) against W_M = [1e8, 1, −1e8]ᵀ gives 1 in
    float64, but 0 in float32 (1e8 + 1 rounds to 1e8 with a 24-bit mantissa), so class 1 (bias
    0.5) would win every image. All inputs are exact in float32; only the fold's arithmetic
    differs."""
    n = 8
    feats = {"a": np.ones((n, 1), np.float32), "b": np.ones((n, 3), np.float32)}
    heads = {"a": (np.array([[1.0], [0.0]], np.float32), np.array([0.0, 0.5], np.float32)),
             "b": (np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], np.float32),
                   np.array([0.0, 0.5], np.float32))}
    maps = MapSet([
        AffineMap("a", "b", np.array([[1e8], [1.0], [-1e8]], np.float32), np.zeros(3, np.float32),
                  "test"),
        AffineMap("b", "a", np.zeros((1, 3), np.float32), np.zeros(1, np.float32), "test")])
    t = evaluate(ArrayStore(feats, heads, np.zeros(n, np.int64)), maps, device="cpu")
    assert (t.pred[t.index("a"), t.index("b")] == 0).all()  # float32 fold: all 1
    assert t.top1[t.index("a"), t.index("b")] == 100.0
