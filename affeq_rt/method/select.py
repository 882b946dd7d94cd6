"""Few-data estimators: which method ``auto`` picks, and the prior methods' grouped CV (issue 11).

* :func:`choose_method`: what ``--method auto`` fits, by data size (few rows per source dimension
  → a correction to the logit-pinv map; plenty → OLS), with the reason in words.
* :func:`prior_fit`: prior-ridge / prior-pca (``solvers``' spectral estimators around M₀), the
  strength (λ or rank) chosen by grouped K-fold cross-validation on the hybrid's agreement with
  the target network (top-1 against the labels where every row has one): views of one photo never
  straddle folds. The rows are in memory: this is the few-data case. It also returns each
  training row's class under the chosen candidate's fold map, which the quality gate pools
  (``quality.rows_quality``).
* :func:`grouped_folds`: the folds, whole groups each. The quality gate that scores every fit on
  held-out rows is ``method.quality``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from affeq_rt.errors import AffeqError, InternalError
from affeq_rt.io.heads import Head
from affeq_rt.method import solvers

# Few data: fewer training rows than FEW_DATA_FACTOR × the widest source dimension. Below n = d
# least squares is underdetermined (any map fits the training rows); up to ~2d its held-out error
# is still dominated by the d parameters per output (excess risk ∝ d/(n − d − 1) ≥ 1 × the noise).
FEW_DATA_FACTOR = 2
CV_FOLDS = 5
# prior-ridge: λ = α · tr(S_AA)/d (the mean eigenvalue); prior-pca: the number of directions kept.
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(4, -3, 15))  # most shrunk first
PCA_RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
ROWS_MEMORY_LIMIT = 4 << 30  # bytes of float32 rows the in-memory estimators may hold


@dataclass(frozen=True)
class Candidate:
    """One point of an estimator's path: the prior itself, a ridge α, or a PCA rank."""

    kind: str  # "prior" | "ridge" | "pca"
    value: float = 0.0

    @property
    def label(self) -> str:
        """``prior``, ``alpha=…`` or ``rank=…``."""
        if self.kind == "prior":
            return "prior"
        return f"alpha={self.value:.3g}" if self.kind == "ridge" else f"rank={int(self.value)}"

    def lam(self, spec: solvers.RowSpectrum) -> float:
        """λ of a ridge candidate: α × the mean eigenvalue tr(S_AA)/d."""
        return self.value * spec.total / max(spec.dim, 1)

    def filter(self, spec: solvers.RowSpectrum) -> np.ndarray:
        """The spectral filter of this candidate on ``spec``'s eigenvalues."""
        if self.kind == "ridge":
            return solvers.ridge_filter(spec.lam, self.lam(spec))
        if self.kind == "pca":
            return solvers.pca_filter(spec.lam, int(self.value))
        raise InternalError(f"no filter for a {self.kind} candidate")

    def shrink(self, spec: solvers.RowSpectrum, n: int) -> float:
        """s, the share of the residual mean the intercept takes: n/(n + λ) for ridge (the
        intercept penalised like a constant feature), 1 for PCA."""
        return n / (n + self.lam(spec)) if self.kind == "ridge" else 1.0


def candidates(method: str) -> list[Candidate]:
    """The path of ``method``, most shrunk first (ties in the score go to the earlier one)."""
    if method == "prior-ridge":
        return [Candidate("prior")] + [Candidate("ridge", a) for a in RIDGE_ALPHAS]
    if method == "prior-pca":
        return [Candidate("prior")] + [Candidate("pca", k) for k in PCA_RANKS]
    raise InternalError(f"no candidate path for {method}")


def choose_method(n_train: int, dims: dict[str, int], heads: bool) -> tuple[str, str]:
    """``--method auto``: (method, why). Few data (rows < FEW_DATA_FACTOR × widest dim) with
    classifier heads → prior-ridge; few data without heads → ridge; otherwise OLS."""
    d = max(dims.values())
    few = n_train < FEW_DATA_FACTOR * d
    if not few:
        return "ols", (f"{n_train} training images ≥ {FEW_DATA_FACTOR}× the {d} feature "
                       "dimensions: ordinary least squares")
    if heads:
        return "prior-ridge", (f"{n_train} training images < {FEW_DATA_FACTOR}× the {d} feature "
                               "dimensions: few data, so the map is shrunk toward the logit-pinv "
                               "map (prior-ridge, λ by grouped cross-validation on agreement)")
    return "ridge", (f"{n_train} training images < {FEW_DATA_FACTOR}× the {d} feature dimensions "
                     "and no classifier heads for a prior: ridge (λ on the held-out images)")


