"""Layer by layer on the digits miniature (issue 26 items 3-4): stage × stage CKA from one Gram
pass equals a direct NumPy CKA on the stored stage features (and every other measure equals
``similarity`` on the same rows), a network against itself is 1 on the diagonal, the depth curve
rises with depth and ends at the ordinary hybrid's figure for every Gram method, and its controls
(shuffled pairs, random weights) equal least squares on the materialised rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_similarity import ref_cka_debiased  # the n×n unbiased-HSIC reference

from affeq_rt.cli.main import main
from affeq_rt.core.evaluate import evaluate_heads
from affeq_rt.demo import digits
from affeq_rt.demo.run import write_store
from affeq_rt.io.heads import load_head
from affeq_rt.io.store import ArrayStore, FeatureStore
from affeq_rt.method.controls import control_name
from affeq_rt.method.depth import _beats, layer_analysis
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.methods import holdout_mask
from affeq_rt.method.reducers import chunk_permutation
from affeq_rt.method.similarity import similarity
from affeq_rt.method.stages import stage_spec
from affeq_rt.onnx.export import export_split
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.stages import ensure_stages, export_stages, stage_model
from affeq_rt.report.depth import depth_report_section

ARCHS = ("resnet_small", "inception_small")
A, B = (f"digits_{a}" for a in ARCHS)
RND = control_name(A, "random")  # A's architecture with random weights, stages and all


@pytest.fixture(scope="module")
def stage_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two digits networks trained briefly (as ``demo --quick``) and A's architecture with random
    weights (``A~random``), their stages exported from torch, and stage stores of the training
    and held-out digits."""
    import dataclasses

    import torch
    out = tmp_path_factory.mktemp("depth")
    data = digits.load()
    feats: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    heads, specs = {}, {}
    for arch, trained in ((ARCHS[0], True), (ARCHS[1], True), (ARCHS[0], False)):
        spec = digits.spec_for(arch)
        if trained:
            model, _ = digits.train(arch, data, epochs=4)
        else:
            torch.manual_seed(1)
            model = digits.build(arch).eval()
            spec = dataclasses.replace(spec, name=control_name(spec.name, "random"))
        exp = ExportedBackbone(export_split(model, spec, out / spec.name.replace("~", "_"),
                                            inputs=(data.x_test[:16], data.ids_test[:16])))
        export_stages(model, exp, inputs=data.x_test[:16])
        sm = ensure_stages(exp, provider="cpu")
        w, b = load_head(exp.head_path)
        for part, x in (("train", data.x_train), ("test", data.x_test)):
            got = sm.run(x)
            for s in sm.stages:
                feats[part][stage_model(exp.name, s.name)] = got[s.name]
            feats[part][exp.name] = got["features"]
        for s in sm.stages:
            m = stage_model(exp.name, s.name)
            heads[m] = (np.zeros((w.shape[0], s.dim), np.float32), np.zeros(w.shape[0],
                                                                             np.float32))
            specs[m] = stage_spec(spec.to_dict(), s)
        heads[exp.name], specs[exp.name] = (w, b), spec.to_dict()
    stores = [write_store(out / f"store_{part}", ArrayStore(feats[part], heads, y, specs),
                          source=f"digits-{part}")
              for part, y in (("train", data.y_train), ("test", data.y_test))]
    return stores[0], stores[1]


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_layer_cka_is_exact(stage_stores: tuple[Path, Path]) -> None:
    """Against NumPy on the stored rows, all of them (train and held-out). 1e-8: the Gram sums
    float32 products exactly representable in float64 (24 + 24 bits < 53), so both sides differ
    only by float64 summation order over 1,198 rows (~1e-13 relative); dropping or double-counting
    one row moves a CKA by ~1e-4."""
    train, _ = stage_stores
    la = layer_analysis(train, A, B, test=None, options=FitOptions(holdout=0.1))
    st = FeatureStore.open(train)
    assert la.models == [*(f"{A}@s{i}" for i in (1, 2, 3)), A,
                         *(f"{B}@s{i}" for i in (1, 2, 3)), B]
    assert la.n == st.n
    for i, a in enumerate(la.models):
        for j, b in enumerate(la.models):
            ref = _cka(np.asarray(st.features(a), np.float64), np.asarray(st.features(b),
                                                                         np.float64))
            assert abs(la.cka[i, j] - ref) <= 1e-8, (a, b)
    # debiased CKA (unbiased HSIC, Song et al. 2012) against the n×n kernel formula, for A's
    # stages against B's features (the kernels' sums run over n² = 1.4e6 float64 terms: ~1e-12)
    j = la.models.index(B)
    y = np.asarray(st.features(B), np.float64)
    for i, a in enumerate(la.models[:4]):
        ref = ref_cka_debiased(np.asarray(st.features(a), np.float64), y)
        assert abs(la.cka_debiased[i, j] - ref) <= 1e-8, a
    assert {c.scored_on for c in la.curves} == {"held-out"}
    own = layer_analysis(train, A).block(A, A)
    assert np.abs(np.diag(own) - 1.0).max() <= 1e-12  # ‖S‖²/‖S‖² in float64


