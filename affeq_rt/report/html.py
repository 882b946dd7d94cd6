"""The HTML page of evaluation results: shaded N×N table, matrices, overlaps, maps, provenance."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from affeq_rt.io.fsio import versions
from affeq_rt.method.results import REGIONS, EvalTable, Overlap
from affeq_rt.report.figures import REGION_LABELS
from affeq_rt.report.scale import cell_scale, count_of, hex_of, text_colour, wilson
from affeq_rt.report.tables import _pct


def _interval(k: int | None, n: int) -> str:
    """``k/n · [lo–hi]`` (Wilson 95 %) for a cell, or "" when the count is unknown."""
    if k is None or n <= 0:
        return ""
    lo, hi = wilson(k, n)
    return f"{k}/{n} · [{lo:.1f}–{hi:.1f}]"


def html_table(table: EvalTable) -> str:
    """The N×N table as an HTML table, each cell coloured by its change against the right baseline
    on the heatmap's scale (``report.scale``), with image counts and a 95 % binomial interval."""
    e = html.escape
    nn, n = len(table.models), table.n
    sc = cell_scale(table)
    cls = "nxn many" if nn > 6 else "nxn"
    out = [f"<div class='wide'><table class='{cls}'><tr><th>source \\ target</th>" +
           "".join(f"<th>{e(m)}</th>" for m in table.models) + "</tr>"]
    for i, src in enumerate(table.models):
        cells = []
        for j, dst in enumerate(table.models):
            tip = e(f"{src}→{dst}: {table.method(src, dst)}")
            c = sc.colour(i, j)
            if table.labelled:
                k, own = count_of(table.top1[i, j], n), count_of(table.top1[i, i], n)
                sub = "" if i == j or k is None or own is None else (
                    f"<div class='sub'>{_pct(sc.values[i, j], True)} "
                    f"({k - own:+d} images)</div>".replace("-", "−"))
                body = f"<div class='big'>{_pct(table.top1[i, j])}</div>{sub}"
            else:
                k, base = count_of(table.agree[i, j], n), count_of(table.agree_unmapped[i, j], n)
                sub = "" if i == j or k is None or base is None else (
                    f"<div class='sub'>unmapped {_pct(table.agree_unmapped[i, j], digits=1)}"
                    f" ({_pct(sc.values[i, j], True, 1).rstrip('%')} pts, "
                    f"{k - base:+d} images)</div>".replace("-", "−"))
                body = f"<div class='big'>{_pct(table.agree[i, j], digits=1)}</div>{sub}"
            ci = _interval(k, n)
            body += f"<div class='ci'>{e(ci)}</div>" if ci else ""
            cells.append(f"<td style='background:{hex_of(c)};color:{text_colour(c)}' "
                         f"title='{tip}'>{body}</td>")
        out.append(f"<tr><th>{e(src)}</th>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    out.append(f"<p class='note'>Colour: {e(sc.label)}, on one symmetric scale of "
               f"±{sc.limit:.1f} (the heatmap's): red = worse, blue = better, grey = the "
               "baseline itself. Small print: images right (or agreeing) of all, with the "
               "Wilson 95 % interval of the percentage.</p>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;
     max-width:1200px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:4px 7px;text-align:right}
