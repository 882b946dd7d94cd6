"""The layer-by-layer analysis (``method.depth``) as files: the stage × stage CKA table and
heatmap, the depth curves (text, CSV, JSON, PNG) and one self-contained HTML page."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

import numpy as np

from affeq_rt.io.fsio import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from affeq_rt.method.depth import LayerAnalysis
from affeq_rt.report.figures import _plt
from affeq_rt.vis.figures import img_tag, page

TITLE = "Layer by layer: where does the other network's classifier become usable?"


def _label(la: LayerAnalysis, m: str) -> str:
    s = la.stages[m]
    return f"{s['network']}:{s['stage']}"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def cka_text(la: LayerAnalysis) -> str:
    """The CKA block (linear, then debiased) of the first network's stages (rows) against the
    last's (columns)."""
    a, b = la.networks[0], la.networks[-1]
    rows = [m for m in la.models if la.stages[m]["network"] == a]
    cols = [m for m in la.models if la.stages[m]["network"] == b]
    w = max(len(la.stages[m]["stage"]) for m in cols) + 7
    out: list[str] = []
    for what, block in (("linear CKA", la.block(a, b)),
                        ("debiased CKA", la.block(a, b, debiased=True))):
        if block is None:
            continue
        out += ["" if out else None, f"{what} over {la.n} images: rows {a}, columns {b}",
                "".ljust(12) + "".join(la.stages[m]["stage"].rjust(w) for m in cols)]
        out += [la.stages[m]["stage"].ljust(12) + "".join(_num(v).rjust(w) for v in block[i])
                for i, m in enumerate(rows)]
    return "\n".join(x for x in out if x is not None)


def depth_text(la: LayerAnalysis) -> str:
    """One block per curve: stage, module, width, map rank, score."""
    out = []
    for c in la.curves:
        out.append(f"depth curve {c.source} -> {c.target} ({c.method}; {c.metric} % on "
                   f"{c.scored} held-out images, maps from {c.images}): {c.target} alone "
                   f"{c.target_own:.2f}" + ("" if c.source_own is None else
                                           f", {c.source} alone {c.source_own:.2f}"))
        for p in c.points:
            out.append(f"  {p.stage:9s} {p.module[:28]:28s} {p.dim:6d}  rank {p.rank:5d}  "
                       f"{p.score:7.2f}")
    return "\n".join(out)


def cka_csv(la: LayerAnalysis) -> str:
    """Long form: row model, column model, CKA."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "column", "cka", "cka_debiased"])
    deb = la.cka_debiased if la.cka_debiased is not None else np.full_like(la.cka, np.nan)
    for i, a in enumerate(la.models):
        for j, b in enumerate(la.models):
            w.writerow([a, b, *("" if not np.isfinite(v) else repr(float(v))
                                for v in (la.cka[i, j], deb[i, j]))])
    return buf.getvalue()


def depth_csv(la: LayerAnalysis) -> str:
    """One row per (curve, stage)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "target", "method", "metric", "stage", "model", "module", "dim",
                "rank", "score", "target_own", "source_own"])
    for c in la.curves:
        for p in c.points:
            w.writerow([c.source, c.target, c.method, c.metric, p.stage, p.model, p.module,
                        p.dim, p.rank, repr(p.score), repr(c.target_own),
                        "" if c.source_own is None else repr(c.source_own)])
    return buf.getvalue()


