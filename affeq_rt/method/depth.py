"""Layer by layer (issue 26): stage × stage similarity and the depth curve, from ONE Gram pass.

Over a feature store with stages (``extract(..., stages=True)``: ``NAME@s1`` … ``NAME@sK`` and
``NAME``), one pass of the engine feeds a :class:`~affeq_rt.method.reducers.GramReducer` over the
joint rows of every stage of both networks (training and held-out Grams by the same held-out
split as ``fit``) and, without a separate test store, the held-out rows. From it:

- **layer × layer linear CKA** of every pair of stages (of A with B, and of A with itself):
  ‖S_ab‖_F² / (‖S_aa‖_F ‖S_bb‖_F) over all rows, exactly as ``method.similarity`` computes it,
  and the debiased CKA from the same pass's row statistics (what few images call for);
- **the depth curve**: for each stage i of A (and A's own features last), the affine map from
  A's stage-i pooled features to B's features, solved from the training Gram by the same solver
  as ``fit --method ols|ridge`` (``method.solvers``), folded into B's unchanged classifier and
  scored on held-out images: top-1 with labels, agreement with B's own prediction otherwise. The
  last point is therefore the ordinary hybrid A→B of ``fit`` + ``evaluate`` (same images, same
  map). B's own accuracy and A's own are reported beside it.

The images are read once, by the stage extraction; everything here reads stored rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from affeq_rt.core.evaluate import evaluate_heads
from affeq_rt.engine import run_pass
from affeq_rt.errors import AffeqError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap, fold_head
from affeq_rt.io.store import StoreLike, open_store
from affeq_rt.method import solvers
from affeq_rt.method.fit import FitOptions
from affeq_rt.method.methods import holdout_mask
from affeq_rt.method.reducers import GramReducer, HeldOutRows, RowNorms
from affeq_rt.method.rows import StoreSource, model_slices, source_groups, source_labels
from affeq_rt.method.similarity import _debiased_cka
from affeq_rt.method.solvers import Moments
from affeq_rt.method.stages import network_models, stage_of
from affeq_rt.progress import Progress
from affeq_rt.registry.spec import get_spec

METHODS = ("ols", "ridge")


def linear_cka(moments: Moments, slices: Mapping[str, slice],
               norms: RowNorms | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Linear CKA of every pair of blocks of a joint Gram state, ‖S_ab‖_F² / (‖S_aa‖_F ‖S_bb‖_F)
    (float64 [k, k]; NaN where a block has no variance), and with the row statistics ``norms``
    over the same rows the debiased CKA (``method.similarity``'s unbiased HSIC; None without)."""
    names = list(slices)
    xty = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j in range(i, len(names)):
            s = np.asarray(moments.scatter(slices[a], slices[names[j]]), np.float64)
            xty[i, j] = xty[j, i] = float(np.sum(s * s))
    fro = np.sqrt(np.diag(xty))  # ‖S_aa‖_F
    with np.errstate(divide="ignore", invalid="ignore"):
        cka = np.where(np.outer(fro, fro) > 0, xty / np.outer(fro, fro), np.nan)
    if norms is None:
        return cka, None
    tr = np.array([float(np.trace(moments.scatter(slices[m], slices[m]))) for m in names])
    return cka, _debiased_cka(norms.centred_products(moments), xty, tr, int(moments.n))


@dataclass
class DepthPoint:
    """One stage of the source: its store model, stage name and module, width, the map's rank
    and in-sample R², and the hybrid's score on the held-out images (percent)."""

    model: str
    stage: str
    module: str
    dim: int
    score: float
    rank: int
    r2: float | None
    pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the per-image predictions left out)."""
        return {k: v for k, v in vars(self).items() if k != "pred"}


@dataclass
class DepthCurve:
    """C_B(M_i · pool(F_A,i(x))) against depth i: ``points`` shallow to deep, A's own features
    last. ``metric``: ``top1`` (labels) or ``agreement`` (with B's own prediction)."""

    source: str
    target: str
    method: str
    metric: str
    points: list[DepthPoint]
    target_own: float  # B alone: top-1, or 100 (agreement with itself)
    source_own: float | None  # A alone: top-1 (None when scored by agreement)
    images: int  # training images of the maps
    scored: int  # held-out images scored

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**{k: getattr(self, k) for k in ("source", "target", "method", "metric",
                                                 "target_own", "source_own", "images",
                                                 "scored")},
                "points": [p.to_dict() for p in self.points]}


