"""Layer by layer on the digits miniature (issue 26 items 3-4): stage × stage CKA from one Gram
pass equals a direct NumPy CKA on the stored stage features, a network against itself is 1 on the
diagonal, and the depth curve rises with depth and ends at the ordinary hybrid's figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_similarity import ref_cka_debiased  # the n×n unbiased-HSIC reference

from affeq_rt.cli.main import main
from affeq_rt.demo import digits
from affeq_rt.demo.run import write_store
from affeq_rt.io.heads import load_head
from affeq_rt.io.store import ArrayStore, FeatureStore
from affeq_rt.method.depth import layer_analysis
from affeq_rt.method.evaluate import evaluate
from affeq_rt.method.fit import FitOptions, fit
from affeq_rt.method.stages import stage_spec
from affeq_rt.onnx.export import export_split
from affeq_rt.onnx.exported import ExportedBackbone
from affeq_rt.onnx.stages import ensure_stages, export_stages, stage_model
from affeq_rt.report.depth import depth_report_section

ARCHS = ("resnet_small", "inception_small")
A, B = (f"digits_{a}" for a in ARCHS)


@pytest.fixture(scope="module")
def stage_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two digits networks trained briefly (as ``demo --quick``), their stages exported from
    torch, and stage stores of the training and held-out digits."""
    out = tmp_path_factory.mktemp("depth")
    data = digits.load()
    feats: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    heads, specs = {}, {}
    for arch in ARCHS:
        model, _ = digits.train(arch, data, epochs=4)
        spec = digits.spec_for(arch)
        exp = ExportedBackbone(export_split(model, spec, out / f"digits_{arch}",
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
    doc = json.loads((out / "depth.json").read_text())
    la = layer_analysis(train, A, B, test=test)
    assert [p["score"] for p in doc["curves"][0]["points"]] == \
        [p.score for p in la.curves[0].points]
    for f in ("depth.csv", "cka.csv", "depth.md", "depth.png", "cka.png", "depth.html"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "cka.csv").read_text().splitlines()[0] == "row,column,cka,cka_debiased"
    title, section = depth_report_section(la)  # for write_report(extra_sections=...)
    assert "Layer by layer" in title
    assert section.count("<img") == 2
    # bad input: one line naming the thing and the fix, exit 1
    assert main(["depth", "-f", str(train), "-m", f"{A},nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'nope' is not in the store" in err[0]
    assert main(["depth", "-f", str(train), "-m", A, "--method", "adam"]) == 1
    assert "ols or ridge" in capsys.readouterr().err