def test_depth_curve_rises_and_ends_at_the_ordinary_hybrid(stage_stores: tuple[Path, Path]
                                                           ) -> None:
    train, test = stage_stores
    la = layer_analysis(train, A, B, test=test, method="ols",
                        options=FitOptions(holdout=0.1, seed=0))
    for src, dst in ((A, B), (B, A)):
        c = la.curve(src, dst)
        scores = [p.score for p in c.points]
        assert c.metric == "top1"
        assert [p.model for p in c.points] == [*(f"{src}@s{i}" for i in (1, 2, 3)), src]
        # rises with depth: every stage at least as good as the one before, up to two held-out
        # images (a map from other features may flip a near-tie), and the last well above the
        # first (the stem's pooled channels carry little of the digit)
        print(src, "->", dst, [round(v, 2) for v in scores])
        assert np.all(np.diff(scores) >= -2 * 100.0 / c.scored), scores
        assert scores[-1] > scores[0] + 2 * 100.0 / c.scored, scores
        fitted = fit(train, models=[src, dst], method="ols",
                     options=FitOptions(holdout=0.1, seed=0, curve="off"))
        table = evaluate(test, fitted.maps, device="cpu", models=[src, dst])
        i, j = table.models.index(src), table.models.index(dst)
        assert scores[-1] == pytest.approx(float(table.top1[i, j]), abs=1e-9)
        # the same map: the same prediction on every image, and the same in-sample R² (one
        # solver on the same Gram sums: equal to float64 rounding)
        assert np.array_equal(c.points[-1].pred, table.pred[i, j])
        r2 = fitted.maps[(src, dst)].stats["r2_train"]
        assert c.points[-1].r2 == pytest.approx(r2, rel=1e-12)
        assert c.target_own == pytest.approx(float(table.top1[j, j]), abs=1e-9)
        assert c.source_own == pytest.approx(float(table.top1[i, i]), abs=1e-9)


