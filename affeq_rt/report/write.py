"""Reports of an evaluation: a Markdown table laid out like thesis Table 5.2, CSV and JSON with
every number, a heatmap PNG shaded by change, an overlap figure (paper Fig. 5) for chosen pairs,
and one self-contained HTML page (figures embedded as base64) holding them all.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affeq_rt.io.fsio import (
    atomic_path,
    ensure_writable_dir,
    jsonable,
    versions,
    write_bytes_atomic,
    write_json_atomic,
)
from affeq_rt.method.evaluate import REGIONS, EvalTable, Overlap, default_overlap_pairs, overlap

REGION_LABELS = {
    "A": "only A", "B": "only B", "H": "only hybrid", "AB": "A and B, not hybrid",
    "AH": "A and hybrid, not B", "BH": "B and hybrid, not A", "ABH": "all three",
    "none": "none",
}
REGION_COLORS = {"A": "#8fb3e0", "B": "#f2b880", "H": "#a9d18e", "AB": "#c9a0dc",
                 "AH": "#f5e663", "BH": "#8dd3c7", "ABH": "#d8a7c9", "none": "#dddddd"}


def _pct(v: float, signed: bool = False, digits: int = 2) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return s.replace("-", "−") + "%"


def _short(names: Sequence[str], width: int) -> list[str]:
    return [n if len(n) <= width else n[: width - 1] + "…" for n in names]


# ----------------------------------------------------------------------------------------------
# text formats


def text_table(table: EvalTable, width: int = 9) -> str:
    """Plain-text N×N table for a terminal: accuracy (or agreement) with the change under it."""
    width = max(width, min(24, max(len(m) for m in table.models)))
    names = _short(table.models, width)
    rw = max(12, max(len(n) for n in table.models) + 1)
    head = "source \\ target".ljust(rw) + "".join(n.rjust(width + 1) for n in names)
    lines = [head]
    for i, src in enumerate(table.models):
        if table.labelled:
            top = [_pct(v) for v in table.top1[i]]
            sub = ["" if i == j else f"({_pct(v, True, 1)})"
                   for j, v in enumerate(table.change_top1[i])]
        else:
            top = [_pct(v, digits=1) for v in table.agree[i]]
            sub = ["" if i == j else f"[{_pct(v, digits=1)}]"
                   for j, v in enumerate(table.agree_unmapped[i])]
        lines.append(src[:rw - 1].ljust(rw) + "".join(c.rjust(width + 1) for c in top))
        lines.append("".ljust(rw) + "".join(c.rjust(width + 1) for c in sub))
    if table.labelled:
        lines.append("cells: top-1 of C_target(M F_source); (…): % change from the source's own "
                     "top-1 (diagonal)")
    else:
        lines.append("cells: % images where C_target(M F_source) predicts what the target "
                     "predicts itself; […]: unmapped agreement of the two networks")
    return "\n".join(lines)


def markdown_table(table: EvalTable) -> str:
    """Thesis Table 5.2 layout: rows = source features, columns = target classifier; each cell the
    accuracy with the % change from the source's own accuracy under it (agreement when unlabelled).
    """
    cols = "| source \\ target | " + " | ".join(table.models) + " |"
    sep = "|---|" + "---:|" * len(table.models)
    rows = [cols, sep]
    for i, src in enumerate(table.models):
        cells = []
        for j in range(len(table.models)):
            if table.labelled:
                top = f"**{_pct(table.top1[i, j])}**"
                sub = "" if i == j else f"<br><sub>{_pct(table.change_top1[i, j], True)}</sub>"
            else:
                top = f"**{_pct(table.agree[i, j], digits=1)}**"
                sub = "" if i == j else \
                    f"<br><sub>unmapped {_pct(table.agree_unmapped[i, j], digits=1)}</sub>"
            cells.append(top + sub)
        rows.append(f"| **{src}** | " + " | ".join(cells) + " |")
    if table.labelled:
        legend = ("Rows: feature extractor (source); columns: classifier (target). Large: top-1 "
                  "accuracy of the hybrid C_target(M F_source) on "
                  f"{table.n} images; small: % change from the source's own accuracy (diagonal).")
    else:
        legend = ("No labels: large = % of images where C_target(M F_source) predicts what the "
                  "target predicts from its own features; small = how often the two networks "
                  f"agree unmapped ({table.n} images).")
    return "\n".join(rows) + "\n\n" + legend + "\n"


def overlap_markdown(overlaps: Sequence[Overlap]) -> str:
    """The overlap counts of each chosen pair as a Markdown table."""
    if not overlaps:
        return ""
    head = ("| hybrid A→B | right A | right B | right hybrid | fixed (hybrid right, B wrong) | "
            "of which A right | broken (B right, hybrid wrong) | " +
            " | ".join(REGIONS) + " |")
    rows = [head, "|---" * (7 + len(REGIONS)) + "|"]
    for o in overlaps:
        rows.append(f"| {o.a}→{o.b} | {o.right_a} | {o.right_b} | {o.right_hybrid} | {o.fixed} | "
                    f"{o.fixed_a_right} | {o.broken} | " +
                    " | ".join(str(o.regions[r]) for r in REGIONS) + " |")
    return "\n".join(rows) + "\n"


def csv_text(table: EvalTable) -> str:
    """One row per (source, target) with every number."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "target", "method", "n", "top1", "top5", "change_top1", "change_top5",
                "loss_top1_target_to_source", "agree", "agree_unmapped"])
    lab = table.labelled
    for i, a in enumerate(table.models):
        for j, b in enumerate(table.models):
            def num(m: np.ndarray | None, ii: int = i, jj: int = j) -> str:
                return "" if m is None or not np.isfinite(m[ii, jj]) else f"{m[ii, jj]:.6f}"
            # loss_top1[i, j] is Loss_{a,b}: what a's classifier loses with b's mapped features.
            w.writerow([a, b, table.method(a, b), table.n, num(table.top1 if lab else None),
                        num(table.top5 if lab else None), num(table.change_top1 if lab else None),
                        num(table.change_top5 if lab else None),
                        num(table.loss_top1 if lab else None), num(table.agree),
                        num(table.agree_unmapped)])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def heatmap_png(table: EvalTable) -> bytes:
    """N×N heatmap: cells shaded by % change from the source (red = penalty, blue = gain), or by
    agreement when unlabelled; each cell shows the number under the shade."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    nn = len(table.models)
    size = max(4.5, 0.85 * nn + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    if table.labelled:
        val = np.nan_to_num(table.change_top1, nan=0.0)
        # symmetric, at least ±5 %: a −0.3 % cell stays pale, as in the thesis's shading
        lim = max(5.0, float(np.abs(val).max()))
        norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
        im = ax.imshow(val, cmap="RdBu", norm=norm)
        cbar_label = "% change of top-1 from the source's own accuracy"
    else:
        val = table.agree
        im = ax.imshow(val, cmap="Greens", vmin=0.0, vmax=100.0)
        cbar_label = "% agreement with the target's own prediction"
    for i in range(nn):
        for j in range(nn):
            if table.labelled:
                txt = f"{table.top1[i, j]:.1f}"
                if i != j:
                    txt += f"\n{table.change_top1[i, j]:+.1f}%"
            else:
                txt = f"{table.agree[i, j]:.0f}%"
                if i != j:
                    txt += f"\n[{table.agree_unmapped[i, j]:.0f}%]"
            rgba = im.cmap(im.norm(val[i, j]))
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, txt, ha="center", va="center", fontsize=8 if nn <= 8 else 6.5,
                    color="white" if lum < 0.5 else "black")
    ax.set_xticks(range(nn), table.models, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(nn), table.models, fontsize=8)
    ax.set_xlabel("target (classifier)")
    ax.set_ylabel("source (feature extractor)")
    ax.set_xticks(np.arange(-0.5, nn, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, nn, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    title = "top-1 of C_target(M F_source)" if table.labelled else \
        "agreement of C_target(M F_source) with C_target(F_target)"
    ax.set_title(f"{title}\n({table.n} images)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(cbar_label, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def overlap_png(overlaps: Sequence[Overlap]) -> bytes:
    """Per pair: a 3-circle Venn schematic (A dashed, B dotted, hybrid solid, as in the paper's
    Fig. 5) with the count of every region, beside a bar breakdown of the 7 regions to scale."""
    plt = _plt()
    from matplotlib.patches import Circle
    from matplotlib.ticker import MaxNLocator

    rows = max(1, len(overlaps))
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.35]})
    centers = {"A": (-0.55, 0.35), "B": (0.55, 0.35), "H": (0.0, -0.55)}
    styles = {"A": "--", "B": ":", "H": "-"}
    spots = {"A": (-1.05, 0.75), "B": (1.05, 0.75), "H": (0.0, -1.15), "AB": (0.0, 0.9),
             "AH": (-0.72, -0.38), "BH": (0.72, -0.38), "ABH": (0.0, 0.05)}
    for r, o in enumerate(overlaps):
        ax = axes[r, 0]
        names = {"A": f"A = {o.a}", "B": f"B = {o.b}", "H": f"hybrid {o.a}→{o.b}"}
        for s, c in centers.items():
            ax.add_patch(Circle(c, 1.0, facecolor=REGION_COLORS[s], alpha=0.35,
                                edgecolor="black", linestyle=styles[s], linewidth=1.6))
        for reg, (x, y) in spots.items():
            ax.text(x, y, f"{o.regions[reg]}", ha="center", va="center", fontsize=10,
                    fontweight="bold" if reg == "AH" else "normal")
        ax.text(-1.7, -1.65, f"dashed: {names['A']}\ndotted: {names['B']}\nsolid: {names['H']}",
                ha="left", va="top", fontsize=8.5, linespacing=1.5)
        ax.set_xlim(-1.7, 1.7)
        ax.set_ylim(-2.45, 1.45)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"images right, of {o.n}; none right: {o.regions['none']}\n"
                     "(areas schematic, counts exact)", fontsize=9)
        bx = axes[r, 1]
        regs = [g for g in REGIONS if g != "none"]
        counts = [o.regions[g] for g in regs]
        ypos = np.arange(len(regs))[::-1]
        # "all three" usually dwarfs the rest (the paper scaled it down 10x): when it does, its
        # bar is cut at the axis end and says so, and the other regions are drawn to scale.
        others = max([c for g, c in zip(regs, counts, strict=True) if g != "ABH"] + [1])
        xmax = others * 1.45 if o.regions["ABH"] > 2 * others else max(max(counts), 1) * 1.3
        bx.barh(ypos, np.minimum(counts, xmax), color=[REGION_COLORS[g] for g in regs],
                edgecolor="black", linewidth=0.5)
        for yv, cv in zip(ypos, counts, strict=True):
            label = f"{cv} ({100.0 * cv / max(o.n, 1):.1f}%)"
            if cv > xmax:
                bx.text(xmax * 0.98, yv, label + " – bar cut", va="center", ha="right",
                        fontsize=8)
            else:
                bx.text(cv, yv, " " + label, va="center", fontsize=8)
        bx.set_yticks(ypos, [REGION_LABELS[g] for g in regs], fontsize=8)
        bx.set_xlim(0, xmax)
        bx.set_xlabel("images")
        bx.set_title(f"hybrid {o.a}→{o.b}\nfixed {o.fixed} of the {o.n - o.right_b} images "
                     f"B gets wrong; broken {o.broken}", fontsize=9)
        bx.xaxis.set_major_locator(MaxNLocator(integer=True))
        bx.spines[["top", "right"]].set_visible(False)
    if not overlaps:
        axes[0, 0].axis("off")
        axes[0, 1].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# HTML and the report folder


def _shade(v: float, lo: float, hi: float) -> str:
    """White→red for negative changes, white→blue for positive: an RGB hex for an HTML cell."""
    if not np.isfinite(v) or v == 0:
        return "#ffffff"
    t = min(1.0, abs(v) / (abs(lo) if v < 0 else abs(hi)) if (lo if v < 0 else hi) else 0.0)
    t = 0.85 * t
    rgb = (1.0, 1.0 - t, 1.0 - t) if v < 0 else (1.0 - t, 1.0 - 0.6 * t, 1.0)
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgb)


def html_table(table: EvalTable) -> str:
    """The N×N table as an HTML table with shaded cells (self-contained styles)."""
    e = html.escape
    out = ["<table class='nxn'><tr><th>source \\ target</th>" +
           "".join(f"<th>{e(m)}</th>" for m in table.models) + "</tr>"]
    if table.labelled:
        ch = table.change_top1
        lo, hi = min(-1.0, float(np.nanmin(ch))), max(1.0, float(np.nanmax(ch)))
    for i, src in enumerate(table.models):
        cells = []
        for j, dst in enumerate(table.models):
            tip = e(f"{src}→{dst}: {table.method(src, dst)}")
            if table.labelled:
                bg = _shade(float(ch[i, j]), lo, hi) if i != j else "#eeeeee"
                sub = "" if i == j else f"<div class='sub'>{_pct(ch[i, j], True)}</div>"
                body = f"<div class='big'>{_pct(table.top1[i, j])}</div>{sub}"
            else:
                g = float(table.agree[i, j]) / 100.0
                bg = "#eeeeee" if i == j else \
                    "#" + "".join(f"{int(round(255 * c)):02x}"
                                  for c in (1 - 0.6 * g, 1 - 0.25 * g, 1 - 0.6 * g))
                sub = "" if i == j else \
                    f"<div class='sub'>unmapped {_pct(table.agree_unmapped[i, j], digits=1)}</div>"
                body = f"<div class='big'>{_pct(table.agree[i, j], digits=1)}</div>{sub}"
            cells.append(f"<td style='background:{bg}' title='{tip}'>{body}</td>")
        out.append(f"<tr><th>{e(src)}</th>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;
     max-width:1200px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:4px 7px;text-align:right}
th{background:#f6f6f6}
table.nxn td{min-width:5.5em;text-align:center}
.big{font-size:1.05em;font-weight:600} .sub{font-size:0.8em;color:#444}
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
                     "% change from the source's own top-1 (the diagonal). Red = penalty, "
                     "blue = gain.</p>")
    else:
        parts.append("<p class='note'>No labels. Large: % of images where "
                     "C<sub>target</sub>(M F<sub>source</sub>) predicts what the target predicts "
                     "from its own features; small: how often the two networks agree unmapped."
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


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def write_report(table: EvalTable, out: str | Path,
                 overlap_pairs: Iterable[tuple[str, str]] | None = None,
                 title: str | None = None, notes: Sequence[str] = (),
                 extra_sections: Sequence[tuple[str, str]] = (),
                 figures: bool = True) -> dict[str, Path]:
    """Write table.md/.csv/.json, heatmap.png, overlap.png, report.html and the per-image arrays
    (``pred.npy`` [N, N, n] int32; ``correct.npy`` [N, N, ceil(n/8)] packed bits) into ``out``.
    Returns the written paths by kind."""
    d = ensure_writable_dir(out)
    title = title or f"affeq-rt evaluation: {len(table.models)} networks, {table.n} images"
    pairs = list(overlap_pairs) if overlap_pairs is not None else default_overlap_pairs(table)
    overlaps = [overlap(table, a, b) for a, b in pairs] if table.labelled else []
    paths = {"markdown": d / "table.md", "csv": d / "table.csv", "json": d / "table.json",
             "html": d / "report.html", "pred": d / "pred.npy"}
    md = f"# {title}\n\n" + markdown_table(table)
    if overlaps:
        md += "\n## Overlap of correct images (paper Fig. 5)\n\n" + overlap_markdown(overlaps)
    for note in notes:
        md += f"\n{note}\n"
    write_bytes_atomic(paths["markdown"], md.encode())
    write_bytes_atomic(paths["csv"], csv_text(table).encode())
    doc = table.to_dict()
    doc["title"] = title
    doc["notes"] = list(notes)
    doc["overlaps"] = [o.to_dict() for o in overlaps]
    doc["versions"] = versions()
    write_json_atomic(paths["json"], json.loads(json.dumps(doc, default=jsonable)))
    _save_npy(paths["pred"], table.pred)
    if table.correct is not None:
        paths["correct"] = d / "correct.npy"
        _save_npy(paths["correct"], table.correct)
    heat = ov = None
    if figures:
        heat = heatmap_png(table)
        paths["heatmap"] = d / "heatmap.png"
        write_bytes_atomic(paths["heatmap"], heat)
        if overlaps:
            ov = overlap_png(overlaps)
            paths["overlap"] = d / "overlap.png"
            write_bytes_atomic(paths["overlap"], ov)
    page = html_report(table, overlaps, heat, ov, title, notes, extra_sections)
    write_bytes_atomic(paths["html"], page.encode())
    return paths