th{background:#f6f6f6}
table.nxn td{min-width:5.5em;text-align:center}
table.nxn.many{font-size:0.72em} table.nxn.many td{min-width:4.2em;padding:3px 4px}
.wide{overflow-x:auto;max-width:100%} .grids{display:flex;flex-wrap:wrap;gap:1em}
.big{font-size:1.05em;font-weight:600} .sub{font-size:0.8em;opacity:0.85}
.ci{font-size:0.72em;opacity:0.8;white-space:nowrap}
img{max-width:100%;border:1px solid #eee} .note{color:#555;font-size:0.9em}
code{background:#f3f3f3;padding:1px 4px}
"""


def html_report(table: EvalTable, overlaps: Sequence[Overlap], heatmap: bytes | None,
                overlap_fig: bytes | None, title: str, notes: Sequence[str] = (),
                extra_sections: Sequence[tuple[str, str]] = ()) -> str:
    """One self-contained HTML page: tables, figures (base64 PNG), overlaps, notes, provenance."""
    e = html.escape

    def img(png: bytes | None, alt: str) -> str:
        if not png:
            return ""
        return f"<img alt='{e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"

    summary = table.summary()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    parts.append(f"<p>{len(table.models)} networks, {table.n} images, "
                 f"{'labelled: accuracy' if table.labelled else 'no labels: agreement'}; "
                 f"evaluated on <code>{e(table.device)}</code> in {table.seconds:.2f} s.</p>")
    if summary:
        parts.append("<p>" + ", ".join(f"{e(k.replace('_', ' '))}: <b>{v:.2f}%</b>"
                                       for k, v in summary.items()) + "</p>")
    for note in notes:
        parts.append(f"<p class='note'>{e(note)}</p>")
    parts.append("<h2>Table (thesis Table 5.2 layout)</h2>")
    if table.labelled:
        parts.append("<p class='note'>Rows: feature extractor (source); columns: classifier "
                     "(target). Large: top-1 of C<sub>target</sub>(M F<sub>source</sub>); small: "
                     "% change from the source's own top-1 (the diagonal) and the change in "
                     "images. Red = penalty, blue = gain.</p>")
    else:
        parts.append("<p class='note'>No labels. Large: % of images where "
                     "C<sub>target</sub>(M F<sub>source</sub>) predicts what the target predicts "
                     "from its own features; small: how often the two networks agree unmapped, the "
                     "baseline each cell is coloured against."
                     "</p>")
    parts.append(html_table(table))
    parts.append(img(heatmap, "heatmap"))
    if table.labelled:
        parts.append("<h2>Top-5 and the paper's directional loss</h2>")
        parts.append(_matrix_html(table.models, table.top5, "top-5 %"))
        parts.append("<p class='note'>Loss<sub>A,B</sub> = Acc(C<sub>A</sub>(F<sub>A</sub>)) − "
                     "Acc(C<sub>A</sub>(M<sub>B→A</sub> F<sub>B</sub>)) in points; row A, column "
                     "B; negative = gain.</p>")
        parts.append(_matrix_html(table.models, table.loss_top1, "loss (points)", signed=True))
    if overlaps:
        parts.append("<h2>Overlap of correct images (paper Fig. 5)</h2>")
        parts.append("<p class='note'>A = source's own classifier on its features, B = target's "
                     "own, hybrid = C<sub>B</sub>(M<sub>A→B</sub> F<sub>A</sub>). 'Fixed' = "
                     "right for the hybrid, wrong with B's own features.</p>")
        parts.append(_overlap_html(overlaps))
        parts.append(img(overlap_fig, "overlap"))
    for head, body in extra_sections:
        parts.append(f"<h2>{e(head)}</h2>{body}")
    parts.append("<h2>Maps</h2>" + _pairs_html(table))
    parts.append("<h2>Provenance</h2><p class='note'>" +
                 ", ".join(f"{e(k)} {e(v)}" for k, v in versions().items()) + "</p>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _html_grid(header: Sequence[str], rows: Iterable[tuple[str, Iterable[object]]]) -> str:
    """A plain HTML table: escaped header labels, then (row head HTML, cell HTML…) rows."""
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    out += [f"<tr><th>{head}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
            for head, cells in rows]
    return "\n".join(out) + "</table>"


def _matrix_html(models: Sequence[str], m: np.ndarray, what: str, signed: bool = False) -> str:
    return _html_grid([what, *models], (
        (html.escape(a), (_pct(v, signed).rstrip("%") if signed else _pct(v) for v in m[i]))
        for i, a in enumerate(models)))


def _overlap_html(overlaps: Sequence[Overlap]) -> str:
    e = html.escape
    head = ["hybrid A→B", "right A", "right B", "right hybrid", "fixed", "fixed, A right",
            "broken"] + [REGION_LABELS[r] for r in REGIONS]
    return _html_grid(head, (
        (f"{e(o.a)}→{e(o.b)}", [o.right_a, o.right_b, o.right_hybrid, o.fixed, o.fixed_a_right,
                                o.broken] + [o.regions[r] for r in REGIONS])
        for o in overlaps))


def _pairs_html(table: EvalTable) -> str:
    e = html.escape
    keys = sorted({k for meta in table.pair_info.values() for k in meta})
    return _html_grid(["pair", *keys], (
        (e(pair), (e(_fmt(meta.get(k))) for k in keys)) for pair, meta in table.pair_info.items()))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