def test_cli_depth_writes_tables_and_figures(stage_stores: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    train, test = stage_stores
    out = tmp_path / "depth"
    assert main(["depth", "-f", str(train), "--test", str(test), "-m", f"{A},{B}", "-o",
                 str(out), "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert f"depth curve {A} -> {B}" in shown
    assert "599 test images" in shown  # scored on --test's digits, not a held-out split
    doc = json.loads((out / "depth.json").read_text())
    la = layer_analysis(train, A, B, test=test)
    assert [p["score"] for p in doc["curves"][0]["points"]] == \
        [p.score for p in la.curves[0].points]
    for f in ("depth.csv", "cka.csv", "depth.md", "depth.png", "cka.png", "depth.html"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "cka.csv").read_text().splitlines()[0] == \
        "row,column,cka,cka_debiased,cca_mean,svcca,r2,procrustes,mutual_knn"
    assert "usable from" in shown or "no stage beats" in shown
    title, section = depth_report_section(la)  # for write_report(extra_sections=...)
    assert "Layer by layer" in title
    assert section.count("<img") == 2
    assert "shuffled" in section
    assert "random" in section
    # bad input: one line naming the thing and the fix, exit 1
    assert main(["depth", "-f", str(train), "-m", f"{A},nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'nope' is not in the store" in err[0]
    assert main(["depth", "-f", str(train), "-m", A, "--method", "adam"]) == 1
    assert "use --method ols,ridge,orthogonal,low-rank" in capsys.readouterr().err


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares with an intercept on materialised float64 rows (numpy's lstsq)."""
    w = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    return w[:-1].T, w[-1]


def _top1(x: np.ndarray, w: np.ndarray, b: np.ndarray, head: tuple[np.ndarray, np.ndarray],
          truth: np.ndarray) -> float:
    """The map folded into the head (as ``io.maps.fold_head``: W_C W, W_C b + b_C), float32
    as stored, scored on ``x``: percent of rows predicted as ``truth``."""
    wc, bc = (np.asarray(v, np.float64) for v in head)
    r = evaluate_heads(np.ascontiguousarray(x, np.float32), (wc @ w).astype(np.float32)[None],
                       (wc @ b + bc).astype(np.float32)[None], truth.astype(np.int64),
                       device="cpu")
    return 100.0 * float(np.asarray(r.top1)[0]) / len(x)


def test_depth_controls_are_least_squares_on_materialised_rows(stage_stores: tuple[Path, Path]
                                                              ) -> None:
    """The shuffled control of every stage is lstsq from A's training stage rows to B's rows
    permuted by permutation 0 of the null (one chunk: the store's 4,096-row grid holds all
    1,198 rows); the random-weight control is lstsq from ``A~random``'s stage at the same depth.
    Both are scored through B's head on the test digits. Tolerance: one test image (100/599
    points): the maps agree to float64 rounding (~1e-12 relative, condition numbers < 1e4 here)
    and both are cast to float32, so only a logit tie within ~1e-6 could flip a prediction."""
    train, test = stage_stores
    la = layer_analysis(train, A, B, test=test, options=FitOptions(holdout=0.1, seed=0))
    st, ts = FeatureStore.open(train), FeatureStore.open(test)
    keep = ~holdout_mask(st.n, 0.1, 0)
    y = np.asarray(st.features(B), np.float64)[keep]
    y_shuffled = y[chunk_permutation(0, 0, int(keep.sum()))]
    head, truth = (st.head(B).weight, st.head(B).bias), np.asarray(ts.labels)
    c = la.curve(A, B)
    assert len(c.points) == 4
    assert all(set(p.controls) == {"shuffled", "random"}
                                      for p in c.points)
    for p, r in zip(c.points, [*(f"{RND}@s{i}" for i in (1, 2, 3)), RND], strict=True):
        x = np.asarray(st.features(p.model), np.float64)[keep]
        got = _top1(np.asarray(ts.features(p.model)), *_ols(x, y_shuffled), head, truth)
        assert abs(p.controls["shuffled"] - got) <= 100.0 / c.scored + 1e-9, p.model
        xr = np.asarray(st.features(r), np.float64)[keep]
        got = _top1(np.asarray(ts.features(r)), *_ols(xr, y), head, truth)
        assert abs(p.controls["random"] - got) <= 100.0 / c.scored + 1e-9, r
    # beats: clears each control and chance by 2 SE of a difference of two proportions over
    # the 599 images (method.controls), recomputed here from the reported scores
    for p in c.points:
        def clears(q: float, p=p) -> bool:
            a, b = p.score / 100, q / 100
            return p.score - q > 2 * 100 * np.sqrt((a * (1 - a) + b * (1 - b)) / c.scored)
        assert p.beats == all(clears(q) for q in (*p.controls.values(), c.chance)), p.model
    # the shuffled maps learn nothing of the image: near chance (10 classes, 599 images: the
    # constant guess is ~10 %; 4 SE of a 10 % proportion over 599 images is 4.9 points)
    assert all(p.controls["shuffled"] <= c.chance + 4.9 for p in c.points)
    assert c.points[-1].beats
    assert c.first_beating is not None
    # B -> A has no random-weight B in the store: the shuffled control only
    assert all(set(p.controls) == {"shuffled"} for p in la.curve(B, A).points)


@pytest.mark.parametrize("method", ["orthogonal", "low-rank"])
def test_depth_curve_by_map_family_ends_at_the_fitted_hybrid(stage_stores: tuple[Path, Path],
                                                             method: str) -> None:
    """Every Gram method of fit draws a curve; its last point is fit --method's hybrid, the same
    prediction on every test image (one ``GramMethod.pair`` on the same Gram sums)."""
    train, test = stage_stores
    o = FitOptions(holdout=0.1, seed=0, curve="off")
    la = layer_analysis(train, A, B, test=test, method=f"ols,{method}", options=o)
    assert [c.method for c in la.curves] == ["ols", "ols", method, method]
    fitted = fit(train, models=[A, B], method=method, options=o)
    table = evaluate(test, fitted.maps, device="cpu", models=[A, B])
    for src, dst in ((A, B), (B, A)):
        c = la.curve(src, dst, method)
        i, j = table.models.index(src), table.models.index(dst)
        assert np.array_equal(c.points[-1].pred, table.pred[i, j])


def test_every_measure_equals_similarity_on_the_stage_rows(stage_stores: tuple[Path, Path]
                                                           ) -> None:
    """The layer x layer matrices are ``affeq-rt similarity``'s on the same stored rows, each
    stage taken as a network (the same function on the same Gram sums: equal to the last bit
    up to summation order, 1e-12 on measures in [0, 2])."""
    train, _ = stage_stores
    la = layer_analysis(train, A, B, options=FitOptions(holdout=0.1))
    ref = similarity(train, la.models, device="cpu")
    for name, mat in la.similarity.measures().items():
        other = getattr(ref, name)
        assert other is not None, name
        np.testing.assert_allclose(mat, other, rtol=0, atol=1e-12, err_msg=name)
    assert set(la.similarity.measures()) >= {"cka", "cka_debiased", "cca_mean", "svcca", "r2",
                                             "procrustes", "mutual_knn"}


def test_beating_needs_chance_too() -> None:
    """A point clears chance as it clears a control: by 2 SE of the difference (100 images,
    12 % against a 10 % constant guess: SE = sqrt(.12·.88 + .1·.9)/10 = 4.4 points)."""
    assert not _beats(12.0, {"shuffled": 0.0}, 10.0, 100)
    assert _beats(30.0, {"shuffled": 0.0}, 10.0, 100)  # 20 points > 2 × 5.6
    assert not _beats(30.0, {"shuffled": 25.0}, 10.0, 100)


@pytest.mark.parametrize(("method", "says"), [("ridge", "ridge needs held-out images"),
                                               ("low-rank", "low-rank chooses its rank")])
def test_methods_that_choose_on_held_out_images_refuse_none(stage_stores: tuple[Path, Path],
                                                            method: str, says: str,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """fit's own refusal (``GramMethod.check_holdout``), before any pass, even with a test store
    to score on: λ or the rank is chosen on the maps' held-out split."""
    import affeq_rt.method.depth as depth
    from affeq_rt.errors import AffeqError

    train, test = stage_stores
    with monkeypatch.context() as mp:
        def no_pass(*_a: object, **_k: object) -> None:
            raise AssertionError("the pass ran before the refusal")

        mp.setattr(depth, "run_pass", no_pass)
        with pytest.raises(AffeqError, match=says):
            layer_analysis(train, A, B, test=test, method=f"ols,{method}",
                           options=FitOptions(holdout=0.0))
    la = layer_analysis(train, A, B, test=test, method="low-rank",  # a given rank needs none
                        options=FitOptions(holdout=0.0, rank=4))
    assert [(c.source, c.method) for c in la.curves] == [(A, "low-rank"), (B, "low-rank")]
