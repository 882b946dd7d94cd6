"""Layer by layer (issue 26): stage × stage similarity and the depth curve, from ONE Gram pass.

Over a feature store with stages (``ExtractOptions(stages=True)``: ``NAME@s1`` … ``NAME@sK`` and
``NAME``), one pass of the engine feeds a :class:`~affeq_rt.method.reducers.GramReducer` over the
joint rows of every stage of both networks (training and held-out Grams by the same held-out
split as ``fit``), the permuted cross blocks of the shuffled control and, without a separate test
store, the held-out rows. From it:

- **layer × layer similarity** of every pair of stages (of A with B, and of A with itself): every
  measure of ``affeq-rt similarity`` (linear and debiased CKA, mean CCA, SVCCA, R², Procrustes,
  mutual k-NN) over all rows, computed by ``method.similarity.similarity_from_moments`` as if
  each stage were a network;
- **the depth curve**: for each stage i of A (and A's own features last), the affine map from
  A's stage-i pooled features to B's features, solved from the training Gram by any Gram method
  of ``fit`` (``ols``, ``ridge`` and the map families ``orthogonal``, ``low-rank``: the same
  :meth:`~affeq_rt.method.methods.GramMethod.pair`), folded into B's unchanged classifier and
  scored on held-out images: top-1 with labels, agreement with B's own prediction otherwise. The
  last point is therefore the ordinary hybrid A→B of ``fit`` + ``evaluate`` (same images, same
  map). B's own accuracy and A's own are reported beside it.
- **controls per stage** (``method.controls``): the OLS map fitted on mismatched pairs (A's stage
  rows against B's rows permuted, the permutation of the null) and, when the store holds the
  random-weight network ``A~random`` with its stages (``extract --stages --models A,A~random,B``),
  the same map from the random network's stage i. A point **beats** its controls when it clears
  each of them, and the best constant guess, by 2 standard errors.

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
from affeq_rt.method.controls import best_guess, clears, control_name
from affeq_rt.method.fit import FitOptions
from affeq_rt.method.methods import REGISTRY, GramMethod, holdout_mask
from affeq_rt.method.null import _Permuted
from affeq_rt.method.reducers import GramReducer, HeldOutRows, PermutedCross
from affeq_rt.method.rows import StoreSource, model_slices, source_groups, source_labels
from affeq_rt.method.similarity import SimilarityTable, knn_rows, similarity_from_moments
from affeq_rt.method.stages import network_models, stage_of
from affeq_rt.progress import Progress
from affeq_rt.registry.spec import get_spec

#: The Gram methods of ``fit`` (one :meth:`GramMethod.pair` each), in registry order.
METHODS = tuple(n for n, c in REGISTRY.items() if issubclass(c, GramMethod))
CONTROLS = ("shuffled", "random")  # per-stage controls, display order


def parse_methods(method: str | Sequence[str]) -> list[str]:
    """``"ols,orthogonal"`` or a list → the methods, each checked (one-line refusal)."""
    names = [m.strip() for m in (method.split(",") if isinstance(method, str) else method)]
    names = [m for m in dict.fromkeys(names) if m]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        got = bad[0] if bad else method
        raise AffeqError(f"the depth curve solves maps from the Gram: method {got!r} is not one "
                         "of them", f"use --method {','.join(METHODS)} (any of them)")
    return names


@dataclass
class DepthPoint:
    """One stage of the source: its store model, stage name and module, width, the map's rank
    and in-sample R², the hybrid's score on the held-out images (percent), the controls' scores
    (``CONTROLS`` present) and whether the point beats them all and chance."""

    model: str
    stage: str
    module: str
    dim: int
    score: float
    rank: int
    r2: float | None
    controls: dict[str, float] = field(default_factory=dict)
    beats: bool = False
    pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the per-image predictions left out)."""
        return {k: v for k, v in vars(self).items() if k != "pred"}


@dataclass
class DepthCurve:
    """C_B(M_i · pool(F_A,i(x))) against depth i: ``points`` shallow to deep, A's own features
    last. ``metric``: ``top1`` (labels) or ``agreement`` (with B's own prediction); ``chance``:
    the best constant guess on the scored images."""

    source: str
    target: str
    method: str
    metric: str
    points: list[DepthPoint]
    target_own: float  # B alone: top-1, or 100 (agreement with itself)
    source_own: float | None  # A alone: top-1 (None when scored by agreement)
    images: int  # training images of the maps
    scored: int  # images scored
    chance: float = float("nan")
    scored_on: str = "held-out"  # the images scored: "held-out" (fit's split) or "test" (a store)

    @property
    def first_beating(self) -> DepthPoint | None:
        """The shallowest stage from which every deeper point beats its controls and chance."""
        out = None
        for p in reversed(self.points):
            if not p.beats:
                break
            out = p
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        first = self.first_beating
        return {**{k: getattr(self, k) for k in ("source", "target", "method", "metric",
                                                 "target_own", "source_own", "images",
                                                 "scored", "scored_on", "chance")},
                "first_beating": None if first is None else first.stage,
                "points": [p.to_dict() for p in self.points]}