def grouped_folds(groups: np.ndarray | None, n: int, k: int = CV_FOLDS, seed: int = 0
                  ) -> np.ndarray:
    """Fold index [n] per row: whole groups go to one fold (round-robin over a seeded
    permutation of the groups); ``min(k, groups)`` folds. ``groups`` None: each row a group."""
    g = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    count = int(g.max()) + 1 if n else 0
    if count < 2:
        raise AffeqError(f"cross-validation needs at least 2 source images, got {count}",
                         "fit on more images")
    perm = np.random.default_rng(seed).permutation(count)
    fold_of_group = np.empty(count, np.int64)
    fold_of_group[perm] = np.arange(count) % min(k, count)
    return fold_of_group[g]


def _truth(xb: np.ndarray, head_b: Head, labels: np.ndarray | None) -> np.ndarray:
    """What a hybrid is scored against: the labels, else B's own top-1 on its own features."""
    if labels is not None:
        return labels
    return np.argmax(np.asarray(xb, np.float64) @ head_b.weight.T.astype(np.float64)
                     + head_b.bias, axis=1)


@dataclass
class Prior:
    """The logit-pinv map of one pair and what scoring needs of B's head."""

    w: np.ndarray  # M₀ [d_B, d_A]
    b: np.ndarray  # b₀ [d_B]
    head_b: Head

    @classmethod
    def of(cls, head_a: Head, head_b: Head,
           pinv_dst: tuple[np.ndarray, int] | None = None) -> Prior:
        """M₀ = W_B⁺ W_A, b₀ = W_B⁺ (b_A − b_B) (``solvers.logit_pinv``; ``pinv_dst`` reuses B's
        pseudo-inverse)."""
        w, b, _ = solvers.logit_pinv(head_a, head_b, pinv_dst=pinv_dst)
        return cls(w, b, head_b)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logit-pinv hybrid's logits C_B(M₀x + b₀) on rows ``x`` (float64)."""
        wb = self.head_b.weight.astype(np.float64)
        return (np.asarray(x, np.float64) @ self.w.T + self.b) @ wb.T + self.head_b.bias


def cross_validate(xa: np.ndarray, xb: np.ndarray, groups: np.ndarray | None, prior: Prior,
                   method: str, labels: np.ndarray | None = None, folds: int = CV_FOLDS,
                   seed: int = 0) -> tuple[Candidate, dict[str, Any], np.ndarray]:
    """Grouped K-fold CV of ``method``'s path on agreement (or top-1 with ``labels``); returns the
    chosen candidate, the CV record (scores in % per candidate, the prior's score, folds) and
    each row's class [n] under the chosen candidate fitted without the row's fold (−1: a row not
    scored, unlabelled)."""
    n = xa.shape[0]
    fold = grouped_folds(groups, n, folds, seed)
    cands = candidates(method)
    nf = int(fold.max()) + 1
    hits = np.zeros((nf, len(cands)))
    counts = np.zeros(nf)
    wb = prior.head_b.weight.astype(np.float64)
    cb = prior.head_b.bias.astype(np.float64)
    w_logit = wb @ prior.w  # the prior's logits map, W_B M₀ [K, d_A]
    off_prior = wb @ prior.b + cb
    pred = np.full((n, len(cands)), -1, np.int32)  # each row's class under each candidate
    for f in range(nf):
        tr, te = fold != f, fold == f
        truth = _truth(xb[te], prior.head_b, None if labels is None else labels[te])
        ok = truth >= 0
        if not ok.any():
            continue
        spec = solvers.row_spectrum(xa[tr])
        yt = np.asarray(xb[tr], np.float64)
        gain = wb @ solvers.residual_projection(spec, yt, prior.w)  # W_B P_r [K, r]
        xt = np.asarray(xa[te], np.float64)[ok]
        base = xt @ w_logit.T
        z = (xt - spec.mean) @ spec.vecs
        rbar = wb @ (yt.mean(0) - prior.w @ spec.mean - prior.b)  # r̄ in logits
        for i, c in enumerate(cands):
            if c.kind == "prior":
                logits = base + off_prior
            else:
                logits = (base + off_prior + c.shrink(spec, int(tr.sum())) * rbar
                          + (z * c.filter(spec)) @ gain.T)
            cls = np.argmax(logits, axis=1)
            hits[f, i] += int((cls == truth[ok]).sum())
            pred[np.flatnonzero(te)[ok], i] = cls
        counts[f] = int(ok.sum())
    used = counts > 0
    if not used.any():
        raise AffeqError("no labelled rows to cross-validate on", "pass labels for the images")
    scores = 100.0 * hits[used].sum(0) / counts[used].sum()
    top = int(np.argmax(scores))
    per_fold = 100.0 * hits[used, top] / counts[used]
    se = float(per_fold.std(ddof=1) / np.sqrt(per_fold.size)) if per_fold.size > 1 else 0.0
    # One-standard-error rule (Breiman et al. 1984; Hastie et al., ESL §7.10): the most shrunk
    # candidate scoring within one standard error (over folds) of the best. A few photos give a
    # noisy CV score, and the noise is what a less shrunk map would be fitting.
    best = int(np.flatnonzero(scores >= scores[top] - se)[0])
    chosen = np.ascontiguousarray(pred[:, best])
    return cands[best], {"criterion": "top1" if labels is not None else "agreement",
                         "folds": int(used.sum()), "cv_rows": int(counts.sum()),
                         "cv_score": float(scores[best]), "cv_score_prior": float(scores[0]),
                         "cv_best": cands[top].label, "cv_best_score": float(scores[top]),
                         "cv_standard_error": se,
                         "cv_path": {c.label: float(s) for c, s in zip(cands, scores,
                                                                     strict=True)}}, chosen


