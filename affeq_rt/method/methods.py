"""Fit methods as registered strategies: each declares what it needs and solves every ordered pair.

A method is one class: ``name``, ``needs`` (``"gram"``: the Gram pass; ``"rows"``: every row in
memory; ``"arrays"``: addressable features; ``"heads"``: the classifier heads only;
``"nothing"``), ``check`` (refusals before any pass), ``reducers`` (the statistics of the pass it
needs, ``method.reducers``) and ``solve``. ``fit`` runs the pass and calls ``solve``; ``auto``
(:func:`choose`) picks a method by data size and says why. Register a new one with
:func:`register` (the way estimators are classes in scikit-learn and models registered in timm).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from affeq_rt.engine.reducer import Reducer
from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap
from affeq_rt.method import families, knn, quality, select, solvers
from affeq_rt.method.reducers import AllRows, GramReducer, HeldOutRows
from affeq_rt.method.rows import CHUNK

REGISTRY: dict[str, type[FitMethod]] = {}


def register(cls: type[FitMethod]) -> type[FitMethod]:
    """Class decorator: make ``cls`` a ``fit --method`` choice under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def holdout_mask(n: int, fraction: float, seed: int = 0, groups: np.ndarray | None = None
                 ) -> np.ndarray:
    """Deterministic held-out selection: bool [n], about ``fraction`` of the groups, whole.

    One uniform draw per group (ids 0…G−1, ``rows.group_ids``; None: each sample its own group, the
    draws then being exactly the per-sample draws of earlier versions) and a group is held out
    when its draw is below ``fraction``. When that leaves no group out but there are ≥ 2, the
    group with the smallest draw is held out, so a small fit still gets an honest figure.
    """
    if not 0.0 <= fraction < 1.0:
        raise AffeqError(f"--holdout must be in [0, 1), got {fraction}", "pass e.g. --holdout 0.1")
    if fraction == 0.0:
        return np.zeros(n, bool)
    g = np.arange(n) if groups is None else np.asarray(groups, np.int64)[:n]
    count = int(g.max()) + 1 if n else 0
    draws = np.random.default_rng(seed).random(count)
    out = draws < fraction
    if count >= 2 and not out.any():
        out[int(np.argmin(draws))] = True
    return out[g]


