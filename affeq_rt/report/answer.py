"""Issue 22 item 6: one table that answers "is this equivalence real, and how large?" per ordered
pair, from results already computed: the hybrid's score and its worst margin over the negative
controls (``EvalTable.controls``), the calibrated similarity and its permutation p-value
(``SimilarityTable.null``), R² of the map and mutual k-NN (``SimilarityTable``), and the map-family
gap (affine − orthogonal / low-rank held-out R², in the maps' pair stats when fitted with
``--method orthogonal|low-rank``). Formats only; a missing piece is shown as "–"."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from affeq_rt.method.results import EvalTable
from affeq_rt.method.similarity import SimilarityTable

QUESTION = "Is this equivalence real, and how large?"
NULL_MEASURE = "cka"  # the calibrated measure shown (linear CKA: raw − permutation-null mean)


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None or not np.isfinite(v) else format(float(v), fmt).replace("-", "−")


def answer_rows(table: EvalTable | None, sim: SimilarityTable | None) -> list[dict[str, Any]]:
    """One dict per ordered pair A→B of the networks both results hold (either alone is fine)."""
    models = table.models if table is not None else sim.models if sim is not None else []
    if table is not None and sim is not None:
        models = [m for m in table.models if m in sim.models]
    rows = []
    for a in models:
        for b in models:
            if a == b:
                continue
            r: dict[str, Any] = {"pair": f"{a}->{b}"}
            if table is not None:
                i, j = table.index(a), table.index(b)
                r["hybrid"] = float(table.top1[i, j] if table.labelled else table.agree[i, j])
                r["hybrid_measure"] = "top1" if table.labelled else "agreement"
                ct = table.controls
                if ct is not None:
                    worst = min(((float(ct.margin[k][i, j]), k) for k in ct.kinds
                                 if np.isfinite(ct.margin[k][i, j])), default=(np.nan, ""))
                    r.update(control_margin=worst[0], control=worst[1],
                             real=f"{a}->{b}" not in ct.flagged)
                info = table.pair_info.get(f"{a}->{b}", {})
                if info.get("affine_gap_r2_holdout") is not None:
                    r.update(family=info.get("method"), family_gap=info["affine_gap_r2_holdout"])
            if sim is not None:
                i, j = sim.models.index(a), sim.models.index(b)
                r.update(cka=float(sim.cka[i, j]), r2=float(sim.r2[i, j]))
                if sim.mutual_knn is not None:
                    r["mutual_knn"] = float(sim.mutual_knn[i, j])
                null = sim.null.get("measures", {}).get(NULL_MEASURE) if sim.null else None
                if null is not None:
                    r.update(cka_calibrated=float(null["calibrated"][i, j]),
                             cka_p=float(null["p"][i, j]))
            rows.append(r)
    return rows


_COLUMNS = (("pair", "hybrid A→B", None), ("hybrid", "hybrid %", ".1f"),
            ("control_margin", "worst control margin (pts)", "+.1f"), ("control", "control", None),
            ("real", "beats controls", None), ("cka", "CKA", ".3f"),
            ("cka_calibrated", "CKA − null", ".3f"), ("cka_p", "p (null)", ".3f"),
            ("r2", "R² A→B", ".3f"), ("family_gap", "affine − family R²", ".3f"),
            ("mutual_knn", "mutual k-NN", ".3f"))


def _cells(r: dict[str, Any]) -> list[str]:
    out = []
    for key, _, fmt in _COLUMNS:
        v = r.get(key)
        if key == "real":
            out.append("–" if v is None else "yes" if v else "NO")
        elif fmt is None:
            out.append("–" if not v else str(v).replace("->", " → "))
        else:
            out.append(_f(v, fmt))
    return out


def _present(rows: list[dict[str, Any]]) -> list[int]:
    """Columns with at least one value."""
    return [c for c, (key, _, _) in enumerate(_COLUMNS) if any(r.get(key) is not None
                                                               for r in rows)]


def answer_text(rows: list[dict[str, Any]]) -> str:
    """The question, then one line per pair (columns that hold something)."""
    if not rows:
        return ""
    cols = _present(rows)
    table = [[_COLUMNS[c][1] for c in cols]] + [[_cells(r)[c] for c in cols] for r in rows]
    widths = [max(len(t[c]) for t in table) for c in range(len(cols))]
    return "\n".join([QUESTION] + ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True))
                                   for t in table])


def answer_html(rows: list[dict[str, Any]]) -> str:
    """The same as an HTML table, with what each column answers."""
    if not rows:
        return ""
    e = html.escape
    cols = _present(rows)
    head = "".join(f"<th>{e(_COLUMNS[c][1])}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{e(_cells(r)[c])}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return ("<p class='note'>Real? The hybrid must beat its negative controls (random weights, "
            "clustered noise, shuffled pairs) and the similarity its permutation null (p). How "
            "large? The hybrid's score, the calibrated similarity (raw − null mean), R² of the "
            "map, what a rotation or a low rank gives up (affine − family), and how many "
            "nearest neighbours the networks share.</p>"
            f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>")