def cv_labels(labels: np.ndarray | None) -> np.ndarray | None:
    """The CV's truth: the training rows' labels when every one is known (≥ 0), else None
    (then the CV scores agreement with the target's own prediction)."""
    return labels if labels is not None and bool((labels >= 0).all()) else None


class PriorFit(NamedTuple):
    """What :func:`prior_fit` returns: the map (W, b) in float64, its stats, and each training
    row's class under the chosen candidate fitted without the row's CV fold (−1 where not
    scored), which the quality gate pools with the held-out rows (``quality.rows_quality``)."""

    w: np.ndarray
    b: np.ndarray
    stats: dict[str, Any]
    cv_pred: np.ndarray


def prior_fit(xa: np.ndarray, xb: np.ndarray, groups: np.ndarray | None, prior: Prior,
              method: str, labels: np.ndarray | None = None, seed: int = 0) -> PriorFit:
    """``method`` (prior-ridge | prior-pca) on the training rows: CV picks the candidate
    (``cross_validate``), then the map is refitted on all of them."""
    if method not in solvers.PRIOR_METHODS:
        raise InternalError(f"prior_fit handles {solvers.PRIOR_METHODS}, not {method}")
    best, record, cv_pred = cross_validate(xa, xb, groups, prior, method, labels, seed=seed)
    spec = solvers.row_spectrum(xa)
    n, d = xa.shape
    if best.kind == "prior":
        w, b = prior.w.copy(), prior.b.copy()
    else:
        w, b = solvers.spectral_map(spec, xb, prior.w, best.filter(spec), prior.b,
                                    best.shrink(spec, int(n)))
    groups_n = n if groups is None else len(np.unique(groups))
    stats = {"images": int(n), "groups": int(groups_n), "choice": best.label,
             "lambda": best.lam(spec) if best.kind == "ridge" else None,
             "pca_rank": int(min(best.value, spec.rank)) if best.kind == "pca" else None,
             "rank": spec.rank, "source_dim": int(d), "underdetermined": n - 1 < d,
             "rank_deficient": spec.rank < d, **record}
    return PriorFit(w, b, stats, cv_pred)


def rows_fit_in_memory(n: int, dims: Sequence[int]) -> None:
    """AffeqError when ``n`` float32 joint rows of ``dims`` exceed :data:`ROWS_MEMORY_LIMIT`."""
    size = 4 * int(n) * int(sum(dims))
    if size > ROWS_MEMORY_LIMIT:
        raise AffeqError(f"prior-ridge/prior-pca keep the rows in memory: {n} images × "
                         f"{sum(dims)} features is {size / 2**30:.1f} GiB",
                         "use --method ols for this much data (or --max-images)")