def cka_png(la: LayerAnalysis) -> bytes:
    """The whole stage × stage CKA matrix as a heatmap (0…1), networks separated by lines."""
    plt = _plt()
    k = len(la.models)
    fig, ax = plt.subplots(figsize=(1.2 + 0.42 * k, 1.0 + 0.42 * k))
    im = ax.imshow(la.cka, vmin=0.0, vmax=1.0, cmap="magma")
    labels = [_label(la, m) for m in la.models]
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    edge = 0
    for net in la.networks[:-1]:
        edge += sum(la.stages[m]["network"] == net for m in la.models)
        ax.axhline(edge - 0.5, color="white", lw=1.5)
        ax.axvline(edge - 0.5, color="white", lw=1.5)
    if k <= 16:
        for i in range(k):
            for j in range(k):
                v = la.cka[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    ax.set_title(f"linear CKA over {la.n} images", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def depth_png(la: LayerAnalysis) -> bytes:
    """One panel per curve: the hybrid's score against the source's stage; dashed: the target
    alone, dotted: the source alone."""
    plt = _plt()
    n = len(la.curves)
    fig, axes = plt.subplots(1, n, figsize=(5.4 * n, 4.2), squeeze=False)
    for ax, c in zip(axes[0], la.curves, strict=True):
        xs = range(len(c.points))
        ax.plot(xs, [p.score for p in c.points], "o-", lw=1.5)
        ax.axhline(c.target_own, ls="--", color="grey", lw=0.9, label=f"{c.target} alone")
        if c.source_own is not None:
            ax.axhline(c.source_own, ls=":", color="grey", lw=0.9, label=f"{c.source} alone")
        ax.set_xticks(list(xs), [p.stage for p in c.points], fontsize=8)
        ax.set_xlabel(f"stage of {c.source} (shallow → deep; last: its features)")
        ax.set_ylabel(f"{c.metric} (%) through {c.target}'s classifier")
        ax.set_title(f"{c.source} → {c.target} ({c.method}, {c.scored} held-out images)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def depth_html(la: LayerAnalysis, figures: bool = True) -> str:
    """The report section: curves as tables, the CKA block table and the figures."""
    e = html.escape
    parts = [f"<p class='note'>Every stage of each network pooled over space, mapped to the "
             f"other network's features by an affine map solved from one Gram pass over "
             f"{la.n} stored images, and scored through that network's unchanged classifier on "
             "held-out images. The last point of each curve is the ordinary hybrid.</p>"]
    for c in la.curves:
        head = "".join(f"<th>{e(p.stage)}<div class='sub'>{e(p.module)}</div></th>"
                       for p in c.points)
        cells = "".join(f"<td>{p.score:.1f}%<div class='sub'>d {p.dim}, rank {p.rank}</div>"
                        "</td>" for p in c.points)
        own = f"{e(c.target)} alone {c.target_own:.1f}%" + (
            "" if c.source_own is None else f"; {e(c.source)} alone {c.source_own:.1f}%")
        parts.append(f"<p><b>{e(c.source)} → {e(c.target)}</b> ({e(c.method)}, {e(c.metric)} "
                     f"on {c.scored} images; {own})</p><table><tr>{head}</tr><tr>{cells}</tr>"
                     "</table>")
    a, b = la.networks[0], la.networks[-1]
    rows = [m for m in la.models if la.stages[m]["network"] == a]
    cols = [m for m in la.models if la.stages[m]["network"] == b]
    block = la.block(a, b)
    head = "".join(f"<th>{e(la.stages[m]['stage'])}</th>" for m in cols)
    body = "".join(f"<tr><th>{e(la.stages[m]['stage'])}</th>" +
                   "".join(f"<td>{_num(v)}</td>" for v in block[i]) + "</tr>"
                   for i, m in enumerate(rows))
    parts.append(f"<p>Linear CKA, rows: stages of {e(a)}, columns: stages of {e(b)}</p>"
                 f"<table><tr><th></th>{head}</tr>{body}</table>")
    if figures and la.curves:
        parts.append(img_tag(depth_png(la), "depth curves"))
    if figures:
        parts.append(img_tag(cka_png(la), "layer x layer CKA"))
    return "\n".join(parts)


def depth_report_section(la: LayerAnalysis) -> tuple[str, str]:
    """(title, HTML) for ``write_report(..., extra_sections=[...])``."""
    return TITLE, depth_html(la)


def write_depth(la: LayerAnalysis, out: str | Path, figures: bool = True) -> dict[str, Path]:
    """``depth.json``, ``depth.csv``, ``cka.csv``, ``depth.md`` and (with ``figures``)
    ``depth.png``, ``cka.png`` and ``depth.html`` into the folder ``out`` (atomic writes)."""
    d = ensure_writable_dir(Path(out))
    paths = {"json": d / "depth.json", "csv": d / "depth.csv", "cka_csv": d / "cka.csv",
             "markdown": d / "depth.md"}
    write_json_atomic(paths["json"], la.to_dict())
    write_bytes_atomic(paths["csv"], depth_csv(la).encode())
    write_bytes_atomic(paths["cka_csv"], cka_csv(la).encode())
    md = f"# {TITLE}\n\n```\n{depth_text(la)}\n\n{cka_text(la)}\n```\n"
    write_bytes_atomic(paths["markdown"], md.encode())
    if figures:
        paths.update(png=d / "depth.png", cka_png=d / "cka.png", html=d / "depth.html")
        if la.curves:
            write_bytes_atomic(paths["png"], depth_png(la))
        else:
            paths.pop("png")
        write_bytes_atomic(paths["cka_png"], cka_png(la))
        write_bytes_atomic(paths["html"], page(TITLE, depth_html(la)).encode())
    return paths
