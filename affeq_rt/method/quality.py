"""The fit quality gate: a map's held-out figures beside the logit-pinv map's, its warnings, and the
one line ``fit`` and ``build-hybrid`` print per map.

* :func:`map_quality`: R², agreement with the target's own top-1 (and top-1 against labels) of a
  map on held-out rows, beside the logit-pinv hybrid's (:class:`Baseline` forms its logits
  without M₀); :func:`add_quality` applies it to every map of a fit (the first
  :data:`QUALITY_ROWS` held-out rows).
* :func:`quality_warnings`, :func:`quality_line`: what the gate says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from affeq_rt.io.heads import Head
from affeq_rt.io.maps import AffineMap
from affeq_rt.method import solvers
from affeq_rt.method.select import Prior


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
                prior: Prior | Baseline | None, labels: np.ndarray | None = None
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
    a, a0 = stats.get("agree_holdout"), stats.get("agree_holdout_logit_pinv")
    if method != "logit-pinv" and a is not None and a0 is not None and a < a0:
        out.append(f"held-out agreement {a:.1f}% is below the logit-pinv map's {a0:.1f}%")
    t, t0 = stats.get("top1_holdout"), stats.get("top1_holdout_logit_pinv")
    if method != "logit-pinv" and t is not None and t0 is not None and t < t0:
        out.append(f"held-out top-1 {t:.1f}% is below the logit-pinv map's {t0:.1f}%")
    if method not in ("logit-pinv", "naive") and not stats.get("holdout_images"):
        out.append("no held-out images: its quality on unseen images is unknown")
    return out


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _r2(x: float | None) -> str:
    """R² with four decimals; a map far off in feature space (R² ≪ 0) in three digits."""
    return "-" if x is None else f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3g}"


def quality_line(key: str, method: str, st: dict[str, Any]) -> str:
    """One map's grouped held-out quality beside the logit-pinv map's (the fit quality gate)."""
    r2 = st.get("r2_holdout")
    line = (f"{key:40s} {method:11s} held-out ({st.get('holdout_images') or 0} images): "
            f"R² {_r2(r2)}")
    if st.get("agree_holdout") is not None:
        line += (f", agreement {_pct(st['agree_holdout'])} "
                 f"(logit-pinv {_pct(st.get('agree_holdout_logit_pinv'))})")
    if st.get("top1_holdout") is not None:
        line += (f", top-1 {_pct(st['top1_holdout'])} "
                 f"(logit-pinv {_pct(st.get('top1_holdout_logit_pinv'))})")
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


def add_quality(maps: Sequence[AffineMap], arrays: Mapping[str, Any] | None,
                heads: Mapping[str, Head] | None, mask: np.ndarray,
                labels: np.ndarray | None) -> None:
    """Held-out agreement/top-1 beside the logit-pinv map's, for maps fitted on addressable rows
    (the first :data:`QUALITY_ROWS` held-out rows); R² stays the one the fit computed."""
    if arrays is None or heads is None:
        return
    rows = np.flatnonzero(mask)[:QUALITY_ROWS]
    names = sorted({m.src for m in maps} | {m.dst for m in maps})
    pinvs = {t: solvers.head_pinv(heads[t].weight) for t in names}
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