def pairs(names: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Every ordered pair A≠B, sources in order, targets in order (the one pair loop)."""
    for a in names:
        for t in names:
            if t != a:
                yield a, t


@dataclass
class FitContext:
    """What a method sees of the fit: the source, where each model sits, heads, the hold-out."""

    rows: Any  # method.rows.RowSource
    names: list[str]
    dims: dict[str, int]
    slices: dict[str, slice]
    heads: dict[str, Head] | None
    mask: np.ndarray  # held-out flag per sample [n]
    groups: np.ndarray | None
    labels: np.ndarray | None
    options: Any  # method.fit.FitOptions
    local: bool  # the pass runs in this process
    curve: Any = None  # method.curve.CurveRecorder: Gram snapshots scored on the way, or None
    found: Any = None  # method.dedup.Found: the near-duplicate groups detection found

    @property
    def streamed(self) -> bool:
        """Images: rows are counted as read, not addressable."""
        return self.rows.arrays() is None

    def need_heads(self, method: str, why: str) -> dict[str, Head]:
        """The heads, or the one-line refusal."""
        if self.heads is None:
            raise AffeqError(f"{method} {why}", "fit from a feature store or images, "
                             "not bare arrays" + (" (or use ridge)" if "prior" in method else ""))
        return self.heads

    @cached_property
    def head_pinvs(self) -> dict[str, tuple[np.ndarray, int]]:
        """Each network's head pseudo-inverse and rank (:func:`pinvs`), once per fit: the
        solve and its controls share them. Only after :meth:`need_heads`."""
        if self.heads is None:
            raise InternalError("head_pinvs before need_heads")
        return pinvs(self.names, self.heads)


def as_map(a: str, t: str, w: np.ndarray, b: np.ndarray, method: str,
           stats: dict[str, Any]) -> AffineMap:
    """A solved pair as stored: float32 weight and bias."""
    return AffineMap(a, t, w.astype(np.float32), b.astype(np.float32), method, stats)


def pinvs(names: Sequence[str], heads: Mapping[str, Head]) -> dict[str, tuple[np.ndarray, int]]:
    """Each target head's pseudo-inverse and rank (one SVD per network)."""
    return {t: solvers.head_pinv(heads[t].weight) for t in names}


class FitMethod:
    """A fit method (see the module docstring). Knobs go to ``__init__``; ``from_options`` builds
    one from ``FitOptions``."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "nothing"

    @classmethod
    def from_options(cls, options: Any) -> FitMethod:
        """The method with the knobs of ``options``."""
        return cls()

    def check(self, ctx: FitContext) -> None:
        """Refuse, with one line, what this method cannot do with ``ctx`` (before any pass)."""

    def reducers(self, ctx: FitContext) -> dict[str, Reducer]:
        """The statistics the pass must gather (none: no pass)."""
        return {}

    def solve(self, ctx: FitContext, red: Mapping[str, Any]) -> list[AffineMap]:
        """Every ordered pair's map from the gathered statistics."""
        raise NotImplementedError

    def images(self, ctx: FitContext, red: Mapping[str, Any]) -> int:
        """Images the maps were fitted from: rows given, or none for data-free methods."""
        return 0 if ctx.streamed else int(ctx.rows.n)


@register
class Naive(FitMethod):
    """Unmapped features, truncated or zero-padded (thesis §5.6): the chance baseline."""

    name = "naive"

    def solve(self, ctx: FitContext, red: Mapping[str, Any]) -> list[AffineMap]:
        """Identity-like maps."""
        out = []
        for a, t in pairs(ctx.names):
            w, b, st = solvers.naive(ctx.dims[a], ctx.dims[t])
            out.append(as_map(a, t, w, b, self.name, {"images": 0, **st}))
        return out


@register
class LogitPinv(FitMethod):
    """Through the logits (thesis §5.5): M = W_B⁺ W_A, no images needed."""

    name = "logit-pinv"
    needs = "heads"

    def check(self, ctx: FitContext) -> None:
        """Needs the heads."""
        ctx.need_heads(self.name, "needs the classifier heads")

    def solve(self, ctx: FitContext, red: Mapping[str, Any]) -> list[AffineMap]:
        """One SVD per target."""
        heads = ctx.need_heads(self.name, "needs the classifier heads")
        pv = ctx.head_pinvs
        out = []
        for a, t in pairs(ctx.names):
            w, b, st = solvers.logit_pinv(heads[a], heads[t], pinv_dst=pv[t])
            out.append(as_map(a, t, w, b, self.name, {"images": 0, **st}))
        return out


class GramMethod(FitMethod):
    """Closed-form least squares from the Gram pass (one eigendecomposition per source); a
    method of this kind is one :meth:`pair` (the map families too, ``method.families``)."""

    needs = "gram"

    def check(self, ctx: FitContext) -> None:
        """At least two training images, and held-out ones where the method chooses on them
        (:meth:`check_holdout`), known before the pass."""
        n_train = int((~ctx.mask).sum())
        if n_train < 2:
            raise AffeqError(f"a map needs at least 2 training images, got {n_train} of "
                             f"{ctx.rows.n} (holdout {ctx.options.holdout:g})",
                             "use more images (--max-images) or a smaller --holdout")
        self.check_holdout(bool(ctx.mask.any()))

    def check_holdout(self, held_out: bool) -> None:
        """Refuse, with one line, when the method chooses something on held-out images and
        ``held_out`` is False (none: nothing to refuse)."""

    def reducers(self, ctx: FitContext) -> dict[str, Reducer]:
        """The Gram, with the curve's snapshots and the similarity's row norms when asked."""
        rec = ctx.curve
        red: dict[str, Reducer] = {"gram": GramReducer(
            ctx.slices, ctx.mask, ctx.options.device, rec.sizes if rec is not None else (),
            rec.score if rec is not None else None, ctx.options.similarity)}
        if ctx.options.similarity and ctx.streamed:  # mutual k-NN's subsample (method.knn)
            red["knn"] = HeldOutRows(knn.sample_mask(int(ctx.rows.n)), knn.ROWS)
        return red

    def pair(self, train: Any, a: slice, t: slice, hold: Any, eig: solvers.SourceEig
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One pair's map (float64 W, b) and stats from the training Gram ``train`` (``hold``:
        the held-out Gram or None; ``eig``: the source block's ``solvers.source_eig``)."""
        raise NotImplementedError

    def solve(self, ctx: FitContext, red: Mapping[str, Any]) -> list[AffineMap]:
        """Every pair from the training Gram, scored on the held-out Gram."""
        g: GramReducer = red["gram"]
        hold = g.holdout if int(g.holdout.n) > 0 else None
        skipped = int(g.train.skipped) + int(g.holdout.skipped)
        out, eig = [], {}
        for a, t in pairs(ctx.names):
            if a not in eig:
                eig = {a: solvers.source_eig(g.train, ctx.slices[a])}
            w, b, st = self.pair(g.train, ctx.slices[a], ctx.slices[t], hold, eig[a])
            st["nonfinite_rows_skipped"] = skipped
            out.append(as_map(a, t, w, b, self.name, st))
        return out

    def images(self, ctx: FitContext, red: Mapping[str, Any]) -> int:
        """Rows read (images), or rows given."""
        g: GramReducer = red["gram"]
        return int(g.train.n) + int(g.holdout.n) if ctx.streamed else int(ctx.rows.n)


@register
class OLS(GramMethod):
    """Ordinary least squares (thesis eq. 5.1)."""

    name = "ols"

    def pair(self, train: Any, a: slice, t: slice, hold: Any, eig: solvers.SourceEig
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``solvers.ols``."""
        return solvers.ols(train, a, t, hold, eig=eig)


@register
class Ridge(GramMethod):
    """Ridge toward zero, λ on the held-out part."""

    name = "ridge"

    def check_holdout(self, held_out: bool) -> None:
        """λ is chosen on held-out images."""
        if not held_out:
            raise AffeqError("ridge needs held-out images to choose λ",
                             "pass --holdout 0.1 (or more)")

    def pair(self, train: Any, a: slice, t: slice, hold: Any, eig: solvers.SourceEig
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``solvers.ridge``."""
        return solvers.ridge(train, a, t, hold, eig=eig)


@register
class Orthogonal(GramMethod):
    """Orthogonal Procrustes with scale and offset: y ≈ s·Q x + b, Q = U Vᵀ of S_BA."""

    name = "orthogonal"

    def pair(self, train: Any, a: slice, t: slice, hold: Any, eig: solvers.SourceEig
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``families.procrustes``."""
        return families.procrustes(train, a, t, hold, eig)


@register
class LowRank(GramMethod):
    """Reduced-rank affine map: rank ``rank``, or chosen on the held-out Gram."""

    name = "low-rank"

    def __init__(self, rank: int | None = None) -> None:
        self.rank = rank

    @classmethod
    def from_options(cls, options: Any) -> FitMethod:
        """The rank from the options (None: chosen on the held-out images)."""
        return cls(options.rank)

    def check_holdout(self, held_out: bool) -> None:
        """The rank is chosen on held-out images, unless given."""
        if self.rank is None and not held_out:
            raise AffeqError("low-rank chooses its rank on held-out images, and none are held out",
                             "pass --holdout > 0, or --rank R")

    def pair(self, train: Any, a: slice, t: slice, hold: Any, eig: solvers.SourceEig
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``families.reduced_rank``."""
        return families.reduced_rank(train, a, t, hold, self.rank, eig)


class PriorMethod(FitMethod):
    """Few data: shrunk toward the logit-pinv map, strength by grouped CV (``method.select``)."""

    needs = "rows"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @classmethod
    def from_options(cls, options: Any) -> FitMethod:
        """The CV folds' seed."""
        return cls(options.seed)

    def check(self, ctx: FitContext) -> None:
        """Heads for the prior, rows that fit in memory."""
        ctx.need_heads(self.name, "shrinks toward the logit-pinv map, which needs the "
                       "classifier heads")
        select.rows_fit_in_memory(ctx.rows.n, list(ctx.dims.values()))

    def reducers(self, ctx: FitContext) -> dict[str, Reducer]:
        """Every row."""
        return {"rows": AllRows(sum(ctx.dims.values()))}

    def solve(self, ctx: FitContext, red: Mapping[str, Any]) -> list[AffineMap]:
        """CV on the training groups, refit, grouped held-out figures (``quality.rows_quality``)."""
        x, idx = red["rows"].all()
        if x.shape[0] == 0 and ctx.streamed:
            raise AffeqError(f"none of the {ctx.rows.n} images could be read",
                             "check --data (see the skipped files)")
        heads = ctx.need_heads(self.name, "needs the classifier heads")
        hold = ctx.mask[idx]
        g = None if ctx.groups is None else ctx.groups[idx]
        lab = None if ctx.labels is None else ctx.labels[idx]
        cv_lab = select.cv_labels(None if lab is None else lab[~hold])
        pv = ctx.head_pinvs
        out = []
        for a, t in pairs(ctx.names):
            prior = select.Prior.of(heads[a], heads[t], pv[t])
            xa, xb = x[:, ctx.slices[a]], x[:, ctx.slices[t]]
            fitted = select.prior_fit(xa[~hold], xb[~hold], None if g is None else g[~hold],
                                      prior, self.name, cv_lab, self.seed)
            fitted.stats.update(quality.rows_quality(fitted, xa, xb, hold, g, prior, lab))
            out.append(as_map(a, t, fitted.w, fitted.b, self.name, fitted.stats))
        return out

    def images(self, ctx: FitContext, red: Mapping[str, Any]) -> int:
        """Rows read (images), or rows given."""
        return int(red["rows"].all()[0].shape[0]) if ctx.streamed else int(ctx.rows.n)


@register
class PriorRidge(PriorMethod):
    """‖F_A M − F_B‖² + λ‖M − M₀‖², M₀ the logit-pinv map."""

    name = "prior-ridge"


@register
class PriorPCA(PriorMethod):
    """A correction to M₀ on the k strongest principal directions of A's features."""

    name = "prior-pca"


@register
class Adam(FitMethod):
    """The paper's §4.2 unit-normalised loss, streamed from addressable features."""

    name = "adam"
    needs = "arrays"

    def __init__(self, iterations: int = 200, lr: float = 0.1, seed: int = 0,
                 batch_size: int = 2048) -> None:
        self.iterations, self.lr, self.seed, self.batch_size = iterations, lr, seed, batch_size

    @classmethod
    def from_options(cls, options: Any) -> FitMethod:
        """Steps, learning rate and seed from the options."""
        return cls(options.adam_iterations, options.adam_lr, options.seed)

    def check(self, ctx: FitContext) -> None:
        """Addressable rows, in this process."""
        if ctx.streamed:
            raise AffeqError("adam streams features from a feature store",
                             "run affeq-rt extract first, then fit --features STORE")
        if not ctx.local:
            raise AffeqError("adam draws random batches from the features in this process; "
                             "it does not run on an executor",
                             "drop --executor for adam, or fit --method ols|ridge|prior-* there")

    def solve(self, ctx: FitContext, red: Mapping[str, Any]) -> list[AffineMap]:
        """Adam per pair on the training rows; R² and the unit loss on the held-out rows."""
        arrays = ctx.rows.arrays()
        train, hold = np.flatnonzero(~ctx.mask), np.flatnonzero(ctx.mask)
        out = []
        for a, t in pairs(ctx.names):
            sched = solvers.AdamSchedule(self.iterations, self.lr, batch_size=self.batch_size,
                                         seed=self.seed)
            w, b, st = solvers.adam(arrays[a], arrays[t], sched, rows=train)
            st.update(holdout_images=int(hold.size),
                      r2_holdout=_array_r2(w, b, arrays[a], arrays[t], hold),
                      unit_loss_holdout=(solvers.unit_loss(w, b, np.asarray(arrays[a][hold]),
                                                           np.asarray(arrays[t][hold]))
                                         if hold.size else None))
            out.append(as_map(a, t, w, b, self.name, st))
        return out


def _array_r2(w: np.ndarray, b: np.ndarray, xa: Any, xb: Any, rows: np.ndarray) -> float | None:
    """R² of a map on the given rows of two (memory-mapped) arrays, chunked, float64."""
    if rows.size == 0:
        return None
    ss, s1, s2 = 0.0, np.zeros(xb.shape[1]), 0.0
    for i in range(0, rows.size, CHUNK):
        r = rows[i:i + CHUNK]
        a = np.asarray(xa[r], np.float64)
        y = np.asarray(xb[r], np.float64)
        ss += float(((y - a @ w.T - b) ** 2).sum())
        s1 += y.sum(0)
        s2 += float((y * y).sum())
    tot = s2 - float(s1 @ s1) / rows.size
    return 1.0 - ss / tot if tot > 0 else None


def method_names() -> list[str]:
    """``auto`` and every registered method, for help and errors."""
    return ["auto", *REGISTRY]


def normalise_method(method: str) -> str:
    """Accept ``logit_pinv``/``logit-pinv`` etc.; AffeqError for unknown methods."""
    m = method.strip().lower().replace("_", "-")
    if m != "auto" and m not in REGISTRY:
        raise AffeqError(f"unknown fit method {method!r}",
                         f"use one of {', '.join(method_names())}")
    return m


def choose(ctx: FitContext) -> tuple[str, str]:
    """``--method auto``: (method, why), by data size (``select.choose_method``)."""
    same = ctx.heads is not None and len({h.num_classes for h in ctx.heads.values()}) == 1
    method, why = select.choose_method(int((~ctx.mask).sum()), ctx.dims, same)
    return method, why
