"""Issue 22: the few-data quality gate's pooled figure — every group (photo) scored once by a map
that never saw it (the CV folds' predictions on the training groups, the map's on the held-out
ones), with a standard error over groups — checked against an explicit loop over materialised
rows."""

from __future__ import annotations

import numpy as np
import pytest

from affeq_rt.engine import LocalExecutor
from affeq_rt.io.heads import Head
from affeq_rt.method import quality, select, solvers
from affeq_rt.method.fit import FitOptions, fit, holdout_mask
from affeq_rt.method.rows import ArraySource

K, DA, DB = 12, 16, 14


def _source(seed: int, photos: int) -> tuple[ArraySource, dict[str, np.ndarray], np.ndarray,
                                             dict[str, Head]]:
    """``photos`` photos with 1–4 views each (unequal groups, so the standard error is not a plain
    sd/√G); B's features a different linear function of A's than the heads imply (the logit-pinv
    map is wrong, so CV picks a correction and its fold predictions matter)."""
    rng = np.random.default_rng(seed)
    heads = {m: Head.from_raw(rng.normal(size=(K, d)), rng.normal(size=K), 0)
             for m, d in (("a", DA), ("b", DB))}
    g = np.repeat(np.arange(photos), rng.integers(1, 5, size=photos))
    a = (rng.normal(size=(photos, DA)) * 2.0)[g] + 0.3 * rng.normal(size=(g.size, DA))
    b = a @ rng.normal(size=(DB, DA)).T + 0.1 * rng.normal(size=(g.size, DB))
    feats = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
    return ArraySource(feats, heads=heads, groups=g), feats, g, heads


def _explicit_pooled(hits: list[bool], groups: list[int]) -> tuple[float, float]:
    """100 · Σhits / n and the cluster standard error, group by group in Python."""
    h: dict[int, float] = {}
    m: dict[int, float] = {}
    for hit, grp in zip(hits, groups, strict=True):
        h[grp] = h.get(grp, 0.0) + float(hit)
        m[grp] = m.get(grp, 0.0) + 1.0
    n, big_g = len(hits), len(h)
    p = sum(h.values()) / n
    ss = sum((h[k] - p * m[k]) ** 2 for k in h)
    return 100.0 * p, 100.0 * (big_g / (big_g - 1) * ss) ** 0.5 / n


def test_pooled_is_the_cluster_standard_error() -> None:
    """Unequal groups against the loop; equal groups give sd(p_g)/√G (ddof 1). Sums of ≤ 40 terms
    of size ≤ 4 in float64: agreement to 1e-12 relative."""
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(10), rng.integers(1, 7, size=10))
    hits = rng.random(g.size) < 0.6
    got = quality.pooled(hits, g)
    want = _explicit_pooled(hits.tolist(), g.tolist())
    assert got == pytest.approx(want, rel=1e-12)
    eq = np.repeat(np.arange(8), 5)
    h = rng.random(eq.size) < 0.5
    per = np.array([h[eq == k].mean() for k in range(8)])
    assert quality.pooled(h, eq)[1] == pytest.approx(100 * per.std(ddof=1) / np.sqrt(8),
                                                     rel=1e-12)
    assert quality.pooled(np.array([True, False]), np.array([0, 0])) == (50.0, 0.0)


