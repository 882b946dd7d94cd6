"""The fit quality gate: a map's held-out figures beside the logit-pinv map's, its warnings, and the
one line ``fit`` and ``build-hybrid`` print per map.

* :func:`map_quality`: R², agreement with the target's own top-1 (and top-1 against labels) of a
  map on held-out rows, beside the logit-pinv hybrid's (:class:`Baseline` forms its logits
  without M₀); :func:`add_quality` applies it to every map of a fit (the first
  :data:`QUALITY_ROWS` held-out rows).
* :func:`rows_quality`: the few-data (rows) methods' figures: the split's, and where the held-out
  split covers fewer than :data:`CV_GATE_GROUPS` groups (one photo's views move a figure by tens
  of points), every group scored once by a map that never saw it (the CV folds' predictions on
  the training groups, the map's on the held-out ones), reported with the group count and a
  standard error over groups (:func:`pooled`). No pass and no fit beyond the method's own.
* :func:`quality_warnings`, :func:`quality_line`: what the gate says; :func:`gate` is what
  ``fit`` runs after every solve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap
from affeq_rt.method import select, solvers


@dataclass
class Baseline:
    """The logit-pinv hybrid's logits without forming M₀ (d_B·K·d_A flops per pair, too many for
    large registries): C_B(M₀x + b₀) = P (W_A x + b_A − b_B) + b_B with P = W_B W_B⁺ [K, K]."""

    head_a: Head
    head_b: Head
    proj: np.ndarray

    @classmethod
    def of(cls, head_a: Head, head_b: Head,
           pinv_dst: tuple[np.ndarray, int] | None = None) -> Baseline:
        """P from B's pseudo-inverse (``solvers.head_pinv``, reused across sources)."""
        pinv, _ = pinv_dst if pinv_dst is not None else solvers.head_pinv(head_b.weight)
        return cls(head_a, head_b, head_b.weight.astype(np.float64) @ pinv)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(x W_Aᵀ + b_A − b_B) Pᵀ + b_B, float64."""
        wa, ba = self.head_a.weight.astype(np.float64), self.head_a.bias.astype(np.float64)
        bb = self.head_b.bias.astype(np.float64)
        return (np.asarray(x, np.float64) @ wa.T + ba - bb) @ self.proj.T + bb


def map_quality(w: np.ndarray, b: np.ndarray, xa: np.ndarray, xb: np.ndarray,
                prior: select.Prior | Baseline | None, labels: np.ndarray | None = None
                ) -> dict[str, Any]:
    """Held-out figures of one map on rows it was not fitted on: R², agreement of C_B(W x + b)
    with B's own top-1 (and top-1 against ``labels``), beside the logit-pinv map's. Empty rows:
    the figures are None."""
    n = int(xa.shape[0])
    out: dict[str, Any] = {"holdout_images": n}
    if n == 0:
        return {**out, "agree_holdout": None, "agree_holdout_logit_pinv": None}
    x = np.asarray(xa, np.float64)
    y = np.asarray(xb, np.float64)
    pred = x @ w.T + b
    tot = float(((y - y.mean(0)) ** 2).sum())
    out["r2_holdout"] = 1.0 - float(((y - pred) ** 2).sum()) / tot if tot > 0 else None
    if prior is None:
        return out
    wb, cb = prior.head_b.weight.astype(np.float64), prior.head_b.bias.astype(np.float64)
    own = np.argmax(y @ wb.T + cb, axis=1)
    hyb = np.argmax(pred @ wb.T + cb, axis=1)
    base = np.argmax(prior.logits(x), axis=1)
    out["agree_holdout"] = 100.0 * float((hyb == own).mean())
    out["agree_holdout_logit_pinv"] = 100.0 * float((base == own).mean())
    if labels is not None and (labels >= 0).any():
        lab = labels >= 0
        out["top1_holdout"] = 100.0 * float((hyb[lab] == labels[lab]).mean())
        out["top1_holdout_logit_pinv"] = 100.0 * float((base[lab] == labels[lab]).mean())
    return out


# Fewer held-out groups than this: the split's figures rest on a few photos (one photo's views
# move them by tens of points: docs/BENCHMARKS.md, "Quality gate"), so the gate also pools every
# group, each scored by a map that never saw it (:func:`rows_quality`).
CV_GATE_GROUPS = 10


def pooled(hits: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(100·Σhits/n, its standard error over groups) of bool ``hits`` [n] in ``groups`` (ids
    0…G−1): the cluster (linearisation) standard error of a ratio estimator,
    100·√(G/(G−1)·Σ_g (h_g − p·n_g)²)/n, which with equal group sizes is sd(p_g)/√G (ddof 1)."""
    n = int(hits.size)
    h = np.bincount(groups, weights=hits.astype(np.float64))
    m = np.bincount(groups).astype(np.float64)
    keep = m > 0
    h, m = h[keep], m[keep]
    g, p = int(m.size), float(h.sum()) / n
    se = float(np.sqrt(g / (g - 1) * ((h - p * m) ** 2).sum())) / n if g > 1 else 0.0
    return 100.0 * p, 100.0 * se