@dataclass
class LayerAnalysis:
    """What :func:`layer_analysis` found: stage × stage CKA over ``models`` (every stage of the
    networks, shallow to deep per network) and one depth curve per ordered pair of networks."""

    networks: list[str]
    models: list[str]
    stages: dict[str, dict[str, Any]]  # model -> {network, stage, module, dim}
    n: int
    cka: np.ndarray
    curves: list[DepthCurve]
    source: dict[str, Any] = field(default_factory=dict)
    cka_debiased: np.ndarray | None = None  # unbiased HSIC (None below 4 images)

    def block(self, a: str, b: str, debiased: bool = False) -> np.ndarray | None:
        """The (debiased) CKA block of network ``a``'s stages (rows) against ``b``'s (columns);
        None for a debiased block that was not computed."""
        mat = self.cka_debiased if debiased else self.cka
        if mat is None:
            return None
        ia = [i for i, m in enumerate(self.models) if self.stages[m]["network"] == a]
        ib = [i for i, m in enumerate(self.models) if self.stages[m]["network"] == b]
        return mat[np.ix_(ia, ib)]

    def curve(self, source: str, target: str) -> DepthCurve:
        """The depth curve source → target."""
        for c in self.curves:
            if (c.source, c.target) == (source, target):
                return c
        raise AffeqError(f"no depth curve {source} -> {target}",
                         f"the analysis holds {', '.join(self.networks)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN → None)."""
        def mat(a: np.ndarray | None) -> list[list[float | None]] | None:
            return None if a is None else [[None if not np.isfinite(v) else float(v) for v in r]
                                           for r in a]

        return {"networks": self.networks, "models": self.models, "stages": self.stages,
                "n": self.n, "source": self.source, "cka": mat(self.cka),
                "cka_debiased": mat(self.cka_debiased),
                "curves": [c.to_dict() for c in self.curves]}


def _stage_info(model: str, spec: Mapping[str, Any], dim: int) -> dict[str, Any]:
    net = stage_of(spec)
    st = spec.get("stage") or {}
    return {"network": net or model, "stage": st.get("name", "features"),
            "module": st.get("module", "features (classifier input)"), "dim": int(dim)}


def _canonical(name: str, models: Sequence[str]) -> str:
    """A store's model name as given, else the registry's canonical name of an alias."""
    if name in models:
        return name
    try:
        return get_spec(name).name
    except AffeqError:
        return name  # not a registry name either: refused below, naming the store's networks


def _networks(store: StoreLike, a: str, b: str | None) -> tuple[list[str], list[str]]:
    specs = {m: store.spec(m) for m in store.models}
    a, b = _canonical(a, store.models), None if b is None else _canonical(b, store.models)
    nets = [a] if b is None or b == a else [a, b]
    models: list[str] = []
    for net in nets:
        got = network_models(store.models, specs, net)
        if net not in store.models or len(got) < 2:
            have = sorted({stage_of(s) or m for m, s in specs.items()})
            raise AffeqError(f"the store has no stages of {net!r}" if net in store.models else
                             f"network {net!r} is not in the store (it has {', '.join(have)})",
                             "extract with stages: affeq-rt extract --stages --models A,B")
        models += got
    return nets, models


def _score(x: np.ndarray, head: Head, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Predictions and the percentage of rows whose prediction is ``labels``."""
    r = evaluate_heads(np.ascontiguousarray(x, np.float32), head.weight[None].astype(np.float32),
                       head.bias[None].astype(np.float32), labels.astype(np.int64), device="cpu")
    return np.asarray(r.pred)[0], 100.0 * float(np.asarray(r.top1)[0]) / max(len(x), 1)


def _held_out(test: StoreLike | None, models: Sequence[str], slices: Mapping[str, slice],
              red: Mapping[str, Any], labels: np.ndarray | None
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The scored rows per model and their labels: the test store's, or the held-out rows."""
    if test is not None:
        lab = test.labels
        return ({m: np.asarray(test.features(m), np.float32) for m in models},
                None if lab is None or bool((np.asarray(lab) < 0).all()) else
                np.asarray(lab, np.int64))
    kept = red["heldout"].rows()
    if kept is None:
        raise AffeqError("no held-out images to score the depth curve on",
                         "pass --holdout > 0 or --test STORE")
    x, idx = kept
    return {m: x[:, slices[m]] for m in models}, None if labels is None else labels[idx]


def _depth_pass(st: Any, models: list[str], options: FitOptions, with_heldout: bool,
                progress: Progress | None) -> tuple[StoreSource, dict[str, slice], Any, dict]:
    """The one Gram pass over every stage of ``models``: the rows, their slices, their labels
    (None if unlabelled) and the reducers (Gram with row norms; held-out rows if asked)."""
    rows = StoreSource(st, models)
    slices = model_slices(models, rows.dims())
    labels = source_labels(rows)
    mask = holdout_mask(rows.n, options.holdout, options.seed, source_groups(rows))
    red: dict[str, Any] = {"gram": GramReducer(slices, mask, options.device, row_norms=True)}
    if with_heldout:
        red["heldout"] = HeldOutRows(mask, int(mask.sum()))
    run_pass(rows, red, executor=options.executor, progress=progress, task="stages")
    return rows, slices, labels, red


def _curve(st: Any, src: str, dst: str, method: str, fit: tuple[Any, Any, dict[str, slice]],
           scored: tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, Head]]
           ) -> DepthCurve:
    """The depth curve ``src``→``dst``: one map per stage of ``src`` solved from the Gram
    (``fit``: train and held-out moments, slices), scored through ``dst``'s head on the
    ``scored`` rows (rows per model, labels or None, heads)."""
    train, hold, slices = fit
    xs, lab, heads = scored
    dims = {m: sl.stop - sl.start for m, sl in slices.items()}
    fn = solvers.ols if method == "ols" else solvers.ridge
    own_pred, _ = _score(xs[dst], heads[dst], np.full(len(xs[dst]), -1))
    target_own = _score(xs[dst], heads[dst], lab)[1] if lab is not None else 100.0
    source_own = _score(xs[src], heads[src], lab)[1] if lab is not None else None
    truth = lab if lab is not None else own_pred
    points = []
    for m in (x for x in slices if _stage_info(x, st.spec(x), dims[x])["network"] == src):
        w, bias, stats = fn(train, slices[m], slices[dst], hold)
        amap = AffineMap(m, dst, w.astype(np.float32), bias.astype(np.float32), method,
                         stats)  # stored as fit stores a map: float32
        pred, score = _score(xs[m], fold_head(amap, heads[dst]), truth)
        info = _stage_info(m, st.spec(m), dims[m])
        points.append(DepthPoint(m, info["stage"], info["module"], dims[m], score,
                                 int(stats.get("rank", dims[m])), stats.get("r2_train"), pred))
    return DepthCurve(src, dst, method, "top1" if lab is not None else "agreement", points,
                      target_own, source_own, int(train.n), len(xs[dst]))