def test_gate_pools_every_group_as_an_explicit_loop() -> None:
    """60 photos, hold-out 0.1 (a handful of photos held out): the gate's pooled agreement equals
    a loop that refits the chosen candidate on each CV fold's other training rows (the explicit
    spectral map, not CV's residual-projection shortcut), classifies every row one at a time, and
    pools by photo. Classes are argmaxes of 12 logits whose gaps are ≫ the ~1e-13 float64 error
    of the two orders of summation, so the hit counts, hence the percentages, are equal; the
    standard errors to 1e-12 relative."""
    src, feats, g, heads = _source(1, 60)
    res = fit(src, method="prior-ridge", options=FitOptions(holdout=0.1, seed=0))
    st = res.maps["a", "b"].stats
    assert st["choice"] != "prior"
    assert 0 < st["holdout_groups"] < quality.CV_GATE_GROUPS
    n = g.size
    hold = holdout_mask(n, 0.1, 0, g)
    xa, xb = feats["a"].astype(np.float64), feats["b"].astype(np.float64)
    prior = select.Prior.of(heads["a"], heads["b"])
    cand = next(c for c in select.candidates("prior-ridge") if c.label == st["choice"])
    wb, cb = heads["b"].weight.astype(np.float64), heads["b"].bias.astype(np.float64)

    def classify(w: np.ndarray, b: np.ndarray, i: int) -> int:
        return int(np.argmax(wb @ (w @ xa[i] + b) + cb))

    train = np.flatnonzero(~hold)
    ids = np.unique(g[train], return_inverse=True)[1]  # training photos 0…G−1
    perm = np.random.default_rng(0).permutation(ids.max() + 1)  # CV's seeded round-robin
    fold_of = {int(perm[i]): i % select.CV_FOLDS for i in range(perm.size)}
    pred: dict[int, int] = {}
    for f in range(select.CV_FOLDS):
        inside = [int(r) for r, k in zip(train, ids, strict=True) if fold_of[int(k)] != f]
        spec = solvers.row_spectrum(xa[inside])
        w, b = solvers.spectral_map(spec, xb[inside], prior.w, cand.filter(spec), prior.b,
                                    cand.shrink(spec, len(inside)))
        for r, k in zip(train, ids, strict=True):
            if fold_of[int(k)] == f:
                pred[int(r)] = classify(w, b, int(r))
    spec = solvers.row_spectrum(xa[train])
    w, b = solvers.spectral_map(spec, xb[train], prior.w, cand.filter(spec), prior.b,
                                cand.shrink(spec, train.size))
    for r in np.flatnonzero(hold):
        pred[int(r)] = classify(w, b, int(r))
    own = [int(np.argmax(wb @ xb[i] + cb)) for i in range(n)]
    base = [int(np.argmax(wb @ (prior.w @ xa[i] + prior.b) + cb)) for i in range(n)]
    rows = sorted(pred)
    assert rows == list(range(n))  # every row scored once
    agree = _explicit_pooled([pred[i] == own[i] for i in rows], [int(g[i]) for i in rows])
    agree0 = _explicit_pooled([base[i] == own[i] for i in rows], [int(g[i]) for i in rows])
    assert (st["cv_groups"], st["cv_images"]) == (60, n)
    assert st["agree_cv"] == agree[0]
    assert st["agree_cv_se"] == pytest.approx(agree[1], rel=1e-12)
    assert st["agree_cv_logit_pinv"] == agree0[0]
    assert st["agree_cv_logit_pinv_se"] == pytest.approx(agree0[1], rel=1e-12)
    assert st["agree_cv"] > st["agree_cv_logit_pinv"] + 20  # the correction is real
    line = quality.quality_line("a->b", "prior-ridge", st)
    assert f"all 60 groups ({n} images), each scored by a map that never saw it" in line
    assert f"agreement {agree[0]:.1f}% ± {agree[1]:.1f}" in line


def test_gate_adds_no_pass_and_no_fit() -> None:
    """The pooled figure reads predictions the fit already made: one pass over the rows and the
    same number of row spectra (SVDs) as with the pooled figure switched off."""
    src, *_ = _source(2, 60)
    calls: list[str] = []
    spectra: list[int] = []
    real_run, real_spec = LocalExecutor.run, solvers.row_spectrum
    mp = pytest.MonkeyPatch()
    mp.setattr(LocalExecutor, "run", lambda self, *a, **k: calls.append("pass")
               or real_run(self, *a, **k))
    mp.setattr(solvers, "row_spectrum", lambda *a, **k: spectra.append(1) or real_spec(*a, **k))
    try:
        on = fit(src, method="prior-ridge", options=FitOptions(holdout=0.1)).maps["a", "b"]
        assert on.stats["agree_cv"] is not None
        assert len(calls) == 1
        with_gate = len(spectra)
        mp.setattr(quality, "CV_GATE_GROUPS", 0)
        off = fit(src, method="prior-ridge", options=FitOptions(holdout=0.1)).maps["a", "b"]
        assert "agree_cv" not in off.stats
        assert len(calls) == 2
        assert len(spectra) == 2 * with_gate
    finally:
        mp.undo()
    np.testing.assert_array_equal(on.weight, off.weight)


def test_gate_keeps_the_split_with_enough_held_out_groups() -> None:
    """≥ CV_GATE_GROUPS held-out photos: the split alone (unbiased, enough photos); hold-out 0:
    no figure at all. The warnings compare the pooled figures where they exist."""
    src, *_ = _source(3, 60)
    st = fit(src, method="prior-ridge", options=FitOptions(holdout=0.4)).maps["a", "b"].stats
    assert st["holdout_groups"] >= quality.CV_GATE_GROUPS
    assert "agree_cv" not in st
    none = fit(src, method="prior-ridge", options=FitOptions(holdout=0.0)).maps["a", "b"].stats
    assert "agree_cv" not in none
    warn = quality.quality_warnings({"agree_holdout": 50.0, "agree_holdout_logit_pinv": 40.0,
                                     "agree_cv": 30.0, "agree_cv_logit_pinv": 35.0,
                                     "holdout_images": 10}, "prior-ridge")
    assert warn == ["cross-validated agreement 30.0% is below the logit-pinv map's 35.0%"]