def rows_quality(fitted: select.PriorFit, xa: np.ndarray, xb: np.ndarray, hold: np.ndarray,
                 groups: np.ndarray | None, prior: select.Prior,
                 labels: np.ndarray | None = None) -> dict[str, Any]:
    """A rows method's gate: :func:`map_quality` of the ``fitted`` map on the held-out rows
    ``hold``; where they cover fewer than :data:`CV_GATE_GROUPS` groups (but some), also every
    group scored once by a map that never saw it, from what the fit already computed: the
    training rows' classes ``fitted.cv_pred`` [(~hold).sum()] under the chosen candidate fitted
    without their CV fold (−1: not scored) and the held-out rows' under the map. Agreement
    with B's own top-1 (top-1 against ``labels`` ≥ 0) pooled over those rows beside the
    logit-pinv map's on the same rows, with standard errors over groups (:func:`pooled`). The
    candidate was chosen on the training rows' CV scores, so their share can be optimistic (the
    prior's is exact: it reads no row)."""
    w, b = fitted.w, fitted.b
    out = map_quality(w, b, xa[hold], xb[hold], prior, None if labels is None else labels[hold])
    held = int(hold.sum()) if groups is None else int(np.unique(groups[hold]).size)
    out["holdout_groups"] = held
    if not 0 < held < CV_GATE_GROUPS:
        return out
    n = int(xa.shape[0])
    wb, cb = prior.head_b.weight.astype(np.float64), prior.head_b.bias.astype(np.float64)
    pred = np.empty(n, np.int64)
    pred[~hold] = fitted.cv_pred
    pred[hold] = np.argmax((np.asarray(xa[hold], np.float64) @ w.T + b) @ wb.T + cb, axis=1)
    scored = pred >= 0
    gid = (np.arange(n) if groups is None else np.unique(np.asarray(groups),
                                                         return_inverse=True)[1])[scored]
    gid = np.unique(gid, return_inverse=True)[1]
    own = np.argmax(np.asarray(xb[scored], np.float64) @ wb.T + cb, axis=1)
    base = np.argmax(prior.logits(xa[scored]), axis=1)
    pred = pred[scored]
    out.update(cv_groups=int(gid.max()) + 1 if gid.size else 0, cv_images=int(scored.sum()))
    out["agree_cv"], out["agree_cv_se"] = pooled(pred == own, gid)
    out["agree_cv_logit_pinv"], out["agree_cv_logit_pinv_se"] = pooled(base == own, gid)
    lab = None if labels is None else labels[scored]
    if lab is not None and (lab >= 0).any():
        ok = lab >= 0
        g2 = np.unique(gid[ok], return_inverse=True)[1]
        out["top1_cv"], out["top1_cv_se"] = pooled(pred[ok] == lab[ok], g2)
        out["top1_cv_logit_pinv"], out["top1_cv_logit_pinv_se"] = pooled(base[ok] == lab[ok], g2)
    return out


def gate(maps: Sequence[AffineMap], ctx: Any, red: Mapping[str, Any], rows_method: bool,
         choice: dict[str, str] | None) -> None:
    """``fit``'s quality gate (``ctx`` a ``method.methods.FitContext``, ``red`` the pass's
    reducers): held-out agreement beside logit-pinv's (:func:`add_quality`; a rows method has
    already judged its own, :func:`rows_quality`), then each map's warnings and ``auto``'s
    ``choice``."""
    kept = red["heldout"].rows() if "heldout" in red else None
    if kept is not None:  # the held-out rows the pass kept
        x, idx = kept
        arrays, mask = {m: x[:, ctx.slices[m]] for m in ctx.names}, np.ones(x.shape[0], bool)
        labels = None if ctx.labels is None else ctx.labels[idx]
    else:  # addressable rows
        arrays = None if rows_method else ctx.rows.arrays()
        mask, labels = ctx.mask, ctx.labels
    if arrays is not None and ctx.heads is not None:
        add_quality(maps, arrays, ctx.heads, mask, labels, ctx.head_pinvs)
    for m in maps:
        m.stats["warnings"] = quality_warnings(m.stats, m.method)
        if choice is not None:
            m.stats["method_choice"] = choice["why"]