def layer_analysis(store: StoreLike | str | os.PathLike, a: str, b: str | None = None, *,
                   test: StoreLike | str | os.PathLike | None = None, method: str = "ols",
                   options: FitOptions | None = None,
                   progress: Progress | None = None) -> LayerAnalysis:
    """Stage × stage CKA of networks ``a`` and ``b`` (``b`` None or ``a``: within one) and the
    depth curves a→b and b→a, from one pass over ``store`` (a stage store or its folder).

    The held-out split is ``fit``'s (``options``: ``holdout``, ``seed``, whole groups; also its
    ``device`` and ``executor``), so each curve's last point is the ordinary hybrid's figure for
    the same maps. ``test``: a stage store of other images to score on (then every point is
    scored on all of its rows)."""
    o = options or FitOptions()
    if method not in METHODS:
        raise AffeqError(f"the depth curve solves maps from the Gram: method {method!r} is not "
                         "one of them", f"use --method {' or '.join(METHODS)}")
    holdout_mask(0, o.holdout)  # AffeqError for a bad fraction, before any work
    st = open_store(store)
    tst = open_store(test) if test is not None else None
    nets, models = _networks(st, a, b)
    if tst is not None:
        missing = [m for m in models if m not in tst.models]
        if missing:
            raise AffeqError(f"the test store lacks {', '.join(missing[:3])}",
                             "extract the test images with the same --models and --stages")
    rows, slices, labels, red = _depth_pass(st, models, o, tst is None, progress)
    g: GramReducer = red["gram"]
    both = g.train + g.holdout if int(g.holdout.n) else g.train
    cka, deb = linear_cka(both, slices, g.norms)
    xs, lab = _held_out(tst, models, slices, red, labels)
    fit = (g.train, g.holdout if int(g.holdout.n) > 0 else None, slices)
    scored = (xs, lab, {n: st.head(n) for n in nets})
    curves = [_curve(st, src, dst, method, fit, scored) for src in nets for dst in nets
              if src != dst or len(nets) == 1]
    dims = rows.dims()
    return LayerAnalysis(nets, models, {m: _stage_info(m, st.spec(m), dims[m]) for m in models},
                         int(both.n), cka, curves, rows.describe(), deb)
