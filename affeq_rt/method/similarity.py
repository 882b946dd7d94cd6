"""Representational similarity of every pair of networks, exact, from the joint Gram state.

The joint accumulator that ``fit`` builds (``core.GramAccumulator`` over Z = [F_1 … F_k 1]) holds
every network's centred scatter S_aa and every cross block S_ab over ALL the images, so the classic
similarity measures follow exactly, with no n×n kernel and no minibatch estimate:

- linear CKA (Kornblith et al. 2019): ‖S_ab‖_F² / (‖S_aa‖_F ‖S_bb‖_F);
- debiased linear CKA (the unbiased HSIC of Song et al. 2012, as Kornblith's and Nguyen et al.'s
  code uses it): needs, besides the Gram, Σ_i ‖x̃_i‖²‖ỹ_i‖² over centred rows (a fourth moment).
  :class:`RowNorms` accumulates it in the same pass (k×k and k×D float64 sums, cheap);
- CCA: all canonical correlations, the singular values of S_aa^{-1/2} S_ab S_bb^{-1/2} (eigen
  cut-off as ``solvers.source_eig``), their mean, and the SVCCA mean (each side first cut to the
  principal directions holding 99 % of its variance, Raghu et al. 2017);
- R² of the OLS map a→b over the same rows, tr(S_ba S_aa⁺ S_ab) / tr(S_bb), both directions;
- the orthogonal Procrustes distance of centred, Frobenius-normalised features (Ding et al. 2021):
  d² = 2 − 2‖S_ab‖_* / sqrt(tr S_aa tr S_bb) ∈ [0, 2] (nuclear norm; dimensions may differ);
- beside these global measures one local one, which needs rows: mutual k-NN agreement on a fixed
  subsample (``method.knn``: 2,000 images, k = 10; Huh et al. 2024).

Everything is float64. With fewer images than dimensions (n − 1 < rank_a + rank_b) at least
rank_a + rank_b − (n − 1) canonical correlations are 1 whatever the networks: ``ranks`` and
``warnings`` say so. :func:`similarity` makes its own pass over a store or arrays;
:func:`similarity_from_moments` reads any Gram state (e.g. a fit's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from affeq_rt.core.gram import GramAccumulator
from affeq_rt.engine import Executor, run_pass
from affeq_rt.errors import AffeqError
from affeq_rt.io.fsio import read_json
from affeq_rt.method.knn import ROWS, K, knn_rows, mutual_knn_table
from affeq_rt.method.null import null_stats
from affeq_rt.method.reducers import GramReducer, PermutedCross, RowNorms
from affeq_rt.method.results import EvalTable
from affeq_rt.method.rows import RowSource, model_slices, row_source
from affeq_rt.method.solvers import Moments, SourceEig, source_eig
from affeq_rt.progress import Progress

#: The N×N measures, in display order, with a one-line meaning each.
MEASURES: dict[str, str] = {
    "cka": "linear CKA (1 = same up to rotation and scale)",
    "cka_debiased": "debiased linear CKA (unbiased HSIC; may be < 0)",
    "cca_mean": "mean of all canonical correlations",
    "svcca": "SVCCA: mean canonical correlation after a 99 %-variance PCA of each side",
    "r2": "R² of the OLS map row→column over the same images (in-sample)",
    "procrustes": "orthogonal Procrustes distance d² of normalised features (0 = same)",
    "mutual_knn": f"mutual {K}-NN agreement on a {ROWS}-image subsample (local; 1 = same "
                  "neighbours)",
}
SVCCA_VARIANCE = 0.99


@dataclass
class SimilarityTable:
    """Every pairwise measure over ``n`` images; matrices are [N, N] float64, rows and columns in
    ``models`` order (``r2[a, b]``: the map a→b; the others are symmetric). ``cca[a->b]`` lists
    the canonical correlations, largest first; ``ranks`` the rank of each S_aa kept by the cut-off.
    ``cka_debiased`` is None when the row statistics were not accumulated."""

    models: list[str]
    n: int
    cka: np.ndarray
    cca_mean: np.ndarray
    svcca: np.ndarray
    r2: np.ndarray
    procrustes: np.ndarray
    cka_debiased: np.ndarray | None = None
    mutual_knn: np.ndarray | None = None
    cca: dict[str, list[float]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    # permutation null (method.null): {"permutations": K, "measures": {measure: {"mean", "sd",
    # "calibrated", "p": [N, N]}}}; empty when not asked
    null: dict[str, Any] = field(default_factory=dict)

    def measures(self) -> dict[str, np.ndarray]:
        """The N×N matrices present, in :data:`MEASURES` order."""
        return {k: getattr(self, k) for k in MEASURES if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN → None)."""
        def mat(a: np.ndarray) -> list[list[float | None]]:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        return {"models": list(self.models), "n": self.n, "dims": dict(self.dims),
                "ranks": dict(self.ranks), "warnings": list(self.warnings),
                "source": dict(self.source), "meanings": dict(MEASURES),
                **{k: mat(v) for k, v in self.measures().items()},
                "cca": {k: list(v) for k, v in self.cca.items()},
                "null": {"permutations": self.null.get("permutations", 0),
                         "measures": {m: {k: mat(v) for k, v in st.items()}
                                      for m, st in self.null.get("measures", {}).items()}}
                if self.null else {}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SimilarityTable:
        """Inverse of :meth:`to_dict`."""
        try:
            def arr(k: str) -> np.ndarray | None:
                v = d.get(k)
                return None if v is None else np.array(
                    [[np.nan if x is None else x for x in row] for row in v], np.float64)

            return cls(models=list(d["models"]), n=int(d["n"]), cka=arr("cka"),
                       cca_mean=arr("cca_mean"), svcca=arr("svcca"), r2=arr("r2"),
                       procrustes=arr("procrustes"), cka_debiased=arr("cka_debiased"),
                       mutual_knn=arr("mutual_knn"),
                       cca={k: list(v) for k, v in d.get("cca", {}).items()},
                       ranks=dict(d.get("ranks", {})), dims=dict(d.get("dims", {})),
                       warnings=list(d.get("warnings", [])), source=dict(d.get("source", {})),
                       null=_null_from(d.get("null") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise AffeqError(f"not a similarity table ({e})",
                             "pass the similarity.json written by affeq-rt similarity") from None


def _null_from(d: Mapping[str, Any]) -> dict[str, Any]:
    """The ``null`` entry of :meth:`SimilarityTable.to_dict`, back to arrays."""
    if not d:
        return {}
    return {"permutations": int(d["permutations"]),
            "measures": {m: {k: np.array([[np.nan if x is None else x for x in row] for row in v],
                                         np.float64) for k, v in st.items()}
                         for m, st in d["measures"].items()}}


def load_similarity(path: str | os.PathLike) -> SimilarityTable:
    """Read a ``similarity.json``."""
    return SimilarityTable.from_dict(read_json(path, "similarity table"))


def _whitener(eig: SourceEig, keep: np.ndarray | None = None) -> np.ndarray:
    """V Λ^{-1/2} over the kept eigen-directions (``keep`` narrows them further)."""
    k = eig.keep if keep is None else (eig.keep & keep)
    return eig.vecs[:, k] / np.sqrt(eig.lam[k])


def _top_variance(eig: SourceEig, fraction: float) -> np.ndarray:
    """Bool mask of the fewest leading eigen-directions holding ``fraction`` of the variance."""
    lam = np.where(eig.keep, eig.lam, 0.0)
    order = np.argsort(lam)[::-1]
    cum = np.cumsum(lam[order])
    total = cum[-1] if cum.size else 0.0
    count = int(np.searchsorted(cum, fraction * total * (1 - 1e-12)) + 1) if total > 0 else 0
    mask = np.zeros(lam.size, bool)
    mask[order[:count]] = True
    return mask


def _cca(eig_a: SourceEig, eig_b: SourceEig, s_ab: np.ndarray, keep_a: np.ndarray | None = None,
         keep_b: np.ndarray | None = None) -> np.ndarray:
    """Canonical correlations (descending), singular values of W_aᵀ S_ab W_b, clipped to [0, 1]."""
    wa, wb = _whitener(eig_a, keep_a), _whitener(eig_b, keep_b)
    if not wa.shape[1] or not wb.shape[1]:
        return np.zeros(0)
    return np.clip(np.linalg.svd(wa.T @ s_ab @ wb, compute_uv=False), 0.0, 1.0)


def similarity_from_moments(moments: Moments, slices: Mapping[str, slice],
                            norms: RowNorms | None = None, rcond: float | None = None,
                            source: Mapping[str, Any] | None = None,
                            knn: np.ndarray | None = None,
                            eig: Mapping[str, SourceEig] | None = None) -> SimilarityTable:
    """Every measure for every pair of the networks at ``slices`` of a joint Gram state
    (``n``, ``mean()``, ``scatter(rows, cols)``, as ``GramAccumulator``). ``norms`` (over the same
    rows) adds debiased CKA, ``knn`` (joint rows of a subsample, ``knn.knn_rows``) mutual k-NN;
    ``eig``: each network's ``source_eig`` of these moments, when already known.
    One eigendecomposition per network, one SVD per pair and measure."""
    names = list(slices)
    n = int(moments.n)
    if n < 2:
        raise AffeqError(f"similarity needs at least 2 images, got {n}", "use more images")
    k = len(names)
    eig = dict(eig) if eig is not None else {m: source_eig(moments, slices[m], rcond)
                                             for m in names}
    white = {m: _whitener(eig[m]) for m in names}
    top = {m: _top_variance(eig[m], SVCCA_VARIANCE) for m in names}
    tr = {m: float(np.trace(moments.scatter(slices[m], slices[m]))) for m in names}
    fro = {m: float(np.linalg.norm(moments.scatter(slices[m], slices[m]))) for m in names}
    cka, cca_mean, svcca, r2, proc = (np.full((k, k), np.nan) for _ in range(5))
    xty = np.zeros((k, k))
    cca: dict[str, list[float]] = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            s_ab = np.asarray(moments.scatter(slices[a], slices[b]), np.float64)
            xty[i, j] = float(np.sum(s_ab * s_ab))
            if tr[b] > 0 and eig[a].rank:  # R² a→b: tr(S_ba S_aa⁺ S_ab) / tr S_bb
                p = s_ab.T @ white[a]
                r2[i, j] = float(np.sum(p * p)) / tr[b]
            if j < i:
                continue
            den = fro[a] * fro[b]
            cka[i, j] = cka[j, i] = xty[i, j] / den if den > 0 else np.nan
            rho = _cca(eig[a], eig[b], s_ab)
            cca[f"{a}->{b}"] = [float(v) for v in rho]
            cca_mean[i, j] = cca_mean[j, i] = float(rho.mean()) if rho.size else np.nan
            rs = _cca(eig[a], eig[b], s_ab, top[a], top[b])
            svcca[i, j] = svcca[j, i] = float(rs.mean()) if rs.size else np.nan
            if tr[a] > 0 and tr[b] > 0:
                nuc = float(np.linalg.svd(s_ab, compute_uv=False).sum())
                proc[i, j] = proc[j, i] = max(0.0, 2.0 - 2.0 * nuc / math.sqrt(tr[a] * tr[b]))
    deb = None
    if norms is not None:
        deb = _debiased_cka(norms.centred_products(moments), xty, np.array([tr[m] for m in names]),
                            n)
    ranks = {m: eig[m].rank for m in names}
    return SimilarityTable(
        models=names, n=n, cka=cka, cca_mean=cca_mean, svcca=svcca, r2=r2, procrustes=proc,
        cka_debiased=deb, cca=cca, ranks=ranks,
        mutual_knn=None if knn is None else mutual_knn_table(knn, slices),
        dims={m: slices[m].stop - slices[m].start for m in names},
        warnings=_rank_warnings(ranks, n), source=dict(source or {}))


def _rank_warnings(ranks: Mapping[str, int], n: int) -> list[str]:
    """One line per pair whose ranks exceed what ``n`` images can tell apart: at least
    ``rank_a + rank_b − (n − 1)`` canonical correlations are then 1 whatever the networks."""
    names, out = list(ranks), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            trivial = ranks[a] + ranks[b] - (n - 1)
            if trivial > 0:
                out.append(f"{a}, {b}: {n} images for ranks {ranks[a]} + {ranks[b]}: at "
                           f"least {trivial} canonical correlations are 1 whatever the "
                           "networks (CCA and R² need more images than dimensions)")
    return out


def _debiased_cka(c4: np.ndarray, xty: np.ndarray, tr: np.ndarray, n: int) -> np.ndarray | None:
    """Debiased CKA from the unbiased HSIC of linear kernels (Song et al. 2012), in the feature
    form of Kornblith et al.: n(n−3)·HSIC_u(a,b) = ‖S_ab‖_F² − n/(n−2)·C[a,b] +
    tr S_aa tr S_bb / ((n−1)(n−2)). Needs n ≥ 4."""
    if n < 4:
        return None
    h = xty - n / (n - 2.0) * c4 + np.outer(tr, tr) / ((n - 1.0) * (n - 2.0))
    d = np.sqrt(np.clip(np.diag(h), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = h / np.outer(d, d)
    return np.where(np.outer(d, d) > 0, out, np.nan)


def accumulate_joint(rows: RowSource, device: str = "auto", progress: Progress | None = None,
                     executor: Executor | None = None, extra: Mapping[str, Any] | None = None
                     ) -> tuple[GramAccumulator, RowNorms]:
    """One pass over every row of ``rows``: the joint Gram and the row statistics (and the
    ``extra`` reducers in the same pass)."""
    g = GramReducer(model_slices(rows.names, rows.dims()), np.zeros(rows.n, bool), device,
                    row_norms=True)
    run_pass(rows, {"gram": g, **(extra or {})}, executor=executor, progress=progress,
             task="similarity")
    return g.train, g.norms


def similarity(source: Any, models: str | Sequence[str] | None = None, *,
               max_images: int | None = None, device: str = "auto",
               progress: Progress | None = None,
               executor: Executor | None = None, permutations: int = 0) -> SimilarityTable:
    """Every similarity measure between every pair of ``models`` over ALL rows of ``source``
    (a feature store or its folder, ``{model: [n, d]}`` arrays, or any RowSource): one pass, exact.
    ``permutations`` K > 0: the Gram measures' permutation null from the same pass
    (``method.null``: K within-chunk row permutations; calibrated scores and p-values).
    """
    rows = row_source(source, models, None, max_images)
    if len(rows.names) < 2:
        raise AffeqError("similarity needs at least two networks", "pass --models A,B[,…]")
    if rows.arrays() is None:
        raise AffeqError("similarity reads feature rows, not images",
                         "run affeq-rt extract first, then similarity --features STORE")
    if permutations < 0:
        raise AffeqError(f"--permutations must be ≥ 0, got {permutations}",
                         "pass e.g. --permutations 20, or 0 for none")
    sl = model_slices(rows.names, rows.dims())
    cross = {"null": PermutedCross(sl, permutations)} if permutations else {}
    acc, norms = accumulate_joint(rows, device, progress, executor, cross)
    eig = {m: source_eig(acc, s) for m, s in sl.items()}  # a permutation keeps each network's
    table = similarity_from_moments(acc, sl, norms, source=rows.describe(),
                                    knn=knn_rows(rows, {}), eig=eig)
    if cross:
        table.null = null_stats(acc, cross["null"], table.measures(),
                                lambda m: similarity_from_moments(m, sl, eig=eig).measures())
    return table


# ---------------------------------------------------------------------------------------------
# against the hybrids


def hybrid_losses(table: EvalTable) -> tuple[np.ndarray, str]:
    """Per ordered pair, the hybrid's loss aligned with ``table.top1`` and what it means: labelled,
    top1[B,B] − top1[A,B] (points B's classifier loses on A's mapped features); unlabelled,
    100 − agreement of the hybrid with the target's own prediction."""
    if table.labelled:
        return table.hybrid_loss_top1, "hybrid's top-1 loss in points"
    return 100.0 - table.agree, "hybrid's disagreement with the target in %"


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(v, kind="mergesort")
    r = np.empty(v.size)
    r[order] = np.arange(v.size, dtype=np.float64)
    for x in np.unique(v):
        t = v == x
        r[t] = r[t].mean()
    return r


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    x, y = x - x.mean(), y - y.mean()
    d = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / d if d > 0 else None


def loss_correlations(sim: SimilarityTable, table: EvalTable) -> dict[str, Any]:
    """Pearson and Spearman correlation, across the ordered pairs both tables hold, between the
    hybrids' loss (:func:`hybrid_losses`) and each similarity measure. A good predictor of the
    loss correlates negatively (more similar, less loss), Procrustes positively."""
    loss, what = hybrid_losses(table)
    common = [m for m in table.models if m in sim.models]
    pairs = [(a, b) for a in common for b in common if a != b]
    out: dict[str, Any] = {"loss": what, "pairs": len(pairs), "measures": {}}
    if len(pairs) < 3:
        return out
    y = np.array([loss[table.index(a), table.index(b)] for a, b in pairs])
    for k, mtx in sim.measures().items():
        x = np.array([mtx[sim.models.index(a), sim.models.index(b)] for a, b in pairs])
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3:
            out["measures"][k] = {"pearson": None, "spearman": None}
            continue
        out["measures"][k] = {"pearson": _pearson(x[ok], y[ok]),
                              "spearman": _pearson(_ranks(x[ok]), _ranks(y[ok]))}
    return out