@dataclass
class LayerAnalysis:
    """What :func:`layer_analysis` found: every similarity measure over ``models`` (every stage
    of the networks, shallow to deep per network; ``similarity``) and one depth curve per ordered
    pair of networks and method."""

    networks: list[str]
    models: list[str]
    stages: dict[str, dict[str, Any]]  # model -> {network, stage, module, dim}
    n: int
    similarity: SimilarityTable
    curves: list[DepthCurve]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def cka(self) -> np.ndarray:
        """Linear CKA [k, k] over ``models`` (NaN where a block has no variance)."""
        return self.similarity.cka

    @property
    def cka_debiased(self) -> np.ndarray | None:
        """Debiased CKA (unbiased HSIC; None below 4 images)."""
        return self.similarity.cka_debiased

    def models_of(self, network: str) -> list[str]:
        """``network``'s stage models in ``models``, shallow to deep (its features last)."""
        return [m for m in self.models if self.stages[m]["network"] == network]

    def block(self, a: str, b: str, measure: str = "cka") -> np.ndarray | None:
        """The ``measure`` block (a ``SimilarityTable`` matrix: cka, cka_debiased, cca_mean,
        svcca, r2 — row stage → column stage —, procrustes, mutual_knn) of network ``a``'s
        stages (rows) against ``b``'s (columns); None for a measure not computed."""
        mat = getattr(self.similarity, measure)
        if mat is None:
            return None
        ia, ib = ([self.models.index(m) for m in self.models_of(n)] for n in (a, b))
        return mat[np.ix_(ia, ib)]

    def curve(self, source: str, target: str, method: str | None = None) -> DepthCurve:
        """The depth curve source → target (by ``method``; default: the first)."""
        for c in self.curves:
            if (c.source, c.target) == (source, target) and method in (None, c.method):
                return c
        raise AffeqError(f"no depth curve {source} -> {target}"
                         + (f" by {method}" if method else ""),
                         f"the analysis holds {', '.join(self.networks)} by "
                         f"{', '.join(dict.fromkeys(c.method for c in self.curves))}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN → None)."""
        sim = self.similarity.to_dict()
        return {"networks": self.networks, "models": self.models, "stages": self.stages,
                "n": self.n, "source": self.source,
                **{k: sim[k] for k in self.similarity.measures()},
                "meanings": sim["meanings"], "curves": [c.to_dict() for c in self.curves]}


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


def _networks(store: StoreLike, a: str, b: str | None
              ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each network's models shallow to deep, and each network's random-weight control's models
    (``NAME~random`` with as many stages, when the store holds it)."""
    specs = {m: store.spec(m) for m in store.models}
    a, b = _canonical(a, store.models), None if b is None else _canonical(b, store.models)
    nets = [a] if b is None or b == a else [a, b]
    by_net: dict[str, list[str]] = {}
    for net in nets:
        got = network_models(store.models, specs, net)
        if net not in store.models or len(got) < 2:
            have = sorted({stage_of(s) or m for m, s in specs.items()})
            raise AffeqError(f"the store has no stages of {net!r}" if net in store.models else
                             f"network {net!r} is not in the store (it has {', '.join(have)})",
                             "extract with stages: affeq-rt extract --stages --models A,B")
        by_net[net] = got
    randoms = {}
    for net, got in by_net.items():
        rnd = control_name(net, "random")
        same = network_models(store.models, specs, rnd) if rnd in store.models else []
        if len(same) == len(got):
            randoms[net] = same
    return by_net, randoms


def _score(x: np.ndarray, head: Head, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Predictions and the percentage of rows whose prediction is ``labels``."""
    r = evaluate_heads(np.ascontiguousarray(x, np.float32), head.weight[None].astype(np.float32),
                       head.bias[None].astype(np.float32), labels.astype(np.int64), device="cpu")
    return np.asarray(r.pred)[0], 100.0 * float(np.asarray(r.top1)[0]) / max(len(x), 1)


def _held_out(test: StoreLike | None, models: Sequence[str], slices: Mapping[str, slice],
              red: Mapping[str, Any], labels: np.ndarray | None
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The scored rows per model (a test store's models it lacks left out) and their labels:
    the test store's, or the held-out rows'."""
    if test is not None:
        lab = test.labels
        return ({m: np.asarray(test.features(m), np.float32) for m in models
                 if m in test.models},
                None if lab is None or bool((np.asarray(lab) < 0).all()) else
                np.asarray(lab, np.int64))
    kept = red["heldout"].rows()
    if kept is None:
        raise AffeqError("no held-out images to score the depth curve on",
                         "pass --holdout > 0 or --test STORE")
    x, idx = kept
    return {m: x[:, slices[m]] for m in models}, None if labels is None else labels[idx]


def _depth_pass(st: Any, models: list[str], shuffled: list[tuple[str, str]], options: FitOptions,
                with_heldout: bool, progress: Progress | None
                ) -> tuple[StoreSource, dict[str, slice], Any, dict]:
    """The one Gram pass over every stage of ``models``: the rows, their slices, their labels
    (None if unlabelled) and the reducers (Gram with row norms; the ``shuffled`` pairs' permuted
    cross blocks over the training rows; held-out rows if asked)."""
    rows = StoreSource(st, models)
    slices = model_slices(models, rows.dims())
    labels = source_labels(rows)
    mask = holdout_mask(rows.n, options.holdout, options.seed, source_groups(rows))
    red: dict[str, Any] = {"gram": GramReducer(slices, mask, options.device, row_norms=True),
                           "shuffled": PermutedCross(slices, 1, mask=mask, pairs=shuffled)}
    if with_heldout:
        red["heldout"] = HeldOutRows(mask, int(mask.sum()))
    run_pass(rows, red, executor=options.executor, progress=progress, task="stages")
    return rows, slices, labels, red


@dataclass
class _Fit:
    """What every curve reads: the Grams, slices, scored rows, truth and heads."""

    train: Any
    hold: Any
    shuffled: Any  # the training Gram with permuted cross blocks (method.null._Permuted)
    slices: dict[str, slice]
    xs: dict[str, np.ndarray]
    labels: np.ndarray | None
    heads: dict[str, Head]
    eig: dict[str, solvers.SourceEig] = field(default_factory=dict)

    def source_eig(self, m: str) -> solvers.SourceEig:
        """Each source block's eigendecomposition, once for every method and control."""
        if m not in self.eig:
            self.eig[m] = solvers.source_eig(self.train, self.slices[m])
        return self.eig[m]


def _point_controls(f: _Fit, m: str, rnd: str | None, dst: str, method: GramMethod,
                    truth: np.ndarray) -> dict[str, float]:
    """The controls' scores for the point of model ``m`` (``rnd``: the random-weight network's
    model at the same depth, or None)."""
    out: dict[str, float] = {}
    if m != dst:  # the shuffled map: OLS on mismatched pairs (as method.controls fits it)
        w, b, _ = solvers.ols(f.shuffled, f.slices[m], f.slices[dst], eig=f.source_eig(m))
        amap = AffineMap(m, dst, w.astype(np.float32), b.astype(np.float32), "ols", {})
        out["shuffled"] = _score(f.xs[m], fold_head(amap, f.heads[dst]), truth)[1]
    if rnd is not None and rnd in f.xs:
        w, b, _ = method.pair(f.train, f.slices[rnd], f.slices[dst], f.hold, f.source_eig(rnd))
        amap = AffineMap(rnd, dst, w.astype(np.float32), b.astype(np.float32), method.name, {})
        out["random"] = _score(f.xs[rnd], fold_head(amap, f.heads[dst]), truth)[1]
    return out


def _beats(score: float, controls: Mapping[str, float], chance: float, n: int) -> bool:
    """Clears every control and chance (``controls.clears``: the hybrid table's rule)."""
    return all(bool(clears(np.float64(score), np.float64(c), n))
               for c in (*controls.values(), chance))


def _curve(st: Any, models: Sequence[str], dst: str, method: GramMethod, f: _Fit,
           random_models: Sequence[str] | None, scored_on: str) -> DepthCurve:
    """The depth curve of the source network whose ``models`` are given (its stages shallow to
    deep, then itself: ``stages.network_models``) → ``dst`` by ``method``: one map per model
    solved from the training Gram, scored through ``dst``'s head on the scored rows, with its
    controls."""
    src = models[-1]
    xs, lab, heads = f.xs, f.labels, f.heads
    own_pred, _ = _score(xs[dst], heads[dst], np.full(len(xs[dst]), -1))
    target_own = _score(xs[dst], heads[dst], lab)[1] if lab is not None else 100.0
    source_own = _score(xs[src], heads[src], lab)[1] if lab is not None else None
    truth = lab if lab is not None else own_pred
    n = len(truth)
    chance = best_guess(truth)
    points = []
    for i, m in enumerate(models):
        dim = f.slices[m].stop - f.slices[m].start
        w, bias, stats = method.pair(f.train, f.slices[m], f.slices[dst], f.hold,
                                     f.source_eig(m))
        amap = AffineMap(m, dst, w.astype(np.float32), bias.astype(np.float32), method.name,
                         stats)  # stored as fit stores a map: float32
        pred, score = _score(xs[m], fold_head(amap, heads[dst]), truth)
        ctrl = _point_controls(f, m, random_models[i] if random_models else None, dst, method,
                               truth)
        info = _stage_info(m, st.spec(m), dim)
        points.append(DepthPoint(m, info["stage"], info["module"], dim, score,
                                 int(stats.get("rank", dim)), stats.get("r2_train"), ctrl,
                                 _beats(score, ctrl, chance, n), pred))
    return DepthCurve(src, dst, method.name, "top1" if lab is not None else "agreement", points,
                      target_own, source_own, int(f.train.n), len(xs[dst]), chance, scored_on)


def _check(o: FitOptions, methods: Sequence[str], test: Any) -> list[GramMethod]:
    """The methods as objects, refused in one line before any work where they cannot run."""
    holdout_mask(0, o.holdout)  # AffeqError for a bad fraction
    out = [REGISTRY[m].from_options(o) for m in methods]
    for m in out:
        m.check_holdout(o.holdout > 0)  # fit's own refusal (ridge's λ, low-rank's rank)
    if test is None and o.holdout <= 0:
        raise AffeqError("no held-out images to score the depth curve on",
                         "pass --holdout > 0 or --test STORE")
    return out


def layer_analysis(store: StoreLike | str | os.PathLike, a: str, b: str | None = None, *,
                   test: StoreLike | str | os.PathLike | None = None,
                   method: str | Sequence[str] = "ols", options: FitOptions | None = None,
                   progress: Progress | None = None) -> LayerAnalysis:
    """Every similarity measure of every pair of stages of networks ``a`` and ``b`` (``b`` None
    or ``a``: within one) and the depth curves a→b and b→a by each of ``method`` (one Gram
    method or several, comma-separated or a list), with their controls, from one pass over
    ``store`` (a stage store or its folder).

    The held-out split is ``fit``'s (``options``: ``holdout``, ``seed``, whole groups; also its
    ``device``, ``executor`` and low-rank's ``rank``), so each curve's last point is the
    ordinary hybrid's figure for the same maps. ``test``: a stage store of other images to score
    on (then every point is scored on all of its rows)."""
    o = options or FitOptions()
    strategies = _check(o, parse_methods(method), test)
    st = open_store(store)
    tst = open_store(test) if test is not None else None
    by_net, randoms = _networks(st, a, b)
    nets, models = list(by_net), [m for ms in by_net.values() for m in ms]
    if tst is not None:
        missing = [m for m in models if m not in tst.models]
        if missing:
            raise AffeqError(f"the test store lacks {', '.join(missing[:3])}",
                             "extract the test images with the same --models and --stages")
    directions = [(s, d) for s in nets for d in nets if s != d or len(nets) == 1]
    shuffled = [(m, d) for s, d in directions for m in by_net[s]]
    every = models + [m for net in nets for m in randoms.get(net, [])]
    rows, slices, labels, red = _depth_pass(st, every, shuffled, o, tst is None, progress)
    g: GramReducer = red["gram"]
    both = g.train + g.holdout if int(g.holdout.n) else g.train
    real = {m: slices[m] for m in models}
    full = knn_rows(rows, {})  # the mutual k-NN subsample's joint rows (method.knn)
    knn = None if full is None else np.concatenate([full[:, slices[m]] for m in models], 1)
    sim = similarity_from_moments(both, real, g.norms.subset(models), knn=knn,
                                  source=rows.describe())
    xs, lab = _held_out(tst, every, slices, red, labels)
    f = _Fit(g.train, g.holdout if int(g.holdout.n) > 0 else None,
             _Permuted(g.train, red["shuffled"], 0), {m: slices[m] for m in every}, xs, lab,
             {n: st.head(n) for n in nets})
    on = "held-out" if tst is None else "test"
    curves = [_curve(st, by_net[s], d, strat, f, randoms.get(s), on) for strat in strategies
              for s, d in directions]
    dims = rows.dims()
    return LayerAnalysis(nets, models, {m: _stage_info(m, st.spec(m), dims[m]) for m in models},
                         int(both.n), sim, curves, rows.describe())