def quality_warnings(stats: dict[str, Any], method: str) -> list[str]:
    """The fit quality gate's warnings for one map's stats (rows < dims; worse than logit-pinv;
    no held-out rows)."""
    out = []
    n, d = stats.get("images"), stats.get("source_dim")
    if method not in ("logit-pinv", "naive") and n is not None and d is not None and n - 1 < d:
        out.append(f"{n} training images for a {d}-dimensional source: underdetermined "
                   + (f"(shrunk toward logit-pinv: cross-validation chose {stats['choice']})"
                      if method in solvers.PRIOR_METHODS and stats.get("choice") else
                      "(any map fits them)"))
    for what, key in (("agreement", "agree"), ("top-1", "top1")):
        cv = stats.get(f"{key}_cv") is not None  # the gate's figure: grouped CV where it ran
        a = stats.get(f"{key}_cv" if cv else f"{key}_holdout")
        a0 = stats.get(f"{key}_cv_logit_pinv" if cv else f"{key}_holdout_logit_pinv")
        if method != "logit-pinv" and a is not None and a0 is not None and a < a0:
            out.append(f"{'cross-validated' if cv else 'held-out'} {what} {a:.1f}% is below the "
                       f"logit-pinv map's {a0:.1f}%")
    if method not in ("logit-pinv", "naive") and not stats.get("holdout_images"):
        out.append("no held-out images: its quality on unseen images is unknown")
    return out


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _pm(st: dict[str, Any], key: str) -> str:
    """A cross-validated figure with its standard error over groups: ``63.3% ± 8.1``."""
    return f"{_pct(st.get(key))} ± {st.get(key + '_se') or 0.0:.1f}"


def _r2(x: float | None) -> str:
    """R² with four decimals; a map far off in feature space (R² ≪ 0) in three digits."""
    return "-" if x is None else f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3g}"


def quality_line(key: str, method: str, st: dict[str, Any]) -> str:
    """One map's grouped held-out quality beside the logit-pinv map's (the fit quality gate)."""
    r2 = st.get("r2_holdout")
    held = st.get("holdout_groups")
    line = (f"{key:40s} {method:11s} held-out ({st.get('holdout_images') or 0} images"
            + (f", {held} groups" if held is not None else "") + f"): R² {_r2(r2)}")
    if st.get("agree_holdout") is not None:
        line += (f", agreement {_pct(st['agree_holdout'])} "
                 f"(logit-pinv {_pct(st.get('agree_holdout_logit_pinv'))})")
    if st.get("top1_holdout") is not None:
        line += (f", top-1 {_pct(st['top1_holdout'])} "
                 f"(logit-pinv {_pct(st.get('top1_holdout_logit_pinv'))})")
    if st.get("agree_cv") is not None:  # few held-out groups: every group held out once
        line += (f"; all {st['cv_groups']} groups ({st['cv_images']} images), each scored "
                 f"by a map that never saw it (CV folds + hold-out): agreement "
                 f"{_pm(st, 'agree_cv')} (logit-pinv {_pm(st, 'agree_cv_logit_pinv')})")
        if st.get("top1_cv") is not None:
            line += f", top-1 {_pm(st, 'top1_cv')} (logit-pinv {_pm(st, 'top1_cv_logit_pinv')})"
    if st.get("choice") is not None:
        line += (f"; CV ({st.get('folds')} grouped folds) chose {st['choice']}: "
                 f"{st['criterion']} {_pct(st.get('cv_score'))}, "
                 f"logit-pinv {_pct(st.get('cv_score_prior'))}")
    if st.get("rank_deficient") and st.get("rank") is not None:
        line += f"; rank {st['rank']}/{st['source_dim']}"
    if st.get("map_rank") is not None:
        line += f"; map rank {st['map_rank']}"
    if st.get("affine_r2_holdout") is not None:  # a map family beside the affine map (issue 22)
        line += (f"; affine R² {_r2(st['affine_r2_holdout'])} "
                 f"(affine − {method} {_r2(st.get('affine_gap_r2_holdout'))})")
    return line


QUALITY_ROWS = 5000  # held-out rows scored for agreement/top-1 (R² from the Gram uses all)


def add_quality(maps: Sequence[AffineMap], arrays: Mapping[str, Any],
                heads: Mapping[str, Head], mask: np.ndarray, labels: np.ndarray | None,
                pinvs: Mapping[str, tuple[np.ndarray, int]]) -> None:
    """Held-out agreement/top-1 beside the logit-pinv map's, for maps fitted on addressable rows
    (the first :data:`QUALITY_ROWS` held-out rows); R² stays the one the fit computed.
    ``pinvs``: each target head's pseudo-inverse and rank (the fit's ``FitContext.head_pinvs``)."""
    rows = np.flatnonzero(mask)[:QUALITY_ROWS]
    base = {(m.src, m.dst): Baseline.of(heads[m.src], heads[m.dst], pinvs[m.dst])
            for m in maps if heads[m.src].num_classes == heads[m.dst].num_classes}
    for m in maps:
        if (m.src, m.dst) not in base:  # other label sets: agreement means nothing
            continue
        q = map_quality(m.weight.astype(np.float64), m.bias.astype(np.float64),
                               np.asarray(arrays[m.src][rows]), np.asarray(arrays[m.dst][rows]),
                               base[m.src, m.dst], None if labels is None else labels[rows])
        q.pop("holdout_images")
        if "r2_holdout" in m.stats:
            q.pop("r2_holdout", None)
        m.stats.update(q)

